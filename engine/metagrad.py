"""The metagradient: d Phi(theta_T(w)) / d w through every Adam step of a stored run (REPLAY).

The run stores Adam's state every ~sqrt(T) steps. Going backwards segment by segment, we
replay the segment forward from its stored state (keeping its <= sqrt(T) states in memory),
then for each step k, last to first, build that one step with create_graph=True and take a
single vector-Jacobian product (a double backward, since the step contains a gradient) of
the adjoint of s_{k+1} = (theta, m, v). It yields both the adjoint of s_k and the step's
contribution to d Phi / d w (non-zero only on the step's batch). Per-example gradients of the
whole training set are never formed. Q queries share each replay and each step's graph.

Memory: O(stored checkpoints + one segment of states + one step's double-backward graph).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.store import Run
from engine.train import TrainState, make_model, train_step


def metagradient(run: Run, images: torch.Tensor, query_grads: list[dict[str, torch.Tensor]], *,
                 callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """d Phi_q / d w for every query q and training example.

    Args:
        run: a finished run (its checkpoints, weights, seed and preset define the training).
        images: (n, 1, 28, 28) the run's training images.
        query_grads: Q dicts {parameter name: d Phi_q / d theta_T}, e.g. the BPD gradient.
        callback: gets {"i", "n"} after every backward step.
    Returns:
        (Q, n) metagradients.
    """
    preset, seed = run.preset, run.seed
    dtype = preset.torch_dtype
    images = images.to(dtype)
    w = torch.from_numpy(run.weights()).to(dtype)
    model = make_model(preset, seed)
    names = list(query_grads[0])
    q = len(query_grads)
    # adjoints of (params, m, v) at step T: dPhi/dtheta, and nothing on the moments
    adj = [[g[n].detach().clone() for n in names] + [torch.zeros_like(g[n]) for n in names] * 2 for g in query_grads]
    grad_w = torch.zeros(q, w.shape[0], dtype=dtype)
    starts = run.checkpoint_steps()
    ends = starts[1:] + [preset.steps]
    done = 0
    for start, end in zip(reversed(starts), reversed(ends)):
        state, _ = run.load_checkpoint(start)
        states = [state]
        for _ in range(start, end - 1):
            state, _ = train_step(model, state, images, w, seed, preset)
            states.append(state)
        for s in reversed(states):
            grad_w += _step_vjp(model, s, images, w, seed, preset, names, adj)
            done += 1
            if callback is not None:
                callback({"i": done, "n": preset.steps})
    return grad_w


def _step_vjp(model, s: TrainState, images, w, seed, preset, names, adj) -> torch.Tensor:
    """Pull every adjoint of s_{k+1} back through step k, in place; return (Q, n) dPhi/dw terms."""
    leaves = {key: {n: d[n].detach().requires_grad_(True) for n in names} for key, d in (("p", s.params), ("m", s.m), ("v", s.v))}
    wr = w.detach().requires_grad_(True)
    new, _ = train_step(model, TrainState(s.step, leaves["p"], leaves["m"], leaves["v"]), images, wr, seed, preset, create_graph=True)
    outs = [new.params[n] for n in names] + [new.m[n] for n in names] + [new.v[n] for n in names]
    inputs = [leaves[k][n] for k in ("p", "m", "v") for n in names] + [wr]
    out = torch.zeros(len(adj), w.shape[0], dtype=w.dtype)
    for i, a in enumerate(adj):
        g = torch.autograd.grad(outs, inputs, grad_outputs=a, retain_graph=i < len(adj) - 1, allow_unused=True)
        adj[i] = [gi.detach() if gi is not None else torch.zeros_like(x) for gi, x in zip(g[:-1], inputs[:-1])]
        if g[-1] is not None:
            out[i] = g[-1].detach()
    return out
