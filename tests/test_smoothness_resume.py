"""The smoothness screen (experiments/grid_smoothness.py) resumes within a variant: an
interrupted stage keeps its metagradient and finished retrains, redoes only what is missing or
damaged, and never reuses files of another run or other queries. It can fail: the resumed
result is compared with the uninterrupted one, and kept files must not be rewritten."""

import sys
from pathlib import Path

import numpy as np

from engine.presets import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import grid_smoothness as gs  # noqa: E402


def test_interrupted_smoothness_resumes_and_gives_the_same_answer(tmp_path):
    p = PRESETS["tiny"]
    run = tmp_path / "v" / "run"
    first = gs.evaluate(p, run, [0, 1], 3, 1)
    cache = run.with_name("run.smoothness")
    files = sorted(cache.iterdir())
    assert [f.name for f in files] == ["metagradient.npz", "retrain_000.json", "retrain_001.json", "retrain_002.json"]
    # an interruption: one retrain lost, another torn
    (cache / "retrain_001.json").unlink()
    (cache / "retrain_002.json").write_text('{"key": ')
    kept = {f: f.stat().st_mtime_ns for f in (cache / "metagradient.npz", cache / "retrain_000.json")}
    again = gs.evaluate(p, run, [0, 1], 3, 1)
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())  # read, not recomputed
    assert np.allclose(again["actual"], first["actual"], atol=1e-5)  # a retrain is deterministic
    assert again["predicted"] == first["predicted"] and again["spearman"] == first["spearman"]
    # other queries: the stored files are stale, and every one is redone
    other = gs.evaluate(p, run, [2, 3], 3, 1)
    assert all((cache / f.name).stat().st_mtime_ns != t for f, t in kept.items())
    assert not np.allclose(other["actual"], first["actual"])
