"""Executors: local processes and Ray give the same results; a lost Ray worker's job is rerun once; local
workers serve the next run in the same environment and die with their parent."""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine import atomic, data, training as train
from engine.experiments import lds
from engine.errors import UserError
from engine.executor import LocalExecutor, make_executor
from engine.presets import PRESETS
from engine.store import load_run

TINY = PRESETS["tiny"]


def _square_job(i: int, folder: str) -> str:
    """Writes i*i to folder/result_i.json atomically and logs the completion."""
    path = Path(folder) / f"result_{i}.json"
    atomic.save_json({"i": i, "sq": i * i}, path)
    with open(Path(folder) / "completions.log", "a") as f:
        f.write(f"{i}\n")
    return str(path)


def _job_killed_once(i: int, folder: str) -> str:
    """Job 0's first attempt announces its pid and waits to be killed; every other attempt works."""
    folder_p = Path(folder)
    if i == 0 and not (folder_p / "killed").exists():
        (folder_p / "pid.tmp").write_text(str(os.getpid()))
        os.replace(folder_p / "pid.tmp", folder_p / "pid")
        time.sleep(120)  # the test kills this process here, mid-job
    return _square_job(i, folder)


def test_local_executor_runs_every_job_once(tmp_path):
    got = sorted(LocalExecutor(2).run(_square_job, [(i, str(tmp_path)) for i in range(5)]))
    assert got == sorted(str(tmp_path / f"result_{i}.json") for i in range(5))
    assert sorted(int(v) for v in (tmp_path / "completions.log").read_text().split()) == list(range(5))
    with pytest.raises(UserError, match="unknown executor"):
        make_executor("slurm")


@pytest.fixture(scope="module")
def ray_executor():
    ray = pytest.importorskip("ray", reason="the Ray extra: pip install -r requirements-ray.txt")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ex = make_executor("ray")  # a local cluster with this machine's cores
    yield ex
    ray.shutdown()


def test_lds_is_identical_under_local_and_ray_executors(tmp_path, ray_executor):
    train.train(TINY, seed=0, out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    q = data.query_indices(1)
    local = lds.run_lds(run, tmp_path / "local", q, k=4, frac=0.1, executor=LocalExecutor(2))
    (tmp_path / "ray").mkdir()
    shutil.copytree(tmp_path / "local" / "scores", tmp_path / "ray" / "scores")  # only the retrains are compared
    remote = lds.run_lds(run, tmp_path / "ray", q, k=4, frac=0.1, executor=ray_executor)
    # bit-identical: training is a pure function of (seed, w), whichever process runs it
    assert remote["queries"][0]["actual_change"] == local["queries"][0]["actual_change"]
    assert remote["spearman_mean"] == local["spearman_mean"]
    files = sorted(p.name for p in (tmp_path / "local" / "bank").glob("*.json"))
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "ray" / "bank").glob("*.json"))
    for name in files:
        assert json.loads((tmp_path / "local" / "bank" / name).read_text()) == json.loads((tmp_path / "ray" / "bank" / name).read_text())


def test_a_killed_ray_worker_loses_and_duplicates_nothing(tmp_path, ray_executor):
    import threading

    def killer():
        pid = tmp_path / "pid"
        end = time.time() + 60
        while not pid.exists() and time.time() < end:
            time.sleep(0.05)
        (tmp_path / "killed").write_text("1")
        os.kill(int(pid.read_text()), signal.SIGKILL)
    k = threading.Thread(target=killer)
    k.start()
    got = list(ray_executor.run(_job_killed_once, [(i, str(tmp_path)) for i in range(4)]))
    k.join()
    assert (tmp_path / "killed").exists()  # the kill happened mid-job
    assert sorted(got) == sorted(str(tmp_path / f"result_{i}.json") for i in range(4))  # each result once
    done = sorted(int(v) for v in (tmp_path / "completions.log").read_text().split())
    assert done == [0, 1, 2, 3]  # job 0 completed exactly once, by its retry
    assert all(json.loads((tmp_path / f"result_{i}.json").read_text())["sq"] == i * i for i in range(4))
    assert not list(tmp_path.glob("*.tmp*"))  # nothing half written


