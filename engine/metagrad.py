"""The metagradient: d Phi(theta_T(w)) / d w through every Adam step of a stored run (REPLAY).

Going backwards through training, each step k is rebuilt from its state s_k with
create_graph=True and a single vector-Jacobian product (a double backward, since the step
contains a gradient) pulls the adjoint of s_{k+1} = (theta, m, v) back to s_k. The same
product yields the step's contribution to d Phi / d w (non-zero only on the step's batch), so
per-example gradients of the whole training set are never formed. Q queries share every
replay and every step's graph, and their adjoints go through one batched backward call
(`is_grads_batched`, a vmap over the adjoints).

States are needed in reverse order; two schemes recompute them:
- "sqrt" (default): the run stores s_k every ~sqrt(T) steps; each stored segment is replayed
  once, keeping its <= sqrt(T) states in memory. Cost: one extra pass of training.
- "segment": like "sqrt", but each step of a segment is built once, with its graph, and the
  graphs are kept until the segment is reversed. No separate replay (one pass of training less:
  the step is rebuilt anyway), for memory of ~sqrt(T) step graphs instead of one.
- "kary": needs only s_0. The range is cut into k parts, replayed keeping the k part starts,
  and each part is reversed recursively. Memory O(k log_k T) states, cost about
  log_k T extra passes of training: for long runs whose stored states would not fit.
Replay is bit-exact (training is deterministic given the state), so both schemes give the
same numbers.

Memory: O(stored states of the scheme + one step's double-backward graph for Q adjoints);
"segment" holds a whole segment's graphs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.store import Run
from engine.train import TrainState, make_model, resolve_device, train_step

SCHEMES = ("sqrt", "segment", "kary")


def metagradient(run: Run, images: torch.Tensor, query_grads: list[dict[str, torch.Tensor]], *,
                 scheme: str = "sqrt", k: int = 4,
                 callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """d Phi_q / d w for every query q and training example.

    Args:
        run: a finished run (its checkpoints, weights, seed and preset define the training).
        images: (n, 1, 28, 28) the run's training images.
        query_grads: Q dicts {parameter name: d Phi_q / d theta_T}, e.g. the BPD gradient.
        scheme: "sqrt" (stored checkpoints), "segment" (stored checkpoints, a segment's graphs
            kept: faster, more memory) or "kary" (recursive from s_0, k parts per level).
        callback: gets {"i", "n"} after every backward step (n = T).
    Returns:
        (Q, n) metagradients.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown checkpoint scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "kary" and k < 2:
        raise ValueError("the k-ary scheme needs k >= 2")
    sweep = _Sweep(run, images, query_grads, callback)
    steps = run.preset.steps
    if scheme in ("sqrt", "segment"):
        starts = run.checkpoint_steps()
        for start, end in zip(reversed(starts), reversed(starts[1:] + [steps])):
            if scheme == "sqrt":
                sweep.reverse(sweep.load(start), end, k=None)
            else:
                sweep.reverse_kept(sweep.load(start), end)
    else:
        sweep.reverse(sweep.load(0), steps, k=k)
    return sweep.grad_w.cpu()


class _Sweep:
    """The backward sweep's running state: Q adjoints of (params, m, v) and the (Q, n) result."""

    def __init__(self, run, images, query_grads, callback):
        p = run.preset
        self.run, self.preset, self.seed, self.callback = run, p, run.seed, callback
        self.dev = resolve_device(p)
        self.images = images.to(self.dev, p.torch_dtype)
        self.w = torch.from_numpy(run.weights()).to(self.dev, p.torch_dtype)
        self.model = make_model(p, run.seed).to(self.dev)
        self.names = list(query_grads[0])
        # adjoint of s_T: dPhi/dtheta on the parameters, nothing on the moments; (Q, ...) each
        g = [torch.stack([q[n].detach().to(self.dev, p.torch_dtype) for q in query_grads]) for n in self.names]
        self.adj = g + [torch.zeros_like(x) for x in g] * 2
        self.grad_w = torch.zeros(len(query_grads), self.w.shape[0], dtype=p.torch_dtype)
        self.done = 0

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
        graphs = []
        while True:
            graphs.append(self.build(s))
            if s.step + 1 >= end:
                break
            s = graphs[-1][0].map(lambda x: x.detach())
        while graphs:
            self.backprop(*graphs.pop())

    def build(self, s: TrainState) -> tuple:
        """Step s.step rebuilt with create_graph=True: (new state, its leaves (inputs))."""
        names = self.names
        leaves = {key: {n: d[n].detach().requires_grad_(True) for n in names}
                  for key, d in (("p", s.params), ("m", s.m), ("v", s.v))}
        wr = self.w.detach().requires_grad_(True)
        new, _ = train_step(self.model, TrainState(s.step, leaves["p"], leaves["m"], leaves["v"]),
                            self.images, wr, self.seed, self.preset, create_graph=True)
        return new, [leaves[key][n] for key in ("p", "m", "v") for n in names] + [wr]

    def pullback(self, s: TrainState) -> None:
        """Adjoint of s_{k+1} -> adjoint of s_k, and step k's d Phi / d w terms, for all Q at once."""
        self.backprop(*self.build(s))

    def backprop(self, new: TrainState, inputs: list) -> None:
        names = self.names
        outs = [new.params[n] for n in names] + [new.m[n] for n in names] + [new.v[n] for n in names]
        if len(self.grad_w) == 1:
            # One query: a plain backward; is_grads_batched's vmap over a batch of one costs ~10%
            # more on CPU (benchmarks/bench_metagrad.py).
            g = torch.autograd.grad(outs, inputs, grad_outputs=[a[0] for a in self.adj], allow_unused=True)
            g = [None if gi is None else gi[None] for gi in g]
        else:
            g = torch.autograd.grad(outs, inputs, grad_outputs=self.adj, is_grads_batched=True, allow_unused=True)
        self.adj = [gi.detach() if gi is not None else torch.zeros_like(a) for gi, a in zip(g[:-1], self.adj)]
        if g[-1] is not None:
            self.grad_w += g[-1].detach()
        self.done += 1
        if self.callback is not None:
            self.callback({"i": self.done, "n": self.preset.steps})
