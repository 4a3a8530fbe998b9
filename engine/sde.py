"""Quantities of the variance-exploding SDE dx = sigma^t dw (Song et al. 2021, Sec. 3.4).

All functions take `t` as a tensor of any shape and return a tensor of the same shape.
"""

from __future__ import annotations

import math

import torch

SIGMA = 25.0
EPS = 1e-5  # smallest time used in training and in the likelihood (the tutorial's value)


def diffusion_sq(t: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """g(t)^2 = sigma^(2t)."""
    return sigma ** (2 * t)


def marginal_std(t: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """s(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)): std of x_t given x_0."""
    return torch.sqrt(torch.expm1(2 * t * math.log(sigma)) / (2 * math.log(sigma)))


def time_of_std(s: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """Inverse of `marginal_std`: the t with s(t) = s."""
    return torch.log1p(2 * math.log(sigma) * s**2) / (2 * math.log(sigma))


def log_std_grid(n_steps: int, eps: float = EPS, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    """u_0 = log s(eps) < ... < u_n = log s(1), evenly spaced: shape (n_steps + 1,).

    The PF-ODE changes on the scale of s(t), which spans ~3.5 decades; a grid uniform in t
    wastes almost every step on the flat end (measured: 0.40 vs 9e-4 bits/dim, RK4, 20 steps).
    """
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    ends = torch.log(marginal_std(torch.tensor([eps, 1.0], dtype=torch.float64), sigma))
    return torch.linspace(ends[0].item(), ends[1].item(), n_steps + 1, dtype=torch.float64).to(dtype)


def prior_logp(x: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """log N(x; 0, s(1)^2 I) per sample: x (B, ...) -> (B,), in nats."""
    s1 = marginal_std(torch.tensor(1.0, dtype=x.dtype, device=x.device), sigma)
    d = x[0].numel()
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * d * math.log(2 * math.pi) - d * torch.log(s1) - 0.5 * (flat**2).sum(1) / s1**2
