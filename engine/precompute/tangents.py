"""Forward-mode derivatives through training: J Omega for directions Omega in weight space.

J = d theta_T / d w (P x n). For K directions omega_k (n,), the tangent of the training state
s_k = (theta, m, v) is carried forward step by step: step k maps (s_k, w) to s_{k+1}, so

    ds_{k+1} = (d step / d s) ds_k + (d step / d w_batch) omega[batch_k],

one Jacobian-vector product of the step (a forward-over-reverse derivative, since the step
contains a gradient) per direction, all K at once through torch.func.vmap of torch.func.jvp.
The primal states come from train_step itself (the run's bit-exact training), not from the
JVP, so the linearization points are exactly those of the reverse replay (engine.metagrad).
After the last step, dtheta_T = J omega_k (with a moving average of the iterates, the
same average of their tangents). Memory: 3 K P floats for the tangents plus one
step's graph for K tangents; cost about one Hessian-vector product per direction and step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine import device as devices
from engine.store import Run
from engine.training import init_state, make_model, step_function, train_step


def forward_tangents(run: Run, images: torch.Tensor, omega: torch.Tensor, *,
                     callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """J omega_k for every direction: omega (K, n) -> (K, P) in named_parameters order.

    Training is replayed from step 0 (its initial state is a function of the seed), so the
    run's stored trajectory is not needed. callback gets {"i", "n"} after every step (n = T).
    """
    p = run.preset
    dev = devices.setup(p)
    model = make_model(p, run.seed).to(dev)
    images = images.to(dev, p.torch_dtype)
    w = torch.from_numpy(run.weights()).to(dev, p.torch_dtype)
    omega = omega.to(dev, p.torch_dtype)
    state = init_state(model).map(lambda x: x.to(dev))
    names = list(state.params)
    k = omega.shape[0]
    tan = [{n: torch.zeros(k, *state.params[n].shape, dtype=p.torch_dtype, device=dev) for n in names}
           for _ in range(3)]  # d theta, d m, d v: (K, ...) each
    # the model's weights are sum_k c_k theta_k (engine.presets.Preset.ema_weights): with a
    # moving average their tangent is the same sum of the iterates' tangents
    c = p.ema_weights().tolist() if p.ema else None
    out = {n: torch.zeros_like(t) for n, t in tan[0].items()} if c else tan[0]
    for step in range(p.steps):
        idx, f = step_function(model, step, images, run.seed, p)
        idx = idx.to(dev)
        primals = ({n: state.params[n] for n in names}, {n: state.m[n] for n in names},
                   {n: state.v[n] for n in names}, w[idx])

        def push(dp, dm, dv, dw):
            return torch.func.jvp(f, primals, (dp, dm, dv, dw))[1]
        tan = list(torch.func.vmap(push)(tan[0], tan[1], tan[2], omega[:, idx]))
        state = train_step(model, state, images, w, run.seed, p)[0]
        if c:
            for n in names:
                out[n].add_(tan[0][n], alpha=c[step])  # c[step] weighs theta_(step+1)
        else:
            out = tan[0]
        if callback is not None:
            callback({"i": step + 1, "n": p.steps})
    return torch.cat([out[n].reshape(k, -1) for n in names], dim=1)


def flat_to_dicts(vectors: torch.Tensor, like: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """(K, P) flat vectors -> K dicts shaped like `like` (named_parameters order)."""
    out = []
    for v in vectors:
        d, i = {}, 0
        for n, t in like.items():
            d[n] = v[i: i + t.numel()].reshape(t.shape)
            i += t.numel()
        out.append(d)
    return out


def flatten(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """A dict of parameter-shaped tensors -> (P,) in its order."""
    return torch.cat([t.reshape(-1) for t in d.values()])
