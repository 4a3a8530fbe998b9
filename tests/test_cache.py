"""The app's memo: keys, corruption, one computation per key across threads and processes."""

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import numpy as np

from cache import Memo, make_key
from cache import memo as memo_mod


def test_key_changes_with_every_ingredient(monkeypatch):
    x = np.zeros((1, 28, 28), np.float32)
    k = make_key("bpd", "run-a", x, {"n_steps": 8})
    y = x.copy()
    y[0, 3, 4] = 1 / 255
    others = [make_key("bpd", "run-b", x, {"n_steps": 8}), make_key("bpd", "run-a", y, {"n_steps": 8}),
              make_key("bpd", "run-a", x, {"n_steps": 16}), make_key("attribution", "run-a", x, {"n_steps": 8}),
              make_key("bpd", "run-a", x.astype(np.float64), {"n_steps": 8})]
    monkeypatch.setattr(memo_mod, "ENGINE_VERSION", "9.9.9")
    others.append(make_key("bpd", "run-a", x, {"n_steps": 8}))
    assert len({k, *others}) == len(others) + 1
    monkeypatch.undo()
    assert make_key("bpd", "run-a", x.copy(), {"n_steps": 8}) == k


def test_round_trip_and_corrupt_entries_are_recomputed(tmp_path):
    m = Memo(tmp_path)
    v = {"grad_w": np.arange(5.0), "bpd": 4.5, "note": "x"}
    m.set("k", v)
    got = m.get("k")
    assert got["bpd"] == 4.5 and got["note"] == "x" and (got["grad_w"] == v["grad_w"]).all()
    blob = m.cache.get("k")
    m.cache.set("k", blob[:-7] + b"garbage")  # a torn or tampered entry
    assert m.get("k") is None and "k" not in m.cache
    m.cache.set("k", b"not even a header")
    calls = []
    out = m.get_or_compute("k", lambda: calls.append(1) or {"bpd": 1.25})
    assert out["bpd"] == 1.25 and calls == [1] and m.get("k")["bpd"] == 1.25


def test_one_computation_per_key_across_threads(tmp_path):
    m = Memo(tmp_path)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return {"v": np.ones(3)}
    outs = []
    ts = [threading.Thread(target=lambda: outs.append(m.get_or_compute("k", slow))) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(calls) == 1 and len(outs) == 6 and all((o["v"] == 1).all() for o in outs)


def _compute_in_process(directory, log):
    m = Memo(directory)

    def fn():
        with open(log, "a") as f:
            f.write("x")
        time.sleep(0.5)
        return {"v": 1.0}
    m.get_or_compute("shared", fn)


def test_one_computation_per_key_across_processes(tmp_path):
    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    ps = [ctx.Process(target=_compute_in_process, args=(tmp_path / "memo", log)) for _ in range(3)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
    assert [p.exitcode for p in ps] == [0, 0, 0]
    assert log.read_text() == "x"


_HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from cache import Memo
m = Memo({memo!r})
with m.lock("shared"):
    open({flag!r}, "w").close()
    time.sleep(600)
"""
_TAKE = """
import socket, sys, time
sys.path.insert(0, {root!r})
from cache import Memo
def fn():
    open({log!r}, "a").write(socket.gethostname() + "\\n")
    return {{"v": 1.0}}
print(Memo({memo!r}).get_or_compute("shared", fn)["v"])
"""


def test_a_key_held_by_a_killed_process_is_free_again_under_another_hostname(tmp_path):
    # the holder is killed with SIGKILL mid-computation (as `docker stop` does after its grace
    # period); a process under another hostname (a restarted container) gets the key at once
    import shutil
    import signal
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parent.parent)
    fmt = {"root": root, "memo": str(tmp_path / "memo"), "flag": str(tmp_path / "held"), "log": str(tmp_path / "log")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(**fmt)])
    end = time.time() + 60
    while not (tmp_path / "held").exists():
        assert time.time() < end and holder.poll() is None
        time.sleep(0.05)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    cmd = [sys.executable, "-c", _TAKE.format(**fmt)]
    if os.geteuid() == 0 and shutil.which("unshare"):  # a new UTS namespace: another hostname
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname restarted-container && exec "$@"', "sh", *cmd]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0" and time.time() - t0 < 30
    hosts = (tmp_path / "log").read_text().split()
    assert len(hosts) == 1  # computed once
    if cmd[0] == "unshare":
        assert hosts == ["restarted-container"]


def test_size_limit_evicts_least_recently_used(tmp_path):
    m = Memo(tmp_path, size_limit=2_000_000)
    for i in range(40):
        m.set(f"k{i}", {"a": np.random.default_rng(i).random(25_000)})  # ~200 kB each
    assert m.cache.volume() < 3_000_000
    assert m.get("k39") is not None and m.get("k0") is None
