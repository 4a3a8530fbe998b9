"""Time of exact bits/dim per image, against the alternatives, as ratios measured in one process.

    python benchmarks/bench_likelihood.py [--run RUN | --preset cpu] [--batch 8] [--device cpu|cuda]

- exact, batched: engine.likelihood.bits_per_dim on a batch (the product's path: batched basis
  tangents through ScoreNet.jacobian_diagonal, checkpointed chunks);
- "whole-image tangents": the same through ScoreNet.forward_with_tangents, which carries every
  tangent over every pixel of every layer, where jacobian_diagonal keeps each tangent local (a
  window around pixel i plus coefficients on maps shared by all tangents) wherever it can;
- exact, generic: the same through torch.func.jvp on replicated inputs (any score_fn);
- exact, naive: one reverse-mode autograd.grad per coordinate (a Python loop over 784);
- Hutchinson, one probe, on the same grid (an unbiased but noisy estimate);
- exact BPD and its gradient w.r.t. the parameters: by backpropagation through the checkpointed
  solve, and by engine.likelihood.bits_per_dim_and_grad (two phases, what engine.bpd uses).
The two slow exact variants are timed over one ODE function evaluation and scaled by the
evaluations per BPD (4 per RK4 step); the rest are full BPD solves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data, likelihood as L  # noqa: E402
from engine.presets import PRESETS  # noqa: E402
from engine.training import make_model  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def naive_divergence(model, x, t):
    """Reverse mode, one coordinate at a time: the baseline the exact path replaces."""
    x = x.detach().requires_grad_(True)
    out = model(x, t).reshape(x.shape[0], -1)
    div = torch.zeros(x.shape[0], device=x.device)
    for i in range(out.shape[1]):
        g = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0].reshape(x.shape[0], -1)
        div += g[:, i]
    return div


class WholeImageTangents(torch.nn.Module):
    """The model without `jacobian_diagonal`: the exact divergence then takes the diagonal out of
    forward_with_tangents' whole-image J e_i (the path before jacobian_diagonal existed)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x, t)

    def forward_with_tangents(self, x, t, v):
        return self.model.forward_with_tangents(x, t, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--run", help="a run directory (default: the --preset's architecture, untrained)")
    which.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                       help="without --run: whose network, untrained (the cost does not depend on the weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="also write the table here, with the command and commit that made it")
    a = ap.parse_args()
    if a.batch < 1:
        sys.exit("error: --batch must be at least 1")
    from engine import provenance
    provenance.start()  # the code that runs is the checkout now, not when the table is written
    if a.run:
        from engine.store import load_run
        run = load_run(a.run)
        model, preset = run.model(a.device), run.preset
    else:
        preset = PRESETS[a.preset]
        model = make_model(preset, 0).to(a.device).eval()
    dev = a.device
    name = (torch.cuda.get_device_name() if dev.startswith("cuda")
            else f"{provenance.machine()}, {torch.get_num_threads()} threads")
    x, _ = data.load_test()
    xb = x[: a.batch].to(dev)
    x1 = x[:1].to(dev)
    t1 = torch.tensor([0.3], device=dev)
    evals = 4 * preset.bpd_steps
    kw = preset.likelihood_kwargs
    rows = {}
    with torch.no_grad():
        rows["exact, batched (B=%d)" % a.batch] = timed(lambda: L.bits_per_dim(model, xb, **kw)) / a.batch
        rows["exact, batch of 1"] = timed(lambda: L.bits_per_dim(model, x1, **kw))
        if hasattr(model, "jacobian_diagonal"):
            rows["exact, batch of 1, whole-image tangents"] = timed(lambda: L.bits_per_dim(WholeImageTangents(model), x1, **kw))
        rows["exact, generic torch.func.jvp"] = timed(lambda: L.exact_divergence(lambda z, s: model(z, s), x1, t1)) * evals
        rows["Hutchinson, 1 probe"] = timed(lambda: L.bits_per_dim(model, x1, divergence="hutchinson", **kw), repeat=3)
    rows["exact, naive per-coordinate loop"] = timed(lambda: naive_divergence(model, x1, t1)) * evals
    params = [p for p in model.parameters()]

    def with_grad():
        b = L.bits_per_dim(model, x1, **kw)
        torch.autograd.grad(b.sum(), params, allow_unused=True)
    rows["exact + gradient, backprop through solve"] = timed(with_grad)
    # what engine.bpd uses: phase 1 the path, phase 2 each divergence chunk differentiated at once
    rows["exact + gradient, two-phase (used)"] = timed(lambda: L.bits_per_dim_and_grad(model, x1, params, **kw))
    if hasattr(model, "jacobian_diagonal"):
        rows["exact + gradient, two-phase, whole-image tangents"] = timed(
            lambda: L.bits_per_dim_and_grad(WholeImageTangents(model), x1, params, **kw))

    base = rows["exact, batched (B=%d)" % a.batch]
    lines = [f"Exact BPD benchmark on {name}; preset {preset.name}"
             + (f" (run {a.run}, {preset.steps} steps, digest {run.digest[:12]}, trained)" if a.run
               else " (untrained: the architecture only)")
             + f", RK4 {preset.bpd_steps} steps ({evals} evaluations), {sum(p.numel() for p in params)} parameters",
             f"{'method':50s} {'s / image':>10s} {'x batched exact':>16s} {'x batch of 1':>13s}"]
    one = rows["exact, batch of 1"]
    lines += [f"{k:50s} {v:10.2f} {v / base:16.2f} {v / one:13.2f}" for k, v in rows.items()]
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
