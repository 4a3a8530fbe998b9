"""Is the seed's rotation gap about orientation or about interpolation? Bits/dim of the same digits
rotated by several angles, and rotated there and back.

    python experiments/rotation_angles.py [--run runs/cpu] [--n 30] [--angles 15,45,90,180]
        [--back 45] [--interpolations bilinear,nearest] [--images test|train] [--out results/rotation_angles]

The seed's Figure 2 puts rotated digits 0.3 bits/dim above upright ones (3.5 -> 3.8) and does not
say by how much it rotated. A rotation by 90 or 180 degrees moves every pixel onto another pixel
(`engine.data.rotate`, bilinear, maps pixel centres onto pixel centres), so only the digit's
orientation changes; any other angle also resamples the image: bilinear resampling blurs the strokes
(more pixels at intermediate grey levels), nearest (torchvision's default for `rotate`) keeps the
grey levels and makes the edges jagged. "and back" rotates by +a then -a: upright again, resampled
twice, so its gap is what the resampling alone costs. Transforms whose images equal an earlier
one's (90 and 180 degrees under either resampling) are computed once and listed once.

Digits: the Figure 2 report's originals (engine.experiments.figure2.figure2_inputs, seed 0), from
the MNIST test set or (--images train) from the run's training images. Each transform's gap is
paired by digit (transformed minus original) with its standard error. Writes
rotation_angles.{json,md}; each finished transform is stored in rotation_angles_partial.json (keyed
by run and settings), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, provenance  # noqa: E402
from engine.bpd import run_bpd  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.experiments.figure2 import figure2_inputs, training_pool  # noqa: E402
from engine.presets import digest, label  # noqa: E402
from engine.store import load_run  # noqa: E402


def transforms(originals: torch.Tensor, angles: list[float], back: list[float],
               interpolations: list[str]) -> dict[str, torch.Tensor]:
    """Name -> transformed copies of `originals` (n, 1, 28, 28), the originals first; a transform
    whose images equal an earlier one's is left out (right angles resample exactly)."""
    out = {"original": originals}
    rows = [(f"rotated {a:g}", lambda m, a=a: data.rotate(originals, a, m)) for a in angles]
    rows += [(f"rotated {a:g} and back", lambda m, a=a: data.rotate(data.rotate(originals, a, m), -a, m))
             for a in back]
    for name, make in rows:
        xs = {m: make(m) for m in interpolations}
        first = next(iter(xs.values()))
        if len(xs) > 1 and all(torch.equal(first, x) for x in xs.values()):
            xs = {"either": first}  # right angles: every resampling gives the same images
        for m, x in xs.items():
            if not any(torch.equal(x, y) for y in out.values()):
                out[f"{name} ({m})"] = x
    return out


def grey_share(x: torch.Tensor) -> float:
    """Share of pixels strictly between 0.1 and 0.9: how blurred the strokes are."""
    return float(((x > 0.1) & (x < 0.9)).float().mean())


def _angles(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"angles are comma-separated degrees, e.g. 15,45,90; not {s!r}")


def table(r: dict) -> str:
    lines = [f"Bits/dim under `{r['run']}` (preset {r['preset_label']}, run {r['run_digest']}), {r['n']} "
             f"{'MNIST test digits' if r['images'] == 'test' else 'of the run’s training images'} "
             f"(the Figure 2 report's originals, seed 0); gap = transformed minus original, paired by digit.",
             "",
             "| images | mean bits/dim | gap (± SE) | digits with gap > 0 | pixels at grey 0.1-0.9 |",
             "|---|---|---|---|---|"]
    for name, t in r["transforms"].items():
        gap = "" if name == "original" else f"{t['gap']:+.3f} ± {t['gap_se']:.3f}"
        pos = "" if name == "original" else f"{t['positive']}/{r['n']}"
        lines.append(f"| {name} | {t['mean']:.3f} | {gap} | {pos} | {t['grey_share']:.1%} |")
    lines += ["", "seed write-up: original 3.5, rotated 3.8 (gap +0.3, angle not stated)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--angles", default="15,45,90,180")
    ap.add_argument("--back", default="45", help="angles to rotate by and back (comma-separated; empty for none)")
    ap.add_argument("--interpolations", default="bilinear,nearest")
    ap.add_argument("--images", choices=("test", "train"), default="test")
    ap.add_argument("--out", default="results/rotation_angles")
    a = ap.parse_args()
    provenance.start()
    try:
        if a.n < 2:
            raise UserError("--n must be at least 2 (a gap needs a standard error)")
        angles, back = _angles(a.angles), _angles(a.back)
        interpolations = [m for m in a.interpolations.split(",") if m]
        if not interpolations or not set(interpolations) <= {"bilinear", "nearest"}:
            raise UserError("--interpolations takes bilinear and nearest, comma-separated")
        run = load_run(a.run)
        pool = training_pool(run) if a.images == "train" else None
        originals = figure2_inputs(a.n, 90.0, 4, 0, pool=pool)["original"]
    except UserError as e:
        sys.exit(f"error: {e}")
    out = Path(a.out)
    key = digest({"run": run.digest, "n": a.n, "images": a.images, "bpd_steps": run.preset.bpd_steps})
    partial = out / "rotation_angles_partial.json"
    done: dict[str, list[float]] = {}
    if partial.is_file():
        try:
            saved = json.loads(partial.read_text())
            done = saved["bpd"] if saved.get("key") == key else {}
        except (OSError, ValueError, KeyError):
            done = {}  # a damaged partial file costs a recomputation, nothing else
    imgs = transforms(originals, angles, back, interpolations)
    t0 = time.perf_counter()
    for name, x in imgs.items():
        if name in done:
            continue
        done[name] = np.asarray(run_bpd(run, x)[0], dtype=float).tolist()
        atomic.save_json({"key": key, "bpd": done}, partial)
        print(f"{name}: {np.mean(done[name]):.3f} bits/dim ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = np.asarray(done["original"])
    res = {}
    for name, x in imgs.items():
        b = np.asarray(done[name])
        d = b - base
        res[name] = {"mean": float(b.mean()), "gap": float(d.mean()), "gap_se": float(d.std(ddof=1) / np.sqrt(a.n)),
                     "positive": int((d > 0).sum()), "grey_share": grey_share(x), "bpd": b.tolist()}
    report = {**provenance.stamp(), "run": a.run, "run_digest": run.digest, "preset": run.preset.name,
              "preset_label": label(run.preset), "n": a.n, "images": a.images, "bpd_steps": run.preset.bpd_steps,
              "transforms": res}
    report["table"] = table(report)
    atomic.save_json(report, out / "rotation_angles.json")
    atomic.save_text(report["table"] + "\n", out / "rotation_angles.md")
    partial.unlink(missing_ok=True)
    print(report["table"])


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
