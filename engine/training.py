"""Deterministic weighted training: the learning algorithm A(w) as a pure function of (seed, w).

Step k draws its batch, times t, noise z and dequantization noise u from generators seeded by
(seed, k) alone, never from the global RNG; Adam is a pure function of its state with eps
inside the square root (d sqrt(v)/dv is infinite at v = 0, which would poison the
metagradient); the learning rate warms up linearly, then decays linearly to 0. Dropping an
example means weight 0 in the same run (same batches, same noise).

    loss_k = 1/B sum_{i in B_k} w_i || s(t_i) score(x_i + s(t_i) z_i, t_i) + z_i ||^2,
    x_i = (255 x_i + u_i) / 256   (uniform dequantization)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.func import functional_call

from engine import data, sde
from engine import device as devices
from engine.errors import UserError
from engine.model import ScoreNet, build_model
from engine.presets import Preset


@dataclass
class TrainState:
    """Adam's full state before step `step`: parameters and both moments, by parameter name, and
    the normalized moving average of the iterates when the preset keeps one (else None)."""
    step: int
    params: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]] = None

    @property
    def model_params(self) -> dict[str, torch.Tensor]:
        """The weights a model of this state uses: the moving average when kept, else theta."""
        return self.params if self.ema is None else self.ema

    def to_dict(self) -> dict:
        d = {"step": self.step, "params": self.params, "m": self.m, "v": self.v}
        return d if self.ema is None else {**d, "ema": self.ema}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TrainState":
        """The same state with `fn` applied to every tensor (detach, move, ...)."""
        p, m, v = ({n: fn(x) for n, x in d.items()} for d in (self.params, self.m, self.v))
        return TrainState(self.step, p, m, v, None if self.ema is None else {n: fn(x) for n, x in self.ema.items()})

    @staticmethod
    def from_dict(d: dict) -> "TrainState":
        return TrainState(int(d["step"]), d["params"], d["m"], d["v"], d.get("ema"))


def derive_seed(seed: int, stream: int, k: int) -> int:
    """A well-mixed 63-bit seed for (run seed, stream, step); platform independent."""
    return int(np.random.SeedSequence([seed, stream, k]).generate_state(1, np.uint64)[0] >> 1)


def batch_indices(step: int, seed: int, n: int, batch_size: int) -> torch.Tensor:
    """Indices (B,) of step `step`'s batch: epoch e is a permutation seeded by (seed, e), cut in
    n // B batches (the remainder is skipped), so every example is seen once per epoch."""
    per_epoch = n // batch_size
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 0, epoch)))
    return perm[j * batch_size: (j + 1) * batch_size]


def step_noise(step: int, seed: int, batch_size: int, t_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Times t (B,) ~ U[t_eps, 1], noise z (B,1,28,28) ~ N(0, I), dequantization u (B,1,28,28) ~ U[0,1)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 1, step))
    t = t_eps + (1 - t_eps) * torch.rand(batch_size, generator=g)
    z = torch.randn(batch_size, 1, 28, 28, generator=g)
    u = torch.rand(batch_size, 1, 28, 28, generator=g)
    return t, z, u


def lr_at(step: int, preset: Preset) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then linear decay to 0."""
    warm = max(1, round(preset.warmup * preset.steps))
    if step < warm:
        return preset.lr * (step + 1) / warm
    return preset.lr * (preset.steps - step) / (preset.steps - warm + 1)


def batch_loss(model: ScoreNet, params: dict[str, torch.Tensor], x0: torch.Tensor, w: torch.Tensor,
               t: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Weighted denoising score-matching loss of one batch (the formula above): a scalar."""
    x = (255 * x0 + u) / 256
    std = sde.marginal_std(t, model.sigma)[:, None, None, None]
    score = functional_call(model, params, (x + std * z, t))
    per_example = ((std * score + z) ** 2).sum((1, 2, 3))
    return (w * per_example).sum() / x0.shape[0]


def adam_update(state: TrainState, grads: dict[str, torch.Tensor], lr: float, betas: tuple, eps_root: float) -> TrainState:
    """One Adam step as a pure function (differentiable when the inputs carry a graph)."""
    b1, b2 = betas
    k = state.step + 1
    c1, c2 = 1 - b1**k, 1 - b2**k
    params, m, v = {}, {}, {}
    for name, p in state.params.items():
        g = grads[name]
        m[name] = b1 * state.m[name] + (1 - b1) * g
        v[name] = b2 * state.v[name] + (1 - b2) * g * g
        params[name] = p - lr * (m[name] / c1) / torch.sqrt(v[name] / c2 + eps_root)
    return TrainState(k, params, m, v)


def step_function(model: ScoreNet, step: int, images: torch.Tensor, seed: int, preset: Preset
                  ) -> tuple[torch.Tensor, Callable]:
    """Step `step` as a pure function for torch.func: (batch indices (B,), f).

    f(params, m, v, w_batch) -> (params', m', v') is the same update as train_step, with the
    batch's weights w_batch (B,) = w[indices] as an argument, so that torch.func.vjp of f gives
    the step's pullback of (params', m', v') and the batch's weight gradients. Its gradient comes
    from torch.func.grad, which may round differently from train_step's in the last bit.
    """
    from torch.func import grad

    idx = batch_indices(step, seed, images.shape[0], preset.batch_size)
    t, z, u = (x.to(images) for x in step_noise(step, seed, preset.batch_size, preset.t_eps))
    x0, lr = images[idx], lr_at(step, preset)

    def f(params, m, v, w_batch):
        grads = grad(lambda p: batch_loss(model, p, x0, w_batch, t, z, u))(params)
        new = adam_update(TrainState(step, params, m, v), grads, lr, preset.betas, preset.eps_root)
        return new.params, new.m, new.v
    return idx, f


