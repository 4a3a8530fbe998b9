"""The CLI's contracts: JSON output, input order, one-line errors, and nothing half-written."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import cli, data, store
from engine.likelihood import bits_per_dim

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--json"]) == 0
    return out


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _listing(path: Path) -> set:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_bpd_json_in_input_order_matches_the_engine(tiny_run, tmp_path, capsys):
    x, _ = data.load_test()
    np.save(tmp_path / "a.npy", x[3, 0].numpy())
    Image.fromarray((x[5, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "b.png")
    code, out, err = _run(["bpd", "--run", str(tiny_run), "test:1", str(tmp_path / "a.npy"), str(tmp_path / "b.png"), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert [r["input"] for r in res] == ["test:1", str(tmp_path / "a.npy"), str(tmp_path / "b.png")]
    run = store.load_run(tiny_run)
    with torch.no_grad():
        want = bits_per_dim(run.model(), x[[1, 3]], n_steps=run.preset.bpd_steps)
    assert res[0]["bpd"] == pytest.approx(want[0].item(), abs=1e-4)
    assert res[1]["bpd"] == pytest.approx(want[1].item(), abs=1e-4)
    assert all(np.isfinite(r["bpd"]) for r in res)


def test_train_with_drop_file_zeroes_those_weights(tmp_path, capsys):
    (tmp_path / "drop.txt").write_text("0 5\n7\n")
    code, out, err = _run(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--drop", str(tmp_path / "drop.txt"), "--json"], capsys)
    assert code == 0, err
    w = store.load_run(tmp_path / "r").weights()
    assert (w[[0, 5, 7]] == 0).all() and w.sum() == len(w) - 3


def test_replace_other_sets_an_older_config_aside_and_trains_anew(tiny_run, tmp_path, capsys):
    # a preset's settings change between versions: `make app` on an old runs/cpu must train the
    # new config, keeping the old run, where a plain train refuses with one line
    out = tmp_path / "r"
    (tmp_path / "drop.txt").write_text("3\n")
    assert _run(["train", "--preset", "tiny", "--out", str(out), "--drop", str(tmp_path / "drop.txt"), "--json"], capsys)[0] == 0
    old = store.load_run(out).digest
    code, _, err = _run(["train", "--preset", "tiny", "--out", str(out), "--json"], capsys)
    assert code != 0 and "another config" in err and len(err.strip().splitlines()) == 1
    assert store.load_run(out).digest == old
    code, _, err = _run(["train", "--preset", "tiny", "--out", str(out), "--replace-other", "--json"], capsys)
    assert code == 0, err
    aside = tmp_path / f"r.{old[:8]}"
    assert f"moved it to {aside}" in err and store.load_run(aside).digest == old
    new, want = store.load_run(out), store.load_run(tiny_run)
    assert new.digest == want.digest != old
    a, b = new.load_final().model_params, want.load_final().model_params
    assert all(torch.equal(a[k], b[k]) for k in b)  # the same training as a fresh directory's
    code, _, err = _run(["train", "--preset", "tiny", "--out", str(out), "--replace-other", "--json"], capsys)
    assert code == 0 and "moved" not in err  # this config: kept (and resumed if unfinished)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drop.txt", "r", f"r.{old[:8]}"]


def test_sample_is_seeded(tiny_run, tmp_path, capsys):
    for name in ("a.npy", "b.npy"):
        assert _run(["sample", "--run", str(tiny_run), "--out", str(tmp_path / name), "--n", "2", "--steps", "20", "--json"], capsys)[0] == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (2, 28, 28) and np.array_equal(a, b)


def _bad_cases(tmp_path: Path, tiny_run: Path) -> dict:
    (tmp_path / "garbage.png").write_bytes(b"definitely not a png")
    buf = io.BytesIO()
    Image.new("L", (64, 64), 0).save(buf, format="PNG")
    (tmp_path / "black.png").write_bytes(buf.getvalue())
    png = buf.getvalue()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    np.save(tmp_path / "nan.npy", np.full((28, 28), np.nan))
    (tmp_path / "corrupt_run").mkdir()
    (tmp_path / "corrupt_run" / "config.json").write_text("{not json")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    for f in ("config.json", "weights.npy"):
        (broken / f).write_bytes((tiny_run / f).read_bytes())
    (broken / "final.pt").write_bytes((tiny_run / "final.pt").read_bytes()[:1000])
    r = str(tiny_run)
    return {
        "non-image": ["bpd", "--run", r, str(tmp_path / "garbage.png")],
        "truncated": ["bpd", "--run", r, str(tmp_path / "trunc.png")],
        "black canvas": ["bpd", "--run", r, str(tmp_path / "black.png")],
        "nan array": ["bpd", "--run", r, str(tmp_path / "nan.npy")],
        "missing input": ["bpd", "--run", r, str(tmp_path / "nope.png")],
        "a folder as input": ["bpd", "--run", r, str(tmp_path)],
        "missing run": ["bpd", "--run", str(tmp_path / "no_run"), "test:0"],
        "corrupt config": ["bpd", "--run", str(tmp_path / "corrupt_run"), "test:0"],
        "corrupt checkpoint": ["bpd", "--run", str(broken), "test:0"],
        "sample from missing run": ["sample", "--run", str(tmp_path / "no_run"), "--out", str(tmp_path / "s.png")],
        "sample with no steps": ["sample", "--run", r, "--out", str(tmp_path / "s.png"), "--steps", "-3"],
        "sample to a text file": ["sample", "--run", r, "--out", str(tmp_path / "s.txt"), "--n", "1"],
        "negative training seed": ["train", "--preset", "tiny", "--out", str(tmp_path / "new"), "--seed", "-1"],
        "one drop-set": ["lds", "--run", r, "--out", str(tmp_path / "lds"), "--drop-sets", "1"],
        "no seeds": ["compare", "--run", r, "--out", str(tmp_path / "lds"), "--seeds", "0"],
        "figure2 negative seed": ["figure2", "--run", r, "--n", "2", "--seed", "-4", "--out", str(tmp_path / "f2")],
        "figure2 angle nan": ["figure2", "--run", r, "--n", "2", "--angle", "nan", "--out", str(tmp_path / "f2")],
        "figure4 k 0": ["figure4", "--run", r, "--scores", str(tmp_path / "nan.npy"), "--k", "0", "--out", str(tmp_path / "f4")],
        "figure4 k past the training set": ["figure4", "--run", r, "--scores", str(tmp_path / "nan.npy"), "--k", "100000",
                                            "--out", str(tmp_path / "f4")],
        "negative top": ["attribute", "--run", r, "test:0", "--out", str(tmp_path / "a.npz"), "--top", "-2"],
        "k-ary with k 1": ["attribute", "--run", r, "test:0", "--out", str(tmp_path / "a.npz"), "--scheme", "kary", "--k", "1"],
        "empty chunks": ["attribute", "--run", r, "test:0", "--out", str(tmp_path / "a.npz"), "--chunk", "0", "--jobs", "2"],
        "bad preset": ["train", "--preset", "huge", "--out", str(tmp_path / "new")],
        "bad weights": ["train", "--preset", "tiny", "--out", str(tmp_path / "new"), "--weights", str(tmp_path / "nan.npy")],
        "unknown flag": ["bpd", "--run", r, "--frobnicate"],
    }


def test_every_bad_input_gives_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    cases = _bad_cases(tmp_path, tiny_run)
    before, run_before = _listing(tmp_path), _listing(tiny_run)
    for name, argv in cases.items():
        code, out, err = _run(argv, capsys)
        assert code != 0, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert out == "", name
    assert _listing(tmp_path) == before
    assert _listing(tiny_run) == run_before


def test_module_entry_point_exit_code_and_stderr(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "engine", "bpd", "--run", str(tmp_path / "none"), "test:0"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr
