"""Generate samples by running the VE SDE backwards (Song et al. 2021): seeded, batched.

Two samplers on a grid evenly spaced in log s(t), from s(1) down to s(eps):
- "ode": the probability-flow ODE dx/du = -s^2 score(x, t(u)), u = log s, solved by RK4
  (torchdiffeq) -- deterministic given the starting noise;
- "sde": the reverse-diffusion predictor x <- x + (s_i^2 - s_{i+1}^2) score + sqrt(s_i^2 - s_{i+1}^2) z,
  the exact variance bookkeeping of the VE process, with no noise on the last step;
- "pc": predictor-corrector (Song et al. 2021, Algorithm 4 for VE): before each predictor step,
  `corrector` steps of Langevin dynamics at the current noise level, x <- x + e score + sqrt(2e) z
  with the step e = 2 (snr |z| / |score|)^2 set per sample by the signal-to-noise ratio `snr`
  (0.16, the paper's value for its VE models). It costs (1 + corrector) network calls per step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torchdiffeq import odeint

from engine import sde
from engine.likelihood import ScoreFn


@torch.no_grad()
def sample(score_fn: ScoreFn, shape: tuple, *, method: str = "sde", n_steps: Optional[int] = None,
           seed: int = 0, sigma: float = sde.SIGMA, eps: float = sde.EPS, device: str = "cpu",
           snr: float = 0.16, corrector: int = 1,
           callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """Draw samples of `shape` (B, *S), e.g. (B, 1, 28, 28); returns them unclipped.

    n_steps defaults to 500 for "sde" and "pc" and 32 for "ode". callback gets {"i", "n"} per step.
    """
    if method not in ("ode", "sde", "pc"):
        raise ValueError(f"method must be 'ode', 'sde' or 'pc', not {method!r}")
    n_steps = n_steps or (32 if method == "ode" else 500)
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.exp(sde.log_std_grid(n_steps, eps, sigma)).flip(0).to(device=device, dtype=torch.float32)
    x = torch.randn(shape, generator=g, device=device) * s[0]
    b = shape[0]
    if method == "ode":
        count = [0]

        def drift(u: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
            st = torch.exp(u)
            count[0] += 1
            if callback is not None:
                callback({"i": count[0], "n": 4 * n_steps})
            return -st**2 * score_fn(xt, sde.time_of_std(st, sigma).expand(b))

        return odeint(drift, x, torch.log(s), method="rk4")[-1]
    for i in range(n_steps):
        t = sde.time_of_std(s[i], sigma).expand(b)
        for _ in range(corrector if method == "pc" else 0):
            grad = score_fn(x, t)
            z = torch.randn(shape, generator=g, device=device)
            ratio = snr * z.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            e = (2 * ratio**2).reshape(b, *([1] * (len(shape) - 1)))
            x = x + e * grad + torch.sqrt(2 * e) * z
        var = s[i] ** 2 - s[i + 1] ** 2
        x = x + var * score_fn(x, t)
        if i < n_steps - 1:
            x = x + torch.sqrt(var) * torch.randn(shape, generator=g, device=device)
        if callback is not None:
            callback({"i": i + 1, "n": n_steps})
    return x