def test_attribute_in_chunks_equals_one_sweep_and_resumes(tmp_path):
    from engine.attribution import attribute, attribute_many
    train.train(TINY, seed=0, out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    x = data.load_test()[0][data.query_indices(2)]
    gw, bpd = attribute(run, x)
    parts = tmp_path / "parts"
    gw2, bpd2 = attribute_many(run, x, parts, LocalExecutor(2), chunk=1)
    np.testing.assert_allclose(gw2, gw, rtol=1e-5, atol=1e-5 * np.abs(gw).max())  # float32 sums in another order
    np.testing.assert_allclose(bpd2, bpd, rtol=1e-6)
    # resume: a lost chunk is the only one recomputed
    (parts / "chunk_00001.npz").unlink()
    seen = []
    attribute_many(run, x, parts, LocalExecutor(1), chunk=1, callback=lambda i: seen.append(i["i"]))
    assert seen == [1, 2] and (parts / "chunk_00001.npz").is_file()


def _sleeping_job(folder: str, i: int) -> str:
    """Announces its worker's pid, then sleeps far longer than the test waits."""
    (Path(folder) / f"pid{i}.tmp").write_text(str(os.getpid()))
    os.replace(Path(folder) / f"pid{i}.tmp", Path(folder) / f"pid{i}")
    time.sleep(120)
    return folder


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):  # gone (ProcessLookupError while it is being reaped)
        return False
    return state != "Z"


def test_sigterm_to_the_parent_stops_its_running_workers(tmp_path):
    """`kill` on a CLI process running local jobs: it exits 130 and its workers die with it
    (by default SIGTERM ends the parent alone and the workers finish their jobs unobserved)."""
    import subprocess
    root, tests = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
    script = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(tests)!r}]\n"
              "from engine.cli import sigterm_as_interrupt\n"
              "from engine.executor import LocalExecutor\n"
              "import test_executor as t\n"
              "try:\n"
              "    with sigterm_as_interrupt():\n"
              f"        list(LocalExecutor(2).run(t._sleeping_job, [({str(tmp_path)!r}, 0), ({str(tmp_path)!r}, 1)]))\n"
              "except KeyboardInterrupt:\n"
              "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not all((tmp_path / f"pid{i}").exists() for i in range(2)):
        assert time.time() < deadline and proc.poll() is None, "the workers never started"
        time.sleep(0.2)
    pids = [int((tmp_path / f"pid{i}").read_text()) for i in range(2)]
    assert all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    deadline = time.time() + 15
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if _alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "workers kept running after their parent was terminated"


def _pid_job(i: int) -> int:
    time.sleep(0.2)  # long enough that each of the pool's workers takes a job
    return os.getpid()


def test_a_finished_run_leaves_its_workers_for_the_next_and_only_for_the_same_environment(monkeypatch):
    ex = LocalExecutor(2)
    first = set(ex.run(_pid_job, [(i,) for i in range(4)]))
    assert len(first) == 2 and set(ex.run(_pid_job, [(i,) for i in range(4)])) == first  # no new processes
    monkeypatch.setenv("ENGINE_TEST_MARKER", "1")  # a worker inherits the environment at its start
    assert not set(ex.run(_pid_job, [(i,) for i in range(4)])) & first

    def stop_early():
        it = ex.run(_pid_job, [(i,) for i in range(4)])
        next(it)
        it.close()  # the caller stops iterating: its workers are terminated, never reused
    monkeypatch.delenv("ENGINE_TEST_MARKER")
    # an idle worker killed (out of memory, say): the next run gets a whole new pool, not an error
    victim = sorted(first)[0]
    os.kill(victim, signal.SIGKILL)
    while _alive(victim):
        time.sleep(0.05)
    again = set(ex.run(_pid_job, [(i,) for i in range(4)]))
    assert len(again) == 2 and not again & first
    first = again
    stop_early()
    assert not any(_alive(p) for p in first)
    assert not set(ex.run(_pid_job, [(i,) for i in range(4)])) & first


def test_workers_die_with_a_parent_killed_outright(tmp_path):
    """SIGKILL to a process that runs local jobs (no exit hook runs): its workers, the one running a
    job and the idle one a finished run left, exit within seconds instead of living on as orphans."""
    import subprocess
    root, tests = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
    script = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(tests)!r}]\n"
              "from engine.executor import LocalExecutor\n"
              "import test_executor as t\n"
              f"list(LocalExecutor(2).run(t._square_job, [(0, {str(tmp_path)!r}), (1, {str(tmp_path)!r})]))\n"
              f"list(LocalExecutor(1).run(t._sleeping_job, [({str(tmp_path)!r}, 0)]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not (tmp_path / "pid0").exists():
        assert time.time() < deadline and proc.poll() is None, "the worker never started"
        time.sleep(0.2)
    busy = int((tmp_path / "pid0").read_text())
    workers = [int(pid) for pid in os.popen(f"ps -o pid= --ppid {proc.pid}").read().split()
               if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    idle = [p for p in workers if p != busy]
    assert busy in workers and len(idle) == 2 and all(_alive(p) for p in idle)  # the first run's two workers
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.time() + 15
    while any(_alive(p) for p in [busy, *idle]) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in [busy, *idle] if _alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "workers outlived a parent killed outright"
