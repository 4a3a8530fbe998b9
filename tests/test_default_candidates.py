"""The screen of default candidates rebuilds each candidate's preset exactly as stored in its
committed reports: a setting of `cpu` changed since the screen (its positional maps) must not leak
into the candidates, or a rerun trains another net under the old name and clears the stored stages."""

import importlib.util
import json
from pathlib import Path

import pytest

from engine import presets

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("default_candidates", ROOT / "experiments/default_candidates.py")
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)


@pytest.mark.parametrize("report", ["results/default_candidates/candidates.json",
                                    "results/default_candidates_gpu/candidates.json"])
def test_candidates_rebuild_their_stored_presets(report):
    stored = json.loads((ROOT / report).read_text())["results"]
    assert stored
    for name, r in stored.items():
        base = r["settings"]["base"]
        device = {"device": r["preset"]["device"]} if r["preset"]["device"] != presets.PRESETS[base].device else {}
        assert dc.candidate_preset(name, base, device).to_dict() == r["preset"], name


def test_the_base_is_not_the_current_default():
    # the screen's base is the 600-step `cpu`; the default it chose has moved on since
    assert dc.candidate_preset("600 steps (today)").to_dict() != presets.PRESETS["cpu"].to_dict()
    assert dc.candidate_preset("600 steps (today)").positional == 0.0


def test_table_shows_the_strict_count_where_stored():
    report = ROOT / "results/default_candidates"
    results = json.loads((report / "candidates.json").read_text())["results"]
    # the committed rows, measured before the strict count existed, render as committed
    assert dc.table(results) + "\n" == (report / "candidates.md").read_text()
    samples = {"confident": 12, "n": 64, "histogram": [1] * 10, "seconds": 1.0,
               "strict": {"confident": 3, "histogram": [0] * 10}}
    row = [line for line in dc.table({"3000 steps": {"samples": samples}}).splitlines() if line.startswith("| 3000")]
    assert "12/64 (1 1 1 1 1 1 1 1 1 1); strict 3/64" in row[0]
