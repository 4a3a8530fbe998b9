"""The score network: a small GroupNorm U-Net conditioned on log s(t).

Design choices, each for the metagradient's sake: GroupNorm treats every sample on its own
(so one tangent serves a whole batch in the exact divergence, and a dropped example changes
nothing but its own loss term), no dropout and no BatchNorm (training must be a pure
function of the weights), SiLU rather than ReLU (smooth second derivatives for the double
backward through training), and deterministic initialisation from an explicit seed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import sde


class FourierEmbedding(nn.Module):
    """Fixed sinusoidal features of log s(t): (B,) -> (B, dim). No random frequencies."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        # log s(t) spans about [-5.8, 2.3]; frequencies from 1/8 to 8 cover that range.
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(1 / 8), math.log(8), half)), persistent=False)

    def forward(self, log_s: torch.Tensor) -> torch.Tensor:
        a = log_s[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class ScoreNet(nn.Module):
    """U-Net score model s_theta(x, t) ~ grad_x log p_t(x) for the VE SDE.

    Args:
        channels: channels per resolution level; level i works at 28 / 2^i (rounded up).
        embed_dim: width of the time embedding.
        groups: GroupNorm groups (must divide every channel count).
        sigma: the SDE's sigma; the output is divided by s(t) so that the network predicts -z.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), embed_dim: int = 64, groups: int = 4, sigma: float = sde.SIGMA):
        super().__init__()
        self.sigma = sigma
        ch = list(channels)
        self.embed = nn.Sequential(FourierEmbedding(embed_dim), nn.Linear(embed_dim, embed_dim), nn.SiLU())
        self.enc = nn.ModuleList()
        self.enc_t = nn.ModuleList()
        self.enc_n = nn.ModuleList()
        for i, c in enumerate(ch):
            c_in = 1 if i == 0 else ch[i - 1]
            self.enc.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            self.enc_t.append(nn.Linear(embed_dim, c))
            self.enc_n.append(nn.GroupNorm(groups, c))
        self.dec = nn.ModuleList()
        self.dec_t = nn.ModuleList()
        self.dec_n = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):
            c_in = ch[i + 1] if i == len(ch) - 2 else 2 * ch[i + 1]
            # Transposed conv: the work is done at the coarse resolution (2-3x cheaper than
            # upsample-then-conv), which matters since the exact divergence runs it 784 times.
            self.dec.append(nn.ConvTranspose2d(c_in, ch[i], 3, stride=2, padding=1))
            self.dec_t.append(nn.Linear(embed_dim, ch[i]))
            self.dec_n.append(nn.GroupNorm(groups, ch[i]))
        self.out = nn.Conv2d(2 * ch[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28), t (B,) -> score (B, 1, 28, 28)."""
        std = sde.marginal_std(t, self.sigma)
        emb = self.embed(torch.log(std))
        skips = []
        h = x
        for conv, dense, norm in zip(self.enc, self.enc_t, self.enc_n):
            h = F.silu(norm(conv(h) + dense(emb)[:, :, None, None]))
            skips.append(h)
        h = skips.pop()
        for conv, dense, norm in zip(self.dec, self.dec_t, self.dec_n):
            skip = skips.pop()
            h = F.silu(norm(conv(h, output_size=skip.shape[-2:]) + dense(emb)[:, :, None, None]))
            h = torch.cat([h, skip], dim=1)
        return self.out(h) / std[:, None, None, None]

    def forward_with_tangents(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and its Jacobian-vector products for many tangents at once.

        Forward-mode differentiation written out for this architecture: the primal pass runs
        once on the B inputs and each layer's derivative is broadcast over the C tangents.
        torch.func.jvp on C replicated copies would redo the primal C times (measured 2.6x
        slower). Plain autograd ops, so it runs inside checkpoints and is differentiable
        w.r.t. the parameters; tests check it against torch.func.jvp.

        Args:
            x: (B, 1, 28, 28); t: (B,); v: (C, B, 1, 28, 28) tangents in input space.
        Returns:
            score (B, 1, 28, 28) and J v (C, B, 1, 28, 28).
        """
        (h, skip), (dh, dskip), inv = self._tangent_trunk(x, t, v)
        h, dh = torch.cat([h, skip], dim=1), torch.cat([dh, dskip], dim=2)
        return self.out(h) * inv, _conv_tangent(self.out, dh) * inv

    def jacobian_diagonal(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and the diagonal Jacobian entries d score_i / d x_i for the pixels `idx`.

        The tangents are the basis vectors e_i, so of the output layer's tangent only pixel i is
        needed: a k x k dot product there, where `forward_with_tangents` runs the whole output
        convolution on every tangent and its gradient (a quarter of an exact BPD's gradient, measured).

        Args:
            x: (B, 1, H, W); t: (B,); idx: (C,) flat pixel indices into H*W.
        Returns:
            score (B, 1, H, W) and the entries (C, B).
        """
        c, b = idx.numel(), x.shape[0]
        height, width = x.shape[-2:]
        v = torch.zeros(c, b, height * width, dtype=x.dtype, device=x.device)
        v[torch.arange(c, device=x.device), :, idx] = 1.0
        (h, skip), (dh, dskip), inv = self._tangent_trunk(x, t, v.reshape(c, *x.shape))
        k, pad = self.out.kernel_size[0], self.out.padding[0]
        off = torch.arange(k, device=x.device) - pad
        rr = torch.div(idx, width, rounding_mode="floor")[:, None] + off  # (C, k): rows of pixel i's neighbourhood
        cc = (idx % width)[:, None] + off
        inside = (((rr >= 0) & (rr < height))[:, :, None] & ((cc >= 0) & (cc < width))[:, None, :]).to(x.dtype)  # zero padding
        j = torch.arange(c, device=x.device)[:, None, None]
        rows, cols = rr.clamp(0, height - 1)[:, :, None], cc.clamp(0, width - 1)[:, None, :]
        # the output conv reads cat([h, skip]): its weight's first channels read dh, the rest dskip;
        # part[j, :, :, rows, cols] (C, k, k, B, ch) is tangent j's values around its own pixel
        w = self.out.weight[0].split([dh.shape[2], dskip.shape[2]])
        diag = sum(torch.einsum("cyxbh,hyx,cyx->cb", part[j, :, :, rows, cols], wp, inside)
                   for part, wp in zip((dh, dskip), w))
        return self.out(torch.cat([h, skip], dim=1)) * inv, diag * inv.reshape(1, b)

    def _tangent_trunk(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
        """Every layer but the output one, with tangents v (C, B, 1, H, W): ((h, skip), (dh, dskip),
        1/std (B, 1, 1, 1)); the output layer reads cat([h, skip]) and cat([dh, dskip])."""
        c, b = v.shape[:2]
        std = sde.marginal_std(t, self.sigma)
        emb = self.embed(torch.log(std))

        def norm_act(norm, a, da):  # GroupNorm then SiLU, with their derivatives
            # d out = silu'(y) w rstd (dg - mean(dg) - xhat mean(xhat dg)) per group. The factors that
            # do not depend on the tangent are multiplied together at the primal's size first, and
            # mean(xhat dg) is a batched dot product: three tangent-sized tensors per layer instead
            # of eight (elementwise products and their backward were a third of a BPD gradient's time).
            g = norm.num_groups
            ag = a.reshape(b, g, -1)
            mu = ag.mean(-1, keepdim=True)
            rstd = torch.rsqrt(ag.var(-1, unbiased=False, keepdim=True) + norm.eps)
            xhat = (ag - mu) * rstd
            shape = a.shape
            w = norm.weight[None, :, None, None]
            y = xhat.reshape(shape) * w + norm.bias[None, :, None, None]
            sig = torch.sigmoid(y)
            factor = (sig * (1 + y * (1 - sig)) * w).reshape(b, g, -1) * rstd  # (B, G, N)
            dg = da.reshape(c, b, g, -1)
            m_xd = torch.einsum("bgn,cbgn->cbg", xhat, dg).unsqueeze(-1) / ag.shape[-1]
            inner = torch.addcmul(dg - dg.mean(-1, keepdim=True), xhat, m_xd, value=-1.0)
            return y * sig, (inner * factor).reshape(c, *shape)

        skips = []
        h, dh = x, v
        for conv, dense, norm in zip(self.enc, self.enc_t, self.enc_n):
            h, dh = norm_act(norm, conv(h) + dense(emb)[:, :, None, None], _conv_tangent(conv, dh))
            skips.append((h, dh))
        h, dh = skips.pop()
        for level, (conv, dense, norm) in enumerate(zip(self.dec, self.dec_t, self.dec_n)):
            skip, dskip = skips.pop()
            size = skip.shape[-2:]
            h, dh = norm_act(norm, conv(h, output_size=size) + dense(emb)[:, :, None, None],
                             _conv_tangent(conv, dh, output_size=size))
            if level == len(self.dec) - 1:
                return (h, skip), (dh, dskip), 1 / std[:, None, None, None]
            h, dh = torch.cat([h, skip], dim=1), torch.cat([dh, dskip], dim=2)
        raise ValueError("a ScoreNet needs at least two levels")


def _conv_tangent(layer: nn.Module, dh: torch.Tensor, output_size=None) -> torch.Tensor:
    """A conv layer's derivative, the conv without its bias, on tangents (C, B, ch, H, W)."""
    c, b = dh.shape[:2]
    flat = dh.reshape(c * b, *dh.shape[2:])
    if isinstance(layer, nn.ConvTranspose2d):
        out_pad = layer._output_padding(flat, output_size, layer.stride, layer.padding, layer.kernel_size, 2, layer.dilation)
        y = F.conv_transpose2d(flat, layer.weight, None, layer.stride, layer.padding, out_pad, layer.groups, layer.dilation)
    else:
        y = F.conv2d(flat, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return y.reshape(c, b, *y.shape[1:])


def build_model(channels: Sequence[int], embed_dim: int, groups: int, seed: int, sigma: float = sde.SIGMA) -> ScoreNet:
    """A ScoreNet whose initial parameters depend on `seed` alone (not on the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ScoreNet(channels, embed_dim, groups, sigma)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
