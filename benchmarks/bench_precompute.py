"""What a new image's attribution costs: from a precomputed representation against the replay.

    python benchmarks/bench_precompute.py --run runs/small [--rep lowrank64] [--out results/bench_precompute.txt]

One process, one test digit, timed in this order: the exact BPD alone (no gradient); the BPD with
its gradient w.r.t. the final parameters by backpropagation through the solve (the former path)
and in two phases (engine.likelihood.bits_per_dim_and_grad, what engine.bpd uses); the product
A (B g) of each representation the run has; and the whole per-query replay (engine.attribution.
attribute: BPD, gradient and one reverse replay of training). Then the precompute's own cost,
read from each representation's file (compute seconds summed over its chunks, as a multiple of
the run's training time measured here by training it again, and bytes on disk). Ratios are against the BPD alone, measured here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data, likelihood as L  # noqa: E402
from engine.attribution import attribute  # noqa: E402
from engine.bpd import model_for  # noqa: E402
from engine.precompute import representation as R  # noqa: E402
from engine.precompute.tangents import flatten  # noqa: E402
from engine.store import load_run  # noqa: E402
from engine.training import make_model, train  # noqa: E402


STEPS_TIMED = 40


class _Enough(Exception):
    pass


def per_step(fn) -> float:
    """Seconds per step of fn(callback), which calls callback after every step: steps 2 to
    STEPS_TIMED + 1 are timed, then fn is stopped."""
    marks = []

    def cb(info):
        marks.append(time.perf_counter())
        if len(marks) > STEPS_TIMED + 1:
            raise _Enough
    try:
        fn(cb)
    except _Enough:
        pass
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/small")
    ap.add_argument("--rep", default=None, help="representations to time, comma-separated (default: all the run has)")
    ap.add_argument("--query", type=int, default=0, help="test-set index of the query digit")
    ap.add_argument("--out", help="also write the table here, with the command and commit that made it")
    a = ap.parse_args()
    from engine import provenance
    provenance.start()
    run = load_run(a.run)
    p = run.preset
    model = model_for(p, run.seed, run.load_final().model_params)
    params = list(model.parameters())
    x = data.load_test()[0][a.query: a.query + 1].to(next(model.parameters()).device, p.torch_dtype)
    kw = p.likelihood_kwargs
    rows: list[tuple[str, float]] = []
    with torch.no_grad():
        L.bits_per_dim(model, x, **kw)  # warm-up
        base, _ = timed(lambda: L.bits_per_dim(model, x, **kw))
    rows.append(("exact BPD alone", base))

    def backprop():
        b = L.bits_per_dim(model, x, **kw)
        return torch.autograd.grad(b.sum(), params, allow_unused=True)
    rows.append(("BPD + gradient, backprop through the solve", timed(backprop)[0]))
    t_grad, (_, g) = timed(lambda: L.bits_per_dim_and_grad(model, x, params, **kw))
    rows.append(("BPD + gradient, two-phase (used)", t_grad))
    flat = flatten(dict(zip([n for n, _ in model.named_parameters()], g))).cpu().numpy()[None]
    names = [n for n in (a.rep.split(",") if a.rep else R.available(run))]
    reps = {n: R.load(run, n) for n in names}
    for n, rep in reps.items():
        t_prod, _ = timed(lambda: rep.scores(flat))
        rows.append((f"{n}: product A (B g)", t_prod))
        rows.append((f"{n}: new image's attribution (BPD + gradient + product)", t_grad + t_prod))
    t_replay, _ = timed(lambda: attribute(run, x.cpu()))
    rows.append(("per-query replay (BPD + gradient + replay of training)", t_replay))

    t_train, _ = timed(lambda: train(p, seed=run.seed, weights=run.weights()))  # for scale, here and now
    # the precompute's unit costs, timed here per training step over STEPS_TIMED steps (after one
    # warm-up step) and scaled: a chunk of 8 directions forward (engine.precompute.tangents) and
    # 8 adjoints backward (engine.metagrad), against a training step
    from engine.metagrad import metagradient
    from engine.precompute.tangents import flat_to_dicts, forward_tangents
    images = data.load_train(p.n_train, p.source)[0]
    omega = torch.randn(8, p.n_train, generator=torch.Generator().manual_seed(0))
    q = torch.randn(8, flat.shape[1], generator=torch.Generator().manual_seed(1))
    fwd8 = per_step(lambda cb: forward_tangents(run, images, omega, callback=cb))
    rev8 = per_step(lambda cb: metagradient(run, images, flat_to_dicts(q, run.load_final().model_params), callback=cb))
    step = t_train / p.steps
    dev = (torch.cuda.get_device_name() if x.is_cuda
           else f"{provenance.machine()}, {torch.get_num_threads()} threads")
    lines = [f"Per-query cost on {dev}; run {a.run} (preset {p.name}, n = {p.n_train}, {p.steps} steps, "
             f"{sum(q.numel() for q in params)} parameters), test digit {a.query}",
             f"{'stage':58s} {'seconds':>9s} {'x BPD':>7s} {'replay /':>9s}"]
    lines += [f"{k:58s} {v:9.2f} {v / base:7.2f} {t_replay / v:9.2f}" for k, v in rows]
    lines += ["", f"Precompute cost (compute seconds as the chunks recorded them, on the machine that computed them; "
              f"training the run here took {t_train:.1f} s)",
              f"{'representation':16s} {'rank':>5s} {'compute s':>10s} {'x training':>11s} {'MB on disk':>11s}"]
    for n, rep in reps.items():
        info = rep.info
        mb = (R.folder(run) / f"{n}.npz").stat().st_size / 2**20
        lines.append(f"{n:16s} {int(info.get('rank', 0)):5d} {float(info.get('seconds', np.nan)):10.0f} "
                     f"{float(info.get('seconds', np.nan)) / t_train:11.1f} {mb:11.2f}")
    n_p = sum(q_.numel() for q_ in params)
    lines += ["", f"Unit costs per training step, timed here over {min(STEPS_TIMED, p.steps - 1)} steps: a training step {step * 1e3:.1f} ms; "
              f"8 forward tangents {fwd8 * 1e3:.1f} ms ({fwd8 / step:.1f} steps); 8 reverse adjoints {rev8 * 1e3:.1f} ms "
              f"({rev8 / step:.1f} steps). So, in multiples of training:"]
    lines.append(f"{'preset':8s} {'n':>6s} {'P':>9s} {'exact: x training':>18s} {'exact GB':>9s} "
                 f"{'lowrank64: x training':>22s} {'lowrank64 MB':>13s} {'basis64: x training':>20s} {'basis64 MB':>11s}")
    from engine.presets import PRESETS
    for name in (p.name, "gpu"):
        pp = PRESETS[name]
        pn = n_p if name == p.name else sum(t.numel() for t in make_model(pp, 0).parameters())
        exact_x = pp.n_train / 8 * fwd8 / step
        low_x = 64 / 8 * (fwd8 + rev8) / step
        basis_x = 64 / 8 * rev8 / step  # the replays; the 64 BPD gradients come on top (below)
        lines.append(f"{name:8s} {pp.n_train:6d} {pn:9d} {exact_x:18.0f} {pp.n_train * pn * 4 / 1e9:9.2f} "
                     f"{low_x:22.0f} {(pp.n_train + pn) * 64 * 4 / 2**20:13.1f} {basis_x:20.0f} "
                     f"{(pp.n_train + pn) * 64 * 4 / 2**20:11.1f}")
    lines.append(f"(`{p.name}` as measured here; `gpu` on paper, if its step ratios were those measured here; basis64 "
                 f"adds 64 BPD gradients, {64 * t_grad / t_train:.0f}x training here, independent of training length)")
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
