"""Exact BPD per image, alone and with its gradient w.r.t. the parameters, against the number of
tangent inputs per network call (the `chunk` of engine.likelihood.exact_divergence), as ratios
against 196 (engine.likelihood.TANGENT_BATCH, the CPU's choice for a network without
`jacobian_diagonal`) measured in one process; the BPDs and gradients of every chunk size are
compared too (chunking only regroups the same products, so they may differ by rounding alone).

    python benchmarks/bench_tangent_batch.py [--preset gpu] [--images 2] [--steps 16]
        [--chunks 98,196,392,784] [--device cuda|cpu] [--no-grad] [--out FILE]

The network is the preset's, untrained (seed 0): the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data, device as devices, likelihood as L, provenance  # noqa: E402
from engine.presets import PRESETS  # noqa: E402
from engine.training import make_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="RK4 steps of the likelihood grid")
    ap.add_argument("--chunks", default="98,196,392,784")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-grad", dest="grad", action="store_false",
                    help="time the BPD alone, not also the BPD with its gradient w.r.t. the parameters")
    ap.add_argument("--out", help="also write the table here, with the command and commit that made it")
    a = ap.parse_args()
    try:
        chunks = [int(c) for c in a.chunks.split(",")]
    except ValueError:
        sys.exit("error: --chunks takes comma-separated integers")
    if a.images < 1 or a.steps < 1 or min(chunks) < 1 or 196 not in chunks:
        sys.exit("error: --images, --steps and every chunk must be >= 1, and --chunks must hold 196 (the baseline)")
    provenance.start()
    p = dataclasses.replace(PRESETS[a.preset], device=a.device)
    dev = devices.setup(p)
    model = make_model(p, 0).to(dev).eval()
    x = data.load_test()[0][: a.images].to(dev)
    kw = {**p.likelihood_kwargs, "n_steps": a.steps}
    with torch.no_grad():
        L.bits_per_dim(model, x[:1], **kw, chunk=max(chunks))  # warm-up (kernels, allocator)
        seconds, bpd = {}, {}
        for c in chunks:
            devices.synchronize(dev)
            t0 = time.perf_counter()
            bpd[c] = torch.cat([L.bits_per_dim(model, x[i: i + 1], **kw, chunk=c) for i in range(a.images)])
            devices.synchronize(dev)
            seconds[c] = (time.perf_counter() - t0) / a.images
    # with its gradient w.r.t. the parameters (two-phase, engine.likelihood.log_likelihood_and_grad):
    # what a query's attribution from a representation costs
    params = list(model.parameters())
    g_seconds, grads = {}, {}
    if a.grad:
        for c in chunks:
            devices.synchronize(dev)
            t0 = time.perf_counter()
            gs = [L.bits_per_dim_and_grad(model, x[i: i + 1], params, **kw, chunk=c)[1] for i in range(a.images)]
            devices.synchronize(dev)
            g_seconds[c] = (time.perf_counter() - t0) / a.images
            grads[c] = torch.cat([torch.cat([g.flatten() for g in gi]) for gi in gs])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    lines = [f"Exact BPD per image on {name}, `{a.preset}` network ({sum(q.numel() for q in model.parameters()):,} "
             f"parameters, untrained), {a.steps} RK4 steps, {a.images} test digits one at a time",
             f"{'tangents per call':>18} {'s per image':>12} {'x (196)':>8} {'max |BPD - BPD(196)|':>22}"
             + (f" {'s with gradient':>16} {'x (196)':>8} {'gradient rel. diff':>19}" if a.grad else "")]
    for c in chunks:
        row = (f"{c:>18} {seconds[c]:>12.3f} {seconds[c] / seconds[196]:>8.2f} "
               f"{float((bpd[c] - bpd[196]).abs().max()):>22.2e}")
        if a.grad:
            rel = float((grads[c] - grads[196]).norm() / grads[196].norm())
            row += f" {g_seconds[c]:>16.3f} {g_seconds[c] / g_seconds[196]:>8.2f} {rel:>19.2e}"
        lines.append(row)
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
