"""One training step's pullback for Q queries, by every method tried, timed in one process.

    python benchmarks/bench_pullback.py [--preset small] [--queries 8] [--threads N] [--out results/bench_pullback.txt]

The metagradient's cost per step is a replay of the step, the step rebuilt with its graph, and
one Hessian-vector product per query (the double backward). This script times those parts on
one step of the preset (after a few warm-up steps of training), and the Q-query pullback by:
autograd's `is_grads_batched`; a loop of plain backward calls over one retained graph;
`torch.func.vjp` of the step vmapped over the adjoints (what engine.metagrad uses for Q > 1);
and `torch.func` forward-over-reverse (vmap of jvp of grad; the loss's gradient only, so it
is a lower bound for the step); then the training step and the method used again, after
`engine.device.tune_allocator()`, against the default allocator. Each time is the best of
`--reps` runs, in milliseconds, with the ratio to a training step. All methods are checked to
agree before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data, device as devices, provenance, training as train  # noqa: E402
from engine.presets import get_preset  # noqa: E402
from engine.training import TrainState  # noqa: E402


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); a replay "
                    "chunk of precompute or LDS runs on 1")
    ap.add_argument("--out", help="also write the table here")
    a = ap.parse_args()
    provenance.start()
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")  # is_grads_batched warns about its per-query fallback
    p = get_preset(a.preset)
    images, _ = data.load_train(p.n_train, p.source)
    model = train.make_model(p, 0)
    s = train.init_state(model)
    w = torch.ones(images.shape[0])
    for _ in range(5):
        s, _ = train.train_step(model, s, images, w, 0, p)
    names, q = list(s.params), a.queries
    g = torch.Generator().manual_seed(0)
    adj = [torch.randn(q, *s.params[n].shape, generator=g) for n in names] * 3  # (theta, m, v) adjoints

    def build():
        leaves = {key: {n: d[n].detach().requires_grad_(True) for n in names}
                  for key, d in (("p", s.params), ("m", s.m), ("v", s.v))}
        wr = w.detach().requires_grad_(True)
        new, _ = train.train_step(model, TrainState(s.step, leaves["p"], leaves["m"], leaves["v"]),
                                  images, wr, 0, p, create_graph=True)
        outs = [d[n] for d in (new.params, new.m, new.v) for n in names]
        return outs, [leaves[key][n] for key in ("p", "m", "v") for n in names] + [wr]

    def one():
        outs, ins = build()
        return torch.autograd.grad(outs, ins, grad_outputs=[x[0] for x in adj], allow_unused=True)

    def batched():
        outs, ins = build()
        return torch.autograd.grad(outs, ins, grad_outputs=adj, is_grads_batched=True, allow_unused=True)

    def loop():
        outs, ins = build()
        return [torch.autograd.grad(outs, ins, grad_outputs=[x[i] for x in adj], retain_graph=True,
                                    allow_unused=True) for i in range(q)]

    def func_vjp():
        idx, f = train.step_function(model, s.step, images, 0, p)
        parts = [{n: d[n].detach() for n in names} for d in (s.params, s.m, s.v)]
        _, vjp_fn = torch.func.vjp(f, *parts, w[idx])
        nn = len(names)
        return torch.func.vmap(vjp_fn)(tuple({n: adj[j * nn + i] for i, n in enumerate(names)} for j in range(3)))

    idx = train.batch_indices(s.step, 0, images.shape[0], p.batch_size)
    t, z, u = train.step_noise(s.step, 0, p.batch_size, p.t_eps)
    params0 = {n: s.params[n].detach() for n in names}

    def fwd_over_rev():
        def grad_fn(pp):
            return torch.func.grad(lambda x: train.batch_loss(model, x, images[idx], w[idx], t, z, u))(pp)
        return torch.func.vmap(lambda v: torch.func.jvp(grad_fn, (params0,), (v,))[1])(
            {n: adj[i] for i, n in enumerate(names)})

    # agreement: the batched methods against one query at a time (parameter adjoint of query 0)
    ref = one()[0]
    for label, got in (("is_grads_batched", batched()[0][0]), ("loop", loop()[0][0]),
                       ("torch.func.vjp", func_vjp()[0][names[0]][0])):
        err = float((got - ref).norm() / ref.norm())
        if err > 1e-4:
            sys.exit(f"error: {label} disagrees with one query at a time (relative error {err:.1e})")

    step_ms = best_ms(lambda: train.train_step(model, s, images, w, 0, p), a.reps)
    rows = [("training step (= replay of a step)", step_ms),
            ("step rebuilt with its graph", best_ms(build, a.reps)),
            ("rebuilt + 1 query, plain backward", best_ms(one, a.reps)),
            (f"rebuilt + {q} queries, is_grads_batched", best_ms(batched, a.reps)),
            (f"rebuilt + {q} queries, loop of plain backward", best_ms(loop, a.reps)),
            (f"{q} queries, torch.func.vjp vmapped (used)", best_ms(func_vjp, a.reps)),
            (f"{q} queries, forward-over-reverse (loss only)", best_ms(fwd_over_rev, a.reps))]
    lines = [f"# bench_pullback: preset {p.name} (B={p.batch_size}), one step, CPU {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}", f"{'stage':48s} {'ms':>8s} {'/ step':>7s}"]
    lines += [f"{label:48s} {ms:8.1f} {ms / step_ms:7.2f}" for label, ms in rows]
    # The engine's processes tune glibc's allocator (engine.device.setup); everything above ran
    # with the default one. Once tuned, a process cannot go back, so the tuned times come last.
    if devices.tune_allocator():
        tuned = [("training step", step_ms, best_ms(lambda: train.train_step(model, s, images, w, 0, p), a.reps)),
                 (f"{q} queries, torch.func.vjp vmapped", rows[5][1], best_ms(func_vjp, a.reps))]
        lines += ["", "with engine.device.tune_allocator() (what the engine runs)",
                  f"{'stage':48s} {'ms':>8s} {'default / tuned':>16s}"]
        lines += [f"{label:48s} {ms:8.1f} {before / ms:16.2f}" for label, before, ms in tuned]
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
