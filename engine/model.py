"""The score network: a small GroupNorm U-Net conditioned on log s(t).

Design choices, each for the metagradient's sake: GroupNorm treats every sample on its own
(so one tangent serves a whole batch in the exact divergence, and a dropped example changes
nothing but its own loss term), no dropout and no BatchNorm (training must be a pure
function of the weights), SiLU rather than ReLU (smooth second derivatives for the double
backward through training), and deterministic initialisation from an explicit seed.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

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
        positional: 0 for none; s > 0 adds a learned map (c, h, w) to every encoder level's
            pre-activation, so the net knows where in the frame it is (convolutions alone see
            only local content and the zero padding near the borders). The map is s times its
            parameter: Adam moves every parameter by about lr a step, so s is the maps' own
            learning-rate factor (at the default lr of 2.5e-4 they would need ~10^4 steps to reach
            values of order 1). Ties the net to `image_size` x `image_size` inputs. A constant
            in x, so every tangent and Jacobian formula below is unchanged.
        positional_from: the first encoder level with a map (0: all of them); the finer levels
            before it have none. The finest level's map has a parameter per pixel and channel,
            and a query's gradient on it follows that image's own strokes, which a query basis
            spans worst (results/basis_coverage).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), embed_dim: int = 64, groups: int = 4, sigma: float = sde.SIGMA,
                 positional: float = 0.0, image_size: int = 28, positional_from: int = 0):
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
        self.pos, self.pos_scale = None, float(positional)
        if positional < 0:
            raise ValueError(f"positional must be >= 0, not {positional}")
        if not 0 <= positional_from < len(ch):
            raise ValueError(f"positional_from must be a level, 0 to {len(ch) - 1}, not {positional_from}")
        self.pos_from = positional_from
        if positional:
            sizes = [image_size]
            for _ in ch[1:]:  # a 3x3 stride-2 conv with padding 1: n -> ceil(n / 2)
                sizes.append((sizes[-1] + 1) // 2)
            # zeros: the net starts as the one without maps (the same initial function)
            self.pos = nn.ParameterList([nn.Parameter(torch.zeros(c, n, n))
                                         for c, n in list(zip(ch, sizes))[positional_from:]])

    def _enc_bias(self, level: int, emb: torch.Tensor) -> torch.Tensor:
        """What encoder level `level` adds to its conv's output: the time embedding's (B, c, 1, 1),
        plus the level's positional map (c, h, w) when the net has one there."""
        b = self.enc_t[level](emb)[:, :, None, None]
        if self.pos is None or level < self.pos_from:
            return b
        return b + self.pos_scale * self.pos[level - self.pos_from]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28), t (B,) -> score (B, 1, 28, 28)."""
        std = sde.marginal_std(t, self.sigma)
        emb = self.embed(torch.log(std))
        skips = []
        h = x
        for level, (conv, norm) in enumerate(zip(self.enc, self.enc_n)):
            h = F.silu(norm(conv(h) + self._enc_bias(level, emb)))
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

        The tangents are the basis vectors e_i, and each is kept local wherever the network
        allows, not carried over every pixel of every layer as in `forward_with_tangents` (most of
        an exact BPD's gradient, measured):

        - first layer: conv(e_i) is the flipped kernel at pixel i. Its GroupNorm tangent is
          factor (dg - mean(dg) - xhat mean(xhat dg)): a k x k patch at pixel i minus two maps per
          group scaled by per-tangent sums over the patch. The next (stride-2) conv takes the patch
          to a 3 x 3 window and the maps to 2G maps shared by every tangent.
        - second level: its tangent stays in that local form, a 3 x 3 window plus coefficients on
          maps shared by every tangent (its GroupNorm adds 2G maps, its conv runs on the window and
          the maps); so does the third when it is the bottleneck, and the first decoder conv runs
          on its window (3 x 3 to 7 x 7) and maps. Whole maps start after that conv (or at the
          third level of deeper nets).
        - last decoder layer: its GroupNorm needs mean(dg), mean(xhat dg) of dg = convT(dh) over
          the whole group; they are inner products <dg, u> = <dh, conv2d(u)> (conv2d with the same
          weight is convT's adjoint), so dg is computed only at the k x k pixels around pixel i,
          which is all the output layer reads of tangent i (a k x k dot product there).

        Args:
            x: (B, 1, H, W); t: (B,); idx: (C,) flat pixel indices into H*W.
        Returns:
            score (B, 1, H, W) and the entries (C, B).
        """
        for conv, stride in ((self.enc[0], 1), *((layer, 2) for layer in [*self.enc[1:], *self.dec])):
            assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (stride, stride), \
                "jacobian_diagonal assumes the ScoreNet's 3x3 layers (stride 1 first, then 2)"
        std = sde.marginal_std(t, self.sigma)
        emb = self.embed(torch.log(std))
        at = _Around(idx, x.shape[0], *x.shape[-2:], x.dtype)
        at1 = at.coarse()  # pixel i's place on the half-resolution grid
        h0, dskip, local1 = self._first_level_at(x, emb, at, at1)
        h1, local1 = self._local_level(1, h0, emb, local1, at1)
        if len(self.enc) == 2:  # the last layer reads level 1's output alone
            h_in, dh_in = h1, None
        else:
            win, coef, maps = local1
            conv2 = self.enc[2]
            shared = F.conv2d(maps.flatten(0, 1), conv2.weight, None, conv2.stride, conv2.padding)
            shared = shared.reshape(*maps.shape[:2], *shared.shape[1:])  # (B, K, c2, h2, w2)
            if len(self.enc) == 3:  # the bottleneck local too: the first decoder conv runs on its window and maps
                at2 = at1.coarse()
                local2 = (_stride2_window(win, at1, conv2.weight) * at2.inside[:, None, :, :, None], coef, shared)
                h2, local2 = self._local_level(2, h1, emb, local2, at2)
                dec, size = self.dec[0], h1.shape[-2:]
                h, xhat, factor = _norm_act(self.dec_n[0], dec(h2, output_size=size) + self.dec_t[0](emb)[:, :, None, None])
                dh_in = (_convT_local(dec, local2, at2, size), xhat, factor)  # its GroupNorm is taken in the last layer
                h_in = torch.cat([h, h1], dim=1)
            else:  # from level 2 on, tangents are whole maps
                da2 = torch.einsum("cbk,bkf->cbf", coef, shared.flatten(2)).reshape(*coef.shape[:2], *shared.shape[2:])
                da2 = da2 + _window_stride2(win, at1, conv2.weight, shared.shape[-2:])
                (h, skip), (dh, _) = self._tangent_levels(emb, [(h0, None), (h1, None)], h1, None, 2, da2)
                h_in, dh_in = torch.cat([h, skip], dim=1), (dh, None, None)
        out, dh = self._last_level_at(h_in, dh_in, local1, emb, at, at1)
        # the output conv reads cat([h, skip]): its weight's first channels read dh, the rest dskip
        w_h, w_skip = self.out.weight[0].split([out.shape[1], h0.shape[1]])
        diag = torch.einsum("cbyxh,hyx,cyx->cb", dh, w_h, at.inside) + torch.einsum("cbyxh,hyx,cyx->cb", dskip, w_skip, at.inside)
        return self.out(torch.cat([out, h0], dim=1)) / std[:, None, None, None], diag / std[None, :]

    def _first_level_at(self, x: torch.Tensor, emb: torch.Tensor, at: "_Around", at1: "_Around"):
        """The first level on the basis tangents e_i: its output h0 (B, c0, H, W), its tangent around
        pixel i (C, B, 3, 3, c0) and the next conv's tangent on the half-resolution grid in local
        form (a window around at1's pixels (C, B, 3, 3, c1), coefficients (C, B, 2G) on maps (B, 2G, c1, h, w))."""
        c, b, dt = at.c, at.b, x.dtype
        conv0, norm0, conv1 = self.enc[0], self.enc_n[0], self.enc[1]
        h0, xhat0, factor0 = _norm_act(norm0, conv0(x) + self._enc_bias(0, emb))
        c0, g0 = h0.shape[1], norm0.num_groups
        # conv0(e_i)[o, r + dy, q + dx] = w[o, 0, 1 - dy, 1 - dx], zero off the image
        patch = conv0.weight[:, 0].flip(-2, -1).permute(1, 2, 0)[None, None] * at.inside[:, None, :, :, None]  # (C, 1, 3, 3, c0)
        sums = torch.stack([patch.expand(c, b, 3, 3, c0), patch * at(xhat0)])  # (2, C, B, 3, 3, c0)
        sums = sums.reshape(2, c, b, 9, g0, c0 // g0).sum((3, 5)) / xhat0.shape[-1]  # mean(dg), mean(xhat dg): (2, C, B, G)
        f0 = at(factor0)
        dskip = f0 * (patch - at.per_channel(sums[0], c0) - at(xhat0) * at.per_channel(sums[1], c0))
        # the next conv of that tangent: the patch f0 * patch through the stride-2 taps into a 3 x 3 window, and
        # the 2G maps -factor0 and -factor0 xhat0 (one group's channels each) through the conv, combined per tangent
        member = _group_members(c0, g0, x.device, dt)
        maps = torch.cat([factor0.reshape(b, 1, c0, -1) * member[None, :, :, None],
                          (factor0 * xhat0).reshape(b, 1, c0, -1) * member[None, :, :, None]], 1)  # (B, 2G, c0, HW)
        dense = F.conv2d(maps.reshape(b * 2 * g0, c0, at.height, at.width), conv1.weight, None, conv1.stride, conv1.padding)
        local = _stride2_window(f0 * patch, at, conv1.weight) * at1.inside[:, None, :, :, None]  # (C, B, 3, 3, c1) around at1's pixels
        coef = -sums.permute(1, 2, 0, 3).reshape(c, b, 2 * g0)
        return h0, dskip, (local, coef, dense.reshape(b, 2 * g0, *dense.shape[1:]))

    def _local_level(self, level: int, h: torch.Tensor, emb: torch.Tensor, local, at: "_Around"):
        """Encoder level `level` on input h (B, c_in, h, w), its conv's tangent given in local form
        (window (C, B, 3, 3, ch) around at's pixels, zero off the grid; coefficients (C, B, K) on
        maps (B, K, ch, h, w)): its output and its tangent in local form, with K + 2G maps."""
        conv, norm = self.enc[level], self.enc_n[level]
        win, coef, maps = local
        out, xhat, factor = _norm_act(norm, conv(h) + self._enc_bias(level, emb))
        b, ch, g, k = out.shape[0], out.shape[1], norm.num_groups, maps.shape[1]
        # the maps' tangents through the GroupNorm: a batch of K tangents
        normed = _NormTangent.apply(maps.transpose(0, 1).reshape(k, b, g, -1), xhat, factor).reshape(k, b, *out.shape[1:])
        # the window's: factor * window, minus its two sums per group on the maps -factor, -factor xhat
        xw = at(xhat.reshape(out.shape))
        sums = torch.stack([win, win * xw]).reshape(2, at.c, b, 9, g, ch // g).sum((3, 5)) / xhat.shape[-1]  # (2, C, B, G)
        member = _group_members(ch, g, out.device, out.dtype)[None, :, :, None]
        new = torch.cat([factor.reshape(b, 1, ch, -1) * member, (factor * xhat).reshape(b, 1, ch, -1) * member], 1)
        return out, (at(factor.reshape(out.shape)) * win, torch.cat([coef, -sums[0], -sums[1]], -1),
                     torch.cat([normed.transpose(0, 1), new.reshape(b, 2 * g, *out.shape[1:])], 1))

    def _last_level_at(self, h_in: torch.Tensor, dh_in: Optional[tuple], local, emb: torch.Tensor,
                       at: "_Around", at1: "_Around"):
        """The last decoder layer on input h_in (B, c_in, h, w) = cat([h, skip]) and its tangent: h's
        whole, dh_in = (dg (C, B, c_h, h, w), xhat, factor): factor P(dg) with the projection of
        h's GroupNorm (xhat, factor (B, G, N), as `_norm_act` gives them), or dg itself where they
        are None; dh_in None where h_in is the skip alone. The skip's tangent in local form (window,
        coefficients, maps as `_local_level` gives them). Its output (B, ch, H, W) and its tangent
        around pixel i (C, B, 3, 3, ch)."""
        b, dt = at.b, h_in.dtype
        conv, norm = self.dec[-1], self.dec_n[-1]
        out, xhat, factor = _norm_act(norm, conv(h_in, output_size=(at.height, at.width)) + self.dec_t[-1](emb)[:, :, None, None])
        ch, groups, n = out.shape[1], norm.num_groups, xhat.shape[-1]
        member = _group_members(ch, groups, h_in.device, dt)
        u = torch.cat([member[None, :, :, None, None].expand(b, groups, ch, at.height, at.width),
                       member[None, :, :, None, None] * xhat.reshape(b, 1, ch, at.height, at.width)], 1) / n  # (B, 2G, ch, H, W)
        adj = F.conv2d(u.reshape(-1, ch, at.height, at.width), conv.weight, None, conv.stride, conv.padding)  # <convT(dh), u> = <dh, adj>
        # dg at the 3 x 3 pixels around pixel i = (r, q) reads dh at rows r // 2 - 1 .. r // 2 + 1 (zero off the grid):
        # the 3 x 3 neighbourhood of at1's pixel
        c_h = 0 if dh_in is None else dh_in[0].shape[2]
        adj = adj.reshape(b, 2 * groups, *h_in.shape[1:])
        win, coef, maps = local
        k, c_s = maps.shape[1], maps.shape[2]
        adj_s = adj[:, :, c_h:]
        on = at1.inside[:, None, :, :, None]
        sums = (torch.einsum("cbyxh,cbyxgh->cbg", win, at1(adj_s.flatten(1, 2)).unflatten(-1, (2 * groups, c_s)))
                + torch.einsum("cbk,bkg->cbg", coef, torch.einsum("bkf,bgf->bkg", maps.flatten(2), adj_s.flatten(2))))
        win = win + torch.einsum("cbk,cbyxkh->cbyxh", coef, at1(maps.flatten(1, 2)).unflatten(-1, (k, c_s))) * on
        if dh_in is not None:
            sums_h, win_h = _read_normed(dh_in, adj[:, :, :c_h], at, at1)  # (C, B, 2G), (C, B, 3, 3, c_h)
            sums, win = sums + sums_h, torch.cat([win_h, win], -1)  # (C, B, ey, ex, c_in)
        dg = _by_parity(win, _stride2_taps(conv.weight, transposed=True), at.parity)  # (C, B, dy, dx, ch)
        return out, at(factor) * (dg - at.per_channel(sums[..., :groups], ch) - at(xhat) * at.per_channel(sums[..., groups:], ch))

    def _tangent_trunk(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
        """Every layer but the output one, with tangents v (C, B, 1, H, W): ((h, skip), (dh, dskip),
        1/std (B, 1, 1, 1)); the output layer reads cat([h, skip]) and cat([dh, dskip])."""
        std = sde.marginal_std(t, self.sigma)
        emb = self.embed(torch.log(std))
        (h, skip), (dh, dskip) = self._tangent_levels(emb, [], x, v, 0, None, last=True)
        return (h, skip), (dh, dskip), 1 / std[:, None, None, None]

    def _tangent_levels(self, emb: torch.Tensor, skips: list, h: torch.Tensor, dh, start: int, da, last: bool = False):
        """The encoder from level `start` (its input h, dh; or, given, its conv's tangent da) and the
        decoder after it, up to (last=False) or through (last=True) the last decoder layer:
        (h, skip), (dh, dskip) with h, dh that layer's input or output. `skips` holds the levels before start."""
        for level in range(start, len(self.enc)):
            conv, norm = self.enc[level], self.enc_n[level]
            h, dh = _norm_act_tangent(norm, conv(h) + self._enc_bias(level, emb),
                                      da if level == start and da is not None else _conv_tangent(conv, dh))
            skips.append((h, dh))
        h, dh = skips.pop()
        for level, (conv, dense, norm) in enumerate(zip(self.dec, self.dec_t, self.dec_n)):
            skip, dskip = skips.pop()
            size = skip.shape[-2:]
            if level == len(self.dec) - 1 and not last:
                return (h, skip), (dh, dskip)
            h, dh = _norm_act_tangent(norm, conv(h, output_size=size) + dense(emb)[:, :, None, None],
                                      _conv_tangent(conv, dh, output_size=size))
            if level == len(self.dec) - 1 or dskip is None:  # None: the caller holds that skip's tangent
                return (h, skip), (dh, dskip)
            h, dh = torch.cat([h, skip], dim=1), torch.cat([dh, dskip], dim=2)
        raise ValueError("a ScoreNet needs at least two levels")


class _SumsAndWindow(torch.autograd.Function):
    """Two reads of a tangent dh (C, B, ch, h, w): its inner products with maps adj (B, K, ch h w),
    (C, B, K), and each tangent j's 3 x 3 window of rows wr[j], columns wq[j] (C, 3), zero where off
    the grid, (C, B, 3, 3, ch).

    One op so that the backward writes dh's gradient once: the dense part from the inner products,
    then the windows added in place. Autograd would fill a zero tensor of dh's size for the gather's
    gradient and add the two (measured: that fill and the einsum's gradient were a quarter of a BPD
    gradient's time).
    """

    @staticmethod
    def forward(ctx, dh, adj, wr, wq):
        c, b, ch, hh, ww = dh.shape
        on_r, on_q = (wr >= 0) & (wr < hh), (wq >= 0) & (wq < ww)
        flat = (wr.clamp(0, hh - 1)[:, :, None] * ww + wq.clamp(0, ww - 1)[:, None, :]).reshape(c, 1, 9)
        on = (on_r[:, :, None] & on_q[:, None, :]).to(dh.dtype).reshape(c, 1, 9)  # (C, 1, 9)
        sums = torch.bmm(dh.reshape(c, b, -1).transpose(0, 1), adj.transpose(1, 2)).transpose(0, 1)  # (C, B, K)
        win = dh.reshape(c, b * ch, -1).gather(2, flat.expand(c, b * ch, 9)) * on  # (C, B ch, 9)
        ctx.save_for_backward(dh, adj, flat, on)
        return sums, win.reshape(c, b, ch, 3, 3).permute(0, 1, 3, 4, 2)

    @staticmethod
    def backward(ctx, g_sums, g_win):
        dh, adj, flat, on = ctx.saved_tensors
        c, b, ch = dh.shape[:3]
        g_dh = g_adj = None
        if ctx.needs_input_grad[0]:
            g_dh = torch.bmm(g_sums.transpose(0, 1), adj).transpose(0, 1).reshape(c, b * ch, -1)  # (C, B ch, h w)
            # scatter_add_ (deterministic on CPU; index_put_'s accumulate is not): clamped rows
            # and columns repeat a position, with window entries 0
            g_win = (g_win.permute(0, 1, 4, 2, 3).reshape(c, b * ch, 9) * on)
            g_dh = g_dh.scatter_add_(2, flat.expand(c, b * ch, 9), g_win).reshape(dh.shape)
        if ctx.needs_input_grad[1]:
            g_adj = torch.bmm(g_sums.permute(1, 2, 0), dh.reshape(c, b, -1).transpose(0, 1))  # (B, K, ch h w)
        return g_dh, g_adj, None, None


def _read_normed(dh_in: tuple, adj: torch.Tensor, at: "_Around", at1: "_Around") -> tuple[torch.Tensor, torch.Tensor]:
    """What the last layer reads of a whole tangent dh = factor P(dg) (dh_in = (dg (C, B, ch, h, w),
    xhat, factor), or (dh, None, None)): its inner products with adj (B, K, ch, h, w), (C, B, K), and its
    3 x 3 windows around at1's pixels, zero off the grid, (C, B, 3, 3, ch).

    P is self-adjoint, so <factor P(dg), a> = <dg, P(factor a)>: the GroupNorm's tangent is never
    formed on the whole grid, only in the windows, from dg's two means per group (two more inner
    products)."""
    dg, xhat, factor = dh_in
    b, k, ch = adj.shape[:3]
    if xhat is None:
        return _SumsAndWindow.apply(dg, adj.flatten(2), at.wr, at.wq)
    g, n = xhat.shape[1:]
    member = _group_members(ch, g, dg.device, dg.dtype)[None, :, :, None]
    pa = _project((factor.reshape(b, 1, g, n) * adj.reshape(b, k, g, n)).transpose(0, 1), xhat)[0].transpose(0, 1)  # (B, K, G, N)
    means = torch.cat([member.expand(b, g, ch, n // (ch // g)), xhat.reshape(b, 1, ch, -1) * member], 1) / n  # (B, 2G, ch, h w)
    sums, win = _SumsAndWindow.apply(dg, torch.cat([pa.reshape(b, k, -1), means.reshape(b, 2 * g, -1)], 1), at.wr, at.wq)
    shape = (b, ch, *dg.shape[-2:])
    win = at1(factor.reshape(shape)) * (win - at1.per_channel(sums[..., k:k + g], ch)
                                        - at1(xhat.reshape(shape)) * at1.per_channel(sums[..., k + g:], ch))
    return sums[..., :k], win * at1.inside[:, None, :, :, None]


def _norm_act_tangent(norm: nn.GroupNorm, a: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm then SiLU on a (B, ch, H, W) and its derivative on tangents da (C, B, ch, H, W)."""
    # d out = silu'(y) w rstd (dg - mean(dg) - xhat mean(xhat dg)) per group. The factors that do
    # not depend on the tangent are multiplied together at the primal's size first, and
    # mean(xhat dg) is a batched dot product: three tangent-sized tensors per layer instead of
    # eight (elementwise products and their backward were a third of a BPD gradient's time).
    out, xhat, factor = _norm_act(norm, a)
    c, b = da.shape[:2]
    return out, _NormTangent.apply(da.reshape(c, b, *xhat.shape[1:]), xhat, factor).reshape(c, *a.shape)


class _NormTangent(torch.autograd.Function):
    """factor (dg - mean(dg) - xhat mean(xhat dg)) per group: tangents dg (C, B, G, N), xhat and
    factor (B, G, N) -> (C, B, G, N).

    Written with its backward because autograd's took twice the passes over tangent-sized tensors
    (and outer products as matmuls of inner size 1): the projection P dg = dg - mean(dg) - xhat
    mean(xhat dg) is self-adjoint, so dg's gradient is P(factor g); the primal factors' gradients
    are sums over the tangents, two of them matrix products over C.
    """

    @staticmethod
    def forward(ctx, dg, xhat, factor):
        inner, m = _project(dg, xhat)
        ctx.save_for_backward(dg, xhat, factor, inner, m)
        return inner * factor

    @staticmethod
    @torch.autograd.function.once_differentiable  # the BPD needs first derivatives only; a second says so
    def backward(ctx, g):
        dg, xhat, factor, inner, m = ctx.saved_tensors
        c, b, groups, n = dg.shape
        a = g * factor
        g_dg, s = _project(a, xhat)
        g_factor = (g * inner).sum(0) if ctx.needs_input_grad[2] else None
        g_xhat = None
        if ctx.needs_input_grad[1]:
            # d/dxhat of sum(a inner) = -(a m + dg s) summed over the tangents: matrix products over C
            def over_c(coef, t):  # sum_c coef (C, B, G) * t (C, B, G, N) -> (B, G, N)
                return torch.bmm(coef.reshape(c, b * groups).t()[:, None, :], t.reshape(c, b * groups, n).transpose(0, 1))
            g_xhat = -(over_c(m, a) + over_c(s, dg)).reshape(b, groups, n)
        return g_dg, g_xhat, g_factor


def _project(dg: torch.Tensor, xhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P dg = dg - mean(dg) - xhat mean(xhat dg) over the last axis, for dg (C, B, G, N) and xhat
    (B, G, N), and mean(xhat dg) (C, B, G)."""
    m = torch.einsum("bgn,cbgn->cbg", xhat, dg) / xhat.shape[-1]
    return torch.addcmul(dg - dg.mean(-1, keepdim=True), xhat, m.unsqueeze(-1), value=-1.0), m


def _norm_act(norm: nn.GroupNorm, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm then SiLU on a (B, ch, H, W), and what its derivative needs: the output, xhat
    (B, G, N) and the factor silu'(y) w rstd (B, G, N) of d out = factor (dg - mean(dg) - xhat mean(xhat dg))."""
    b, g = a.shape[0], norm.num_groups
    ag = a.reshape(b, g, -1)
    mu = ag.mean(-1, keepdim=True)
    rstd = torch.rsqrt(ag.var(-1, unbiased=False, keepdim=True) + norm.eps)
    xhat = (ag - mu) * rstd
    w = norm.weight[None, :, None, None]
    y = xhat.reshape(a.shape) * w + norm.bias[None, :, None, None]
    sig = torch.sigmoid(y)
    factor = (sig * (1 + y * (1 - sig)) * w).reshape(b, g, -1) * rstd
    return y * sig, xhat, factor


class _Around:
    """Where the basis tangents e_i (flat pixel indices idx (C,) into H x W) live: each pixel's 3 x 3
    neighbourhood (rows, cols clamped; inside (C, 3, 3) 0 off the image), the parity of its row and
    column, and the 3 x 3 window of the half-resolution grid around it (wr, wq (C, 3), may be off it)."""

    def __init__(self, idx: torch.Tensor, b: int, height: int, width: int, dtype: torch.dtype):
        self.c, self.b, self.height, self.width, self.dtype = idx.numel(), b, height, width, dtype
        r, q = torch.div(idx, width, rounding_mode="floor"), idx % width
        self.r, self.q = r, q
        off = torch.arange(3, device=idx.device) - 1
        self.j = torch.arange(self.c, device=idx.device)
        self.rows, self.cols = (r[:, None] + off).clamp(0, height - 1)[:, :, None], (q[:, None] + off).clamp(0, width - 1)[:, None, :]
        self.inside = (((r[:, None] + off >= 0) & (r[:, None] + off < height))[:, :, None]
                       & ((q[:, None] + off >= 0) & (q[:, None] + off < width))[:, None, :]).to(dtype)
        self.parity = (r % 2) * 2 + q % 2
        self.wr, self.wq = torch.div(r, 2, rounding_mode="floor")[:, None] + off, torch.div(q, 2, rounding_mode="floor")[:, None] + off

    def coarse(self) -> "_Around":
        """The same tangents placed at (r // 2, q // 2) on the grid a 3x3, stride-2, padding-1 conv makes."""
        h, w = (self.height + 1) // 2, (self.width + 1) // 2
        return _Around(torch.div(self.r, 2, rounding_mode="floor") * w + torch.div(self.q, 2, rounding_mode="floor"),
                       self.b, h, w, self.dtype)

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        """A primal map (B, ch, H, W) around each pixel: (C, B, 3, 3, ch)."""
        # gathered channels-last by index_select: each entry copies ch contiguous numbers, and the
        # backward (index_add) is deterministic; an advanced index's backward adds with atomics in
        # parallel on CPU, so a BPD gradient moved in its last bits from run to run (measured)
        last = m.reshape(self.b, -1, self.height * self.width).transpose(1, 2).contiguous()  # (B, H W, ch)
        flat = (self.rows * self.width + self.cols).reshape(-1)  # (C 9,)
        return last.index_select(1, flat).reshape(self.b, self.c, 3, 3, -1).transpose(0, 1)

    @staticmethod
    def per_channel(sums: torch.Tensor, ch: int) -> torch.Tensor:
        """Per-group values (C, B, G) for every channel: (C, B, 1, 1, ch)."""
        return sums.repeat_interleave(ch // sums.shape[-1], dim=-1)[:, :, None, None, :]


def _stride2_window(patch: torch.Tensor, at: "_Around", weight: torch.Tensor) -> torch.Tensor:
    """A 3x3, stride-2, padding-1 conv (weight (out, in, 3, 3)) of tangents that are zero but for the
    3 x 3 patch (C, B, 3, 3, in) around at's pixels: the 3 x 3 window (C, B, 3, 3, out) of the next
    grid at rows at.wr, columns at.wq (entries off that grid are not zeroed)."""
    return _by_parity(patch, _stride2_taps(weight, transposed=False), at.parity)


def _by_parity(rows: torch.Tensor, taps: torch.Tensor, parity: torch.Tensor) -> torch.Tensor:
    """rows (C, B, *S) times the tap matrix of each tangent's parity (taps (prod S, 4 x 9 out), as
    `_stride2_taps` makes it): (C, B, 3, 3, out). One matrix product per parity, on its tangents only."""
    c, b = rows.shape[:2]
    flat, taps = rows.reshape(c, b, -1), taps.reshape(taps.shape[0], 4, -1)
    out = flat.new_empty(c, b, taps.shape[-1])
    for p in range(4):
        sel = (parity == p).nonzero().squeeze(1)
        if sel.numel():
            out[sel] = flat.index_select(0, sel) @ taps[:, p]
    return out.reshape(c, b, 3, 3, -1)


def _window_stride2(patch: torch.Tensor, at: "_Around", weight: torch.Tensor, size) -> torch.Tensor:
    """`_stride2_window` placed on the next grid of `size` (h, w): whole maps (C, B, out, h, w)."""
    local = _stride2_window(patch, at, weight)
    c, b, (h, w) = local.shape[0], local.shape[1], size
    canvas = local.new_zeros(c, b, local.shape[-1], h + 2, w + 2)  # a margin for windows at the edges
    canvas[at.j[:, None, None], :, :, at.wr[:, :, None] + 1, at.wq[:, None, :] + 1] = local.permute(0, 2, 3, 1, 4)
    return canvas[..., 1:h + 1, 1:w + 1]


def _convT_local(conv: nn.ConvTranspose2d, local, at: "_Around", size) -> torch.Tensor:
    """A 3x3, stride-2, padding-1 transposed conv of tangents in local form (window (C, B, 3, 3, in)
    around at's pixels p, zero off the grid; coefficients (C, B, K) on maps (B, K, in, h, w)) onto the
    grid of `size` (H, W): whole maps (C, B, out, H, W). The window's part is the conv of the window
    alone (padding 0: the 7 x 7 fine pixels 2 p - 3 .. 2 p + 3), added where it falls on the grid."""
    win, coef, maps = local
    c, b, (h, w) = win.shape[0], win.shape[1], size
    shared = _conv_tangent(conv, maps.transpose(0, 1), output_size=size)  # (K, B, out, H, W)
    dense = torch.einsum("cbk,kbf->cbf", coef, shared.flatten(2)).reshape(c, b, -1, h * w)
    part = F.conv_transpose2d(win.permute(0, 1, 4, 2, 3).reshape(c * b, -1, 3, 3), conv.weight, None, 2, 0)  # (C B, out, 7, 7)
    off = torch.arange(7, device=win.device) - 3
    rows, cols = 2 * at.r[:, None] + off, 2 * at.q[:, None] + off  # (C, 7)
    on = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]).to(win.dtype)  # (C, 7, 7)
    # added in place at flat positions; clamped rows and columns repeat a position (their entries are 0)
    where = (rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]).reshape(c, 1, 1, 49)
    part = (part.reshape(c, b, -1, 7, 7) * on[:, None, None]).reshape(c, b, -1, 49)
    return dense.scatter_add_(3, where.expand(part.shape), part).reshape(c, b, -1, h, w)


def _group_members(ch: int, groups: int, device, dtype) -> torch.Tensor:
    """(G, ch) 0/1: which channels GroupNorm puts in each group."""
    return (torch.arange(ch, device=device)[None, :] // (ch // groups) == torch.arange(groups, device=device)[:, None]).to(dtype)


def _stride2_taps(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A 3x3, stride-2, padding-1 layer between a 3 x 3 patch around fine pixel (r, q) and the 3 x 3
    window of coarse pixels (r // 2 - 1 .., q // 2 - 1 ..), one matrix per parity of (r, q).

    Fine row r + dy and coarse row r // 2 + ey meet at kernel tap p + dy + 1 - 2 ey (p = r % 2) when it
    is in 0..2. Conv2d(weight (out, in, 3, 3)) maps the fine patch to the window, a (9 in, 4 x 9 out)
    matrix with rows (dy, dx, in) and columns (parity, ey, ex, out); ConvTranspose2d(weight (in, out,
    3, 3)) maps the window to the patch, rows (ey, ex, in) and columns (parity, dy, dx, out). Parity
    is 2 (r % 2) + q % 2.
    """
    off = torch.arange(3, device=weight.device) - 1
    tap = torch.arange(2, device=weight.device)[:, None, None] + off[None, :, None] + 1 - 2 * off[None, None, :]  # (p, d, e)
    sel = (tap[..., None] == torch.arange(3, device=weight.device)).to(weight.dtype)  # (p, d, e, k): 0 where off the kernel
    if transposed:  # (in, out, ky, kx) -> ((ey, ex, in), (pr, pq, dy, dx, out))
        m = torch.einsum("adyk,bexl,iokl->yxiabdeo", sel, sel, weight)
    else:  # (out, in, ky, kx) -> ((dy, dx, in), (pr, pq, ey, ex, out))
        m = torch.einsum("adyk,bexl,oikl->deiabyxo", sel, sel, weight)
    return m.reshape(9 * weight.shape[1 if not transposed else 0], -1)


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


def build_model(channels: Sequence[int], embed_dim: int, groups: int, seed: int, sigma: float = sde.SIGMA,
                positional: float = 0.0, positional_from: int = 0) -> ScoreNet:
    """A ScoreNet whose initial parameters depend on `seed` alone (not on the global RNG state);
    `positional` adds the encoder's positional maps from level `positional_from` on (see ScoreNet)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ScoreNet(channels, embed_dim, groups, sigma, positional, positional_from=positional_from)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