def train_step(model: ScoreNet, state: TrainState, images: torch.Tensor, weights: torch.Tensor,
               seed: int, preset: Preset, create_graph: bool = False) -> tuple[TrainState, float]:
    """Step `state.step` of the run: returns the next state and the batch loss.

    With create_graph=True the new state stays differentiable w.r.t. the old state and the
    weights (the metagradient's double backward); otherwise everything is detached.
    """
    k = state.step
    idx = batch_indices(k, seed, images.shape[0], preset.batch_size)
    t, z, u = step_noise(k, seed, preset.batch_size, preset.t_eps)
    params = state.params if create_graph else {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
    loss = batch_loss(model, params, images[idx], weights[idx], t.to(images), z.to(images), u.to(images))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    new = adam_update(TrainState(k, params, state.m, state.v), dict(zip(params, grads)),
                      lr_at(k, preset), preset.betas, preset.eps_root)
    if not create_graph:
        new = new.map(torch.Tensor.detach)
        if state.ema is not None:
            new.ema = ema_update(state.ema, new.params, preset.ema, new.step)
    return new, float(loss.detach())


def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], beta: float, k: int
               ) -> dict[str, torch.Tensor]:
    """The normalized moving average after iterate k >= 1: e_k = e_(k-1) + (1-b)/(1-b^k) (theta_k - e_(k-1)),
    which equals sum_(j<=k) (1-b) b^(k-j) theta_j / (1-b^k) (e_1 = theta_1, whatever e_0). Never
    differentiated: it is linear in the iterates, and the metagradient adds its weights itself."""
    a = (1 - beta) / (1 - beta ** k)
    return {n: e + a * (params[n].detach() - e) for n, e in ema.items()}


def init_state(model: ScoreNet, ema: bool = False) -> TrainState:
    """The state before step 0; with `ema`, a moving average (its start value gets weight 0)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = lambda: {n: torch.zeros_like(p) for n, p in params.items()}  # noqa: E731
    return TrainState(0, params, zeros(), zeros(), zeros() if ema else None)


def make_model(preset: Preset, seed: int) -> ScoreNet:
    """The preset's network with initial parameters fixed by `seed`."""
    model = build_model(preset.channels, preset.embed_dim, preset.groups, derive_seed(seed, 2, 0), preset.sigma,
                        preset.positional, preset.positional_from)
    return model.to(preset.torch_dtype)


def check_weights(weights: Optional[np.ndarray], n: int) -> torch.Tensor:
    """Validate a per-example weight vector (n,) (None means all ones) -> float32 tensor."""
    if weights is None:
        return torch.ones(n)
    w = np.asarray(weights)
    if w.shape != (n,):
        raise UserError(f"weights must have shape ({n},) for this preset, got {w.shape}")
    if not np.issubdtype(w.dtype, np.number) or not np.isfinite(w.astype(np.float64)).all():
        raise UserError("weights must be finite numbers")
    if (w < 0).any():
        raise UserError("weights must be >= 0")
    return torch.from_numpy(w.astype(np.float32))


def train(preset: Preset, *, seed: int = 0, weights: Optional[np.ndarray] = None, out: Optional[Path] = None,
          images: Optional[torch.Tensor] = None, callback: Optional[Callable[[dict], None]] = None) -> TrainState:
    """Train `preset` with per-example `weights` (n,) and return the final state.

    With `out`, the run is stored there (see engine.store): optimizer states every
    ~sqrt(T) steps (for replay and resume), then the final state. If `out` already holds
    this config, training resumes from its last stored state (or returns at once if done),
    ending bit-identical to an uninterrupted run.

    callback receives {"step", "total", "loss", "lr"} after every step.
    """
    from engine import store  # store imports this module's TrainState

    if images is None:
        images, _ = data.load_train(preset.n_train, preset.source)
    w = check_weights(weights, images.shape[0])
    dev = devices.setup(preset)
    model = make_model(preset, seed).to(dev)
    state, losses = None, []
    run = None
    if out is not None:
        run = store.open_for_training(Path(out), preset, seed, w.numpy(), n_params=sum(p.numel() for p in model.parameters()))
        if run.final_exists():
            return run.load_final()
        resumed = run.latest_checkpoint()
        if resumed is not None:
            state, losses = resumed
    if state is None:
        state = init_state(model, ema=preset.ema > 0)
    state = state.map(lambda x: x.to(dev))
    images, w = images.to(dev, preset.torch_dtype), w.to(dev, preset.torch_dtype)
    t0 = time.time()
    while state.step < preset.steps:
        if run is not None and state.step % preset.ckpt_every == 0:
            run.save_checkpoint(state, losses)
        state, loss = train_step(model, state, images, w, seed, preset)
        losses.append(loss)
        if not math.isfinite(loss):
            raise UserError(f"training diverged at step {state.step} (loss {loss}); lower the learning rate")
        if callback is not None:
            callback({"step": state.step, "total": preset.steps, "loss": loss, "lr": lr_at(state.step - 1, preset)})
    if run is not None:
        run.save_final(state, losses, seconds=time.time() - t0)
    return state
