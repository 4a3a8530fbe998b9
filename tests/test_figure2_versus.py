"""experiments/figure2_versus.py: two Figure 2 reports compared image by image, checked against
hand-made reports whose answers are known."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
from figure2_versus import versus  # noqa: E402

from engine.errors import UserError  # noqa: E402

N = 6


def report(values: dict[str, list[float]], **inputs) -> dict:
    return {"images": "test", "n_per_group": N, "angle": 90.0, "k_avg": 4, "seed": 0, **inputs, "bpd": values}


def base_values() -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    return {"original": list(5.0 + rng.normal(0, 0.3, N)), "rotated": list(5.05 + rng.normal(0, 0.3, N)),
            "averaged": list(5.15 + rng.normal(0, 0.2, N)), "noise": list(8.76 + rng.normal(0, 0.03, N))}


def test_each_group_s_verdict_and_paired_error_are_the_hand_computed_ones():
    b = base_values()
    shift = {"original": -0.6, "rotated": -0.4, "averaged": -0.1, "noise": +0.2}  # averaged moves away from 5.32
    jitter = np.array([0.01, -0.02, 0.03, 0.0, -0.01, 0.02])
    n = {g: list(np.array(v) + shift[g] + jitter) for g, v in b.items()}
    v = versus(report(b), report(n))
    for g in b:
        s = v["groups"][g]
        assert s["difference"] == pytest.approx(shift[g] + jitter.mean())
        assert s["difference_stderr"] == pytest.approx(jitter.std(ddof=1) / np.sqrt(N))
        assert s["new_distance"] == pytest.approx(abs(np.mean(n[g]) - s["writeup"]))
    assert [v["groups"][g]["closer"] for g in b] == [True, True, False, True]
    assert not v["all_closer"]
    gap = np.array(n["rotated"]) - np.array(n["original"])
    assert v["new_rotation_gap"] == pytest.approx(gap.mean())
    assert v["new_ordering_holds"] == bool(np.mean(n["original"]) < np.mean(n["rotated"]) < np.mean(n["averaged"]) < np.mean(n["noise"]))
    # moving the averaged group up instead (towards 5.32, not past it) makes every group closer
    n["averaged"] = list(np.array(b["averaged"]) + 0.05)
    assert versus(report(b), report(n))["all_closer"]
    # overshooting the seed's value by more than the base's distance is not closer
    n["averaged"] = list(np.array(b["averaged"]) + 2 * (5.32 - np.mean(b["averaged"])) + 0.01)
    assert not versus(report(b), report(n))["groups"]["averaged"]["closer"]


@pytest.mark.parametrize("change, says", [({"k_avg": 8}, "k_avg 4 against 8"), ({"images": "train"}, "images test against train"),
                                          ({"seed": 1}, "seed 0 against 1")])
def test_reports_on_different_images_are_refused(change, says):
    with pytest.raises(UserError, match=says):
        versus(report(base_values()), report(base_values(), **change))


def test_a_report_without_per_image_values_is_refused():
    r = report(base_values())
    del r["bpd"]["noise"]
    with pytest.raises(UserError, match="per-image"):
        versus(report(base_values()), r)
    with pytest.raises(UserError, match="the base report has no per-image"):
        versus([1, 2], report(base_values()))  # valid JSON, not a report
    r = report(base_values())
    r["bpd"]["rotated"] = ["a"] * N
    with pytest.raises(UserError, match="group rotated: a report's bits/dim are not a list of numbers"):
        versus(report(base_values()), r)


def test_the_script_writes_both_files_and_refuses_a_missing_report_in_one_line(tmp_path):
    b = base_values()
    (tmp_path / "a.json").write_text(json.dumps(report(b)))
    (tmp_path / "b.json").write_text(json.dumps(report({g: list(np.array(x) + 0.01) for g, x in b.items()})))
    script = str(ROOT / "experiments" / "figure2_versus.py")
    r = subprocess.run([sys.executable, script, "--base", str(tmp_path / "a.json"), "--new", str(tmp_path / "b.json"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "out" / "versus.json").read_text())
    assert saved["groups"]["noise"]["difference"] == pytest.approx(0.01)
    assert "| averaged |" in (tmp_path / "out" / "versus.md").read_text()
    r = subprocess.run([sys.executable, script, "--base", str(tmp_path / "none.json"), "--new", str(tmp_path / "b.json"),
                        "--out", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --base") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out2").exists()
