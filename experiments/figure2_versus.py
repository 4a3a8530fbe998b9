"""Two Figure 2 reports on the same images, side by side: is the new model's every mean closer to
the seed write-up's than the base model's?

    python experiments/figure2_versus.py --base results/figure2_cpu600/figure2.json \
        --new results/figure2/figure2.json --out results/figure2_versus_cpu600

Both reports must have been made on the same inputs (the same --images, --n, --angle, --k-avg and
--seed of `python -m engine figure2`: then every group holds the same images in the same order), so
each group's difference is paired image by image and its standard error is that of the paired
differences, far smaller than the groups' spreads. Per group: both means, the seed's, each mean's
distance to it, the paired difference (new minus base, with its standard error), and whether the new
mean is closer; then the new report's ordering and rotation gap. Writes versus.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, provenance  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.experiments.figure2 import GROUPS, WRITEUP_VALUES, mean_stderr  # noqa: E402

# What fixes a report's inputs (engine.experiments.figure2.figure2_inputs); reports older than the
# `images` field were all made on test digits.
SAME_INPUTS = ("images", "n_per_group", "angle", "k_avg", "seed")
GAP_GOAL = 0.2  # bits/dim, the least rotation gap asked of a default (the seed's is 0.3)


def versus(base: dict, new: dict) -> dict:
    """Compare two figure2 reports (figure2.json dicts with per-image "bpd" lists of n values per
    group) made on the same inputs. Per group: base and new means, the seed's value, both distances
    to it, the paired difference new - base (mean and standard error over the n images), and
    "closer" (the new mean's distance to the seed's value is smaller). Raises UserError when the
    reports' inputs differ or a report lacks per-image values."""
    for name, r in (("base", base), ("new", new)):
        if not isinstance(r, dict) or not isinstance(r.get("bpd"), dict) or any(g not in r["bpd"] for g in GROUPS):
            raise UserError(f"the {name} report has no per-image bits/dim for all four groups (not a figure2.json?)")
    a_in = {k: base.get(k, "test") if k == "images" else base.get(k) for k in SAME_INPUTS}
    b_in = {k: new.get(k, "test") if k == "images" else new.get(k) for k in SAME_INPUTS}
    if a_in != b_in:
        diff = ", ".join(f"{k} {a_in[k]} against {b_in[k]}" for k in SAME_INPUTS if a_in[k] != b_in[k])
        raise UserError(f"the reports were made on different images ({diff}); rerun one with the other's settings")
    groups = {}
    for g in GROUPS:
        try:
            a, b = np.asarray(base["bpd"][g], float).ravel(), np.asarray(new["bpd"][g], float).ravel()
        except (TypeError, ValueError):
            raise UserError(f"group {g}: a report's bits/dim are not a list of numbers") from None
        if len(a) != len(b) or len(a) == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise UserError(f"group {g}: the reports hold {len(a)} and {len(b)} values, or non-finite ones")
        d, w = mean_stderr(b - a), WRITEUP_VALUES[g]
        groups[g] = {"base": float(a.mean()), "new": float(b.mean()), "writeup": w,
                     "base_distance": abs(float(a.mean()) - w), "new_distance": abs(float(b.mean()) - w),
                     "difference": d["mean"], "difference_stderr": d["stderr"]}
        groups[g]["closer"] = groups[g]["new_distance"] < groups[g]["base_distance"]
    means = [groups[g]["new"] for g in GROUPS]
    gap = mean_stderr(np.asarray(new["bpd"]["rotated"], float) - np.asarray(new["bpd"]["original"], float))
    return {"inputs": a_in, "groups": groups, "all_closer": all(groups[g]["closer"] for g in GROUPS),
            "new_ordering_holds": all(x < y for x, y in zip(means, means[1:])),
            "new_rotation_gap": gap["mean"], "new_rotation_gap_stderr": gap["stderr"], "gap_goal": GAP_GOAL}


def table(v: dict, base_name: str, new_name: str) -> str:
    i = v["inputs"]
    lines = [f"Figure 2, {new_name} against {base_name}: the same {i['n_per_group']} images per group "
             f"({i['images']} digits, rotated {i['angle']:g} deg, averages of {i['k_avg']}, seed {i['seed']})", "",
             "| group | base | new | seed write-up | base's distance | new's distance | new minus base (paired, ± SE) | new closer |",
             "|---|---|---|---|---|---|---|---|"]
    for g in GROUPS:
        s = v["groups"][g]
        lines.append(f"| {g} | {s['base']:.3f} | {s['new']:.3f} | {s['writeup']} | {s['base_distance']:.3f} | "
                     f"{s['new_distance']:.3f} | {s['difference']:+.3f} ± {s['difference_stderr']:.3f} | "
                     f"{'yes' if s['closer'] else 'no'} |")
    lines += ["", f"every mean closer to the seed's: {'yes' if v['all_closer'] else 'no'}; "
                  f"new ordering original < rotated < averaged < noise: {'holds' if v['new_ordering_holds'] else 'does NOT hold'}; "
                  f"new rotation gap {v['new_rotation_gap']:+.3f} (standard error {v['new_rotation_gap_stderr']:.3f}; "
                  f"at least {v['gap_goal']}: {'yes' if v['new_rotation_gap'] >= v['gap_goal'] else 'no'})"]
    return "\n".join(lines)


def _name(r: dict, path: str) -> str:
    """A report's model in words: its run folder and preset (several runs share a preset)."""
    return f"{r.get('run', path)} ({r.get('preset_label', r.get('preset', '?'))})"


def _load(path: str, name: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--{name} {path}: no such file (a figure2.json written by python -m engine figure2)")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--{name} {path}: not a readable JSON file ({e.__class__.__name__})") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="figure2.json of the model to beat")
    ap.add_argument("--new", required=True, help="figure2.json of the model compared")
    ap.add_argument("--out", required=True, help="folder for versus.json and versus.md")
    a = ap.parse_args(argv)
    base, new = _load(a.base, "base"), _load(a.new, "new")
    v = versus(base, new)
    v = {**provenance.stamp(), "base": a.base, "new": a.new, "base_run_digest": base.get("run_digest"),
         "new_run_digest": new.get("run_digest"), **v}
    v["table"] = table(v, _name(base, a.base), _name(new, a.new))
    out = Path(a.out)
    atomic.save_json(v, out / "versus.json")
    atomic.save_text(v["table"] + "\n", out / "versus.md")
    print(v["table"])
    return v


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
