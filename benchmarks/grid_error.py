"""How accurate is the fixed likelihood grid? RK4 on n steps evenly spaced in log s(t),
against a tight adaptive solve (dopri5, rtol = atol = 1e-5), on a trained run.

    python benchmarks/grid_error.py --run runs/cpu [--n-images 2] [--steps 4 8 16]

Prints BPD per image for each grid and the reference, the errors in bits/dim, and the time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data, likelihood as L  # noqa: E402
from engine.store import load_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--n-images", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--out", help="also write the report here, with the command and commit that made it")
    a = ap.parse_args()
    from engine import provenance
    provenance.start()  # the code that runs is the checkout now, not when the table is written
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
    run = load_run(a.run)
    model, p = run.model(), run.preset
    x, _ = data.load_test()
    idx = data.query_indices(a.n_images)
    groups = {"test digits": x[idx], "rotated 90": data.rotate(x[idx], 90)}
    kw = dict(sigma=p.sigma, eps=p.t_eps)
    say(f"Likelihood grid error on {a.run} (preset {p.name}), test images {idx}")
    with torch.no_grad():
        for g, xs in groups.items():
            t0 = time.perf_counter()
            ref = L.bits_per_dim(model, xs, method="dopri5", rtol=1e-5, atol=1e-5, **kw)
            say(f"{g}: dopri5 reference {ref.numpy().round(4).tolist()}  ({time.perf_counter() - t0:.0f} s)")
            for n in a.steps:
                t0 = time.perf_counter()
                b = L.bits_per_dim(model, xs, n_steps=n, **kw)
                err = (b - ref).abs().max().item()
                say(f"  RK4 {n:3d} steps: {b.numpy().round(4).tolist()}  max |error| {err:.4f} bits/dim  "
                    f"({(time.perf_counter() - t0) / len(xs):.1f} s/image)")
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
