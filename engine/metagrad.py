"""The metagradient: d Phi(theta_T(w)) / d w through every Adam step of a stored run (REPLAY).

Going backwards through training, each step k is rebuilt from its state s_k with
create_graph=True and a single vector-Jacobian product (a double backward, since the step
contains a gradient) pulls the adjoint of s_{k+1} = (theta, m, v) back to s_k. The same
product yields the step's contribution to d Phi / d w (non-zero only on the step's batch), so
per-example gradients of the whole training set are never formed. Q queries share every
replay and every step's linearization: their adjoints go through one vmapped
torch.func.vjp of the step.

States are needed in reverse order; two schemes recompute them:
- "sqrt" (default): the run stores s_k every ~sqrt(T) steps; each stored segment is replayed
  once, keeping its <= sqrt(T) states in memory. Cost: one extra pass of training.
- "segment": like "sqrt", but each step of a segment is built once, with its graph, and the
  graphs are kept until the segment is reversed. No separate replay (one pass of training less:
  the step is rebuilt anyway), for memory of ~sqrt(T) step graphs instead of one.
- "kary": needs only s_0. The range is cut into k parts, replayed keeping the k part starts,
  and each part is reversed recursively. Memory O(k log_k T) states, cost about
  log_k T extra passes of training: for long runs whose stored states would not fit.
Replay is bit-exact (training is deterministic given the state), so "sqrt" and "kary"
linearize at training's own states. "segment" takes each next state from the step it built for
differentiation (autograd with create_graph for one query, the torch.func step for several),
whose gradient rounds differently from training's (relative differences ~1e-7 in float32), so
it agrees with "sqrt" to float precision (1e-6 relative in tests/test_metagrad.py), not bit for
bit, even for one query. That is why nothing uses it by default, although it is faster: for one
query on the `cpu` default 271.4 s against 340.3 s, 7.1 GB at peak against 0.4 GB
(results/bench_metagrad_cpu.txt).

Resume: with `resume=PATH` (schemes "sqrt" and "segment"), the sweep's state (the Q adjoints
and the partial (Q, n) result, a few MB) is written atomically to PATH after every stored
segment, stamped with the run, the scheme and a sha256 of the queries. A later call with the
same PATH and queries starts from the last finished segment and gives the same result bit for
bit (the states are reloaded from the same checkpoints); a file made for anything else is
ignored. Long sweeps (a precompute chunk is hours on CPU) so survive being killed.

Memory: O(stored states of the scheme + one step's double-backward graph for Q adjoints; the
vmapped pullback holds Q copies of the step's activation-sized intermediates, 370 MB above
the sweep for Q = 8 on `small`); "segment" holds a whole segment's graphs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine import atomic
from engine.errors import UserError
from engine.store import Run
from engine import device as devices
from engine.training import TrainState, make_model, step_function, train_step

SCHEMES = ("sqrt", "segment", "kary")
log = logging.getLogger("engine")


def metagradient(run: Run, images: torch.Tensor, query_grads: list[dict[str, torch.Tensor]], *,
                 scheme: str = "sqrt", k: int = 4,
                 callback: Optional[Callable[[dict], None]] = None,
                 resume: Optional[Path] = None, partial_every: Optional[int] = None) -> torch.Tensor:
    """d Phi_q / d w for every query q and training example.

    Args:
        run: a finished run (its checkpoints, weights, seed and preset define the training).
        images: (n, 1, 28, 28) the run's training images.
        query_grads: Q dicts {parameter name: d Phi_q / d theta_T}, e.g. the BPD gradient.
        scheme: "sqrt" (stored checkpoints), "segment" (stored checkpoints, a segment's graphs
            kept: faster, more memory) or "kary" (recursive from s_0, k parts per level).
        callback: gets {"i", "n"} after every backward step (n = T), and once when a sweep
            resumes: {"i": steps already done, "n", "seconds": the compute they took}.
        resume: a file for the sweep's state after each stored segment ("sqrt", "segment"):
            resumed from if it matches, left in place when done (the caller removes it once
            the result is safely stored).
        partial_every: every this many backward steps (before the last), the callback's dict
            also holds "grad_w": (Q, n) float64, the sum so far, i.e. the exact derivative with
            respect to the weights that the last i training steps used, which a partly
            finished sweep can already show (engine.attribution.progressive).
    Returns:
        (Q, n) metagradients.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown checkpoint scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "kary" and k < 2:
        raise ValueError("the k-ary scheme needs k >= 2")
    if resume is not None and scheme == "kary":
        raise ValueError("resume needs a scheme with stored segments (sqrt or segment)")
    steps = run.preset.steps
    starts = check_trajectory(run)
    sweep = _Sweep(run, images, query_grads, callback, partial_every)
    if scheme in ("sqrt", "segment"):
        segments = list(zip(reversed(starts), reversed(starts[1:] + [steps])))
        stamp = _resume_stamp(run, query_grads, scheme) if resume is not None else None
        first = sweep.restore(Path(resume), stamp) if resume is not None else 0
        for i, (start, end) in enumerate(segments[first:], start=first):
            if scheme == "sqrt":
                sweep.reverse(sweep.load(start), end, k=None)
            else:
                sweep.reverse_kept(sweep.load(start), end)
            if resume is not None and i + 1 < len(segments):
                sweep.save(Path(resume), stamp, i + 1)
    else:
        sweep.reverse(sweep.load(0), steps, k=k)
    return sweep.grad_w.cpu()


def check_trajectory(run: Run) -> list[int]:
    """The stored steps of the run's trajectory, after checking that none is missing: a gap
    would silently drop those steps' contributions from every metagradient."""
    expected = list(range(0, run.preset.steps, run.preset.ckpt_every))
    have = run.checkpoint_steps()
    missing = sorted(set(expected) - set(have))
    if missing:
        raise UserError(f"run {run.path} has an incomplete trajectory: traj/step_{missing[0]:06d}.pt"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} missing; retrain it "
                        f"(python -m engine train --preset {run.preset.name} --out NEW --seed {run.seed})")
    return expected


def resume_path(result: Path) -> Path:
    """Where a job that writes `result` keeps its sweep's state: rev_0003.npz -> rev_0003.sweep.npz."""
    result = Path(result)
    return result.with_name(result.stem + ".sweep.npz")


def _resume_stamp(run: Run, query_grads: list[dict[str, torch.Tensor]], scheme: str) -> dict:
    """What a saved sweep state must match: the run (its digest covers config, seed and the
    weights w), the scheme (their bits differ), and the queries."""
    h = hashlib.sha256()
    for q in query_grads:
        for n, t in q.items():
            h.update(n.encode())
            h.update(t.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return {"run_digest": run.digest, "scheme": scheme, "queries_sha256": h.hexdigest()}


class _Sweep:
    """The backward sweep's running state: Q adjoints of (params, m, v) and the (Q, n) result."""

    def __init__(self, run, images, query_grads, callback, partial_every: Optional[int] = None):
        p = run.preset
        self.run, self.preset, self.seed, self.callback = run, p, run.seed, callback
        self.dev = devices.setup(p)
        self.images = images.to(self.dev, p.torch_dtype)
        self.w = torch.from_numpy(run.weights()).to(self.dev, p.torch_dtype)
        self.model = make_model(p, run.seed).to(self.dev)
        self.names = list(query_grads[0])
        # adjoint of s_T: dPhi/dtheta on the parameters, nothing on the moments; (Q, ...) each
        g = [torch.stack([q[n].detach().to(self.dev, p.torch_dtype) for q in query_grads]) for n in self.names]
        # The model's weights are sum_k c_k theta_k (the last iterate, or the moving average):
        # the adjoint of s_T gets c_T g, and each pullback that lands on s_k adds c_k g.
        self.g, self.c = (g, p.ema_weights().tolist()) if p.ema else (None, None)
        self.adj = [x * self.c[-1] for x in g] if p.ema else list(g)
        self.adj += [torch.zeros_like(x) for x in g] * 2
        self.grad_w = torch.zeros(len(query_grads), self.w.shape[0], dtype=p.torch_dtype, device=self.dev)
        self.done = 0
        self.partial_every = partial_every
        self.t0, self.seconds_before = time.perf_counter(), 0.0

    def save(self, path: Path, stamp: dict, segments: int) -> None:
        """The state after `segments` finished segments (from the end), atomically."""
        arrays = {f"adj_{i:04d}": a.detach().cpu().numpy() for i, a in enumerate(self.adj)}
        atomic.save_npz(path, grad_w=self.grad_w.detach().cpu().numpy(), segments=np.array(segments),
                        done=np.array(self.done), seconds=np.array(self.seconds_before + time.perf_counter() - self.t0),
                        **arrays, **{k: np.array(v) for k, v in stamp.items()})

    def restore(self, path: Path, stamp: dict) -> int:
        """Load a saved state that matches `stamp`; returns the segments it finished (0: none)."""
        from engine.files import read_stamped
        arrays, why = read_stamped(path, stamp)
        if arrays is None:
            if path.exists():
                log.info("not resuming the replay from %s: %s", path.name, why)
            return 0
        keys = [f"adj_{i:04d}" for i in range(len(self.adj))]
        if (any(k not in arrays for k in keys + ["grad_w", "segments", "done", "seconds"])
                or any(arrays[k].shape != tuple(a.shape) for k, a in zip(keys, self.adj))
                or arrays["grad_w"].shape != tuple(self.grad_w.shape)):
            log.info("not resuming the replay from %s: it does not hold this sweep's state", path.name)
            return 0
        self.adj = [torch.from_numpy(arrays[k]).to(self.dev, a.dtype) for k, a in zip(keys, self.adj)]
        self.grad_w = torch.from_numpy(arrays["grad_w"]).to(self.dev, self.grad_w.dtype)
        self.done = int(arrays["done"])
        self.seconds_before = float(arrays["seconds"])
        log.info("resuming the replay from %s: %d of %d steps done", path.name, self.done, self.preset.steps)
        if self.callback is not None:
            self.callback({"i": self.done, "n": self.preset.steps, "seconds": self.seconds_before})
        return int(arrays["segments"])

    def load(self, step: int) -> TrainState:
        return self.run.load_checkpoint(step)[0].map(lambda x: x.to(self.dev))

    def step(self, s: TrainState) -> TrainState:
        return train_step(self.model, s, self.images, self.w, self.seed, self.preset)[0]

    def reverse(self, s: TrainState, end: int, k: Optional[int]) -> None:
        """Pull the adjoints back from s_end to s_start (s = s_start). k=None: keep every state."""
        start = s.step
        if k is None or end - start <= k:
            states = [s]
            for _ in range(start, end - 1):
                states.append(self.step(states[-1]))
            for st in reversed(states):
                self.pullback(st)
            return
        bounds = [start + (end - start) * i // k for i in range(k + 1)]
        marks = [s]
        for i in range(1, k):
            while s.step < bounds[i]:
                s = self.step(s)
            marks.append(s)
        for i in reversed(range(k)):
            self.reverse(marks[i], bounds[i + 1], k)

    def reverse_kept(self, s: TrainState, end: int) -> None:
        """The "segment" scheme: build every step of [s.step, end) with its graph, then pull back."""
        pulls = []
        while True:
            s, pull = self.build(s)
            pulls.append(pull)
            if s.step >= end:
                break
        while pulls:
            pulls.pop()()

    def build(self, s: TrainState) -> tuple[TrainState, Callable[[], None]]:
        """Step s.step rebuilt for differentiation: (the next state, detached; its pullback).

        Calling the pullback maps the adjoint of s_{k+1} to that of s_k and adds step k's
        d Phi / d w terms, for all Q queries at once. One query: autograd with create_graph and
        a plain backward. Several: torch.func.vjp of the step, vmapped over the Q adjoints;
        autograd's is_grads_batched over the same graph falls back to a per-query loop for the
        double backward of convolutions and GroupNorm, and measured 10-15% slower than this
        for 8 queries on `small` (and a plain backward is ~25% faster than torch.func for one).
        """
        if len(self.grad_w) == 1:
            return self._build_autograd(s)
        return self._build_func(s)

    def _build_autograd(self, s: TrainState) -> tuple[TrainState, Callable[[], None]]:
        names = self.names
        leaves = {key: {n: d[n].detach().requires_grad_(True) for n in names}
                  for key, d in (("p", s.params), ("m", s.m), ("v", s.v))}
        wr = self.w.detach().requires_grad_(True)
        new, _ = train_step(self.model, TrainState(s.step, leaves["p"], leaves["m"], leaves["v"]),
                            self.images, wr, self.seed, self.preset, create_graph=True)
        outs = [new.params[n] for n in names] + [new.m[n] for n in names] + [new.v[n] for n in names]
        inputs = [leaves[key][n] for key in ("p", "m", "v") for n in names] + [wr]

        def pull() -> None:
            g = torch.autograd.grad(outs, inputs, grad_outputs=[a[0] for a in self.adj], allow_unused=True)
            self.adj = [gi.detach()[None] if gi is not None else torch.zeros_like(a)
                        for gi, a in zip(g[:-1], self.adj)]
            if g[-1] is not None:
                self.grad_w[0] += g[-1].detach()
            self._landed(s.step)
        return new.map(lambda x: x.detach()), pull

    def _build_func(self, s: TrainState) -> tuple[TrainState, Callable[[], None]]:
        names = self.names
        idx, f = step_function(self.model, s.step, self.images, self.seed, self.preset)
        parts = [{n: d[n].detach() for n in names} for d in (s.params, s.m, s.v)]
        idx = idx.to(self.dev)
        (p, m, v), vjp_fn = torch.func.vjp(f, *parts, self.w[idx])

        def pull() -> None:
            nn = len(names)
            cot = tuple({n: self.adj[j * nn + i] for i, n in enumerate(names)} for j in range(3))
            gp, gm, gv, gw = torch.func.vmap(vjp_fn)(cot)
            self.adj = [d[n] for d in (gp, gm, gv) for n in names]
            self.grad_w.index_add_(1, idx, gw)
            self._landed(s.step)
        return TrainState(s.step + 1, p, m, v), pull

    def pullback(self, s: TrainState) -> None:
        """Adjoint of s_{k+1} -> adjoint of s_k, and step k's d Phi / d w terms, for all Q at once."""
        self.build(s)[1]()

    def _landed(self, k: int) -> None:
        """The adjoints now belong to s_k: add iterate k's share of the output, then report."""
        if self.c is not None and k >= 1:
            for a, g in zip(self.adj[:len(self.g)], self.g):  # the parameters' adjoints come first
                a.add_(g, alpha=self.c[k - 1])
        self._tick()

    def _tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            info = {"i": self.done, "n": self.preset.steps}
            if self.partial_every and self.done % self.partial_every == 0 and self.done < self.preset.steps:
                info["grad_w"] = self.grad_w.detach().cpu().numpy().astype(np.float64)
            self.callback(info)
