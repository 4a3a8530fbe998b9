"""Named configurations: data size, network size, optimizer and likelihood grid.

Sizes are calibrated to the budgets of DESIGN.md on 2 CPU cores (`tiny`: seconds, for tests;
`small`: LDS evidence; `cpu`: the app's default) and to one GPU (`gpu`: paper scale).
Every field enters the run's config digest, so changing any of them makes a new run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch

from engine.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    n_train: int            # training images (a fixed, nested subset: tiny within small within cpu)
    source: str             # "offline" (bundled 5k subset) or "torchvision" (full 60k MNIST)
    channels: tuple         # U-Net channels per level
    embed_dim: int
    groups: int
    batch_size: int
    steps: int              # Adam steps T
    lr: float               # peak learning rate
    warmup: float           # fraction of steps with linear warmup; then linear decay to 0
    betas: tuple
    eps_root: float         # Adam's eps, inside the square root
    sigma: float = 25.0
    t_eps: float = 1e-5
    bpd_steps: int = 8      # RK4 steps, evenly spaced in log s(t)
    device: str = "cpu"
    dtype: str = "float32"  # float64 only for precision checks (finite differences in tests)
    # Decay of an exponential moving average of the iterates theta_1..theta_T, whose normalized
    # value is then the model's weights (0: the last iterate, as before). Linear in the iterates,
    # so the metagradient carries it exactly (engine.metagrad, engine.precompute.tangents).
    ema: float = 0.0
    # Learned positional maps on the encoder levels and their learning-rate factor (0: none;
    # engine.model.ScoreNet `positional`).
    positional: float = 0.0
    # The first encoder level with a positional map (0: all; engine.model.ScoreNet `positional_from`).
    positional_from: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"ema must be in [0, 1), got {self.ema}")
        if not self.positional >= 0:
            raise UserError(f"positional must be >= 0, got {self.positional}")
        if not 0 <= self.positional_from < len(self.channels):
            raise UserError(f"positional_from must be a level, 0 to {len(self.channels) - 1}, got {self.positional_from}")
        if self.positional_from and not self.positional:
            raise UserError("positional_from needs positional maps (positional > 0)")

    @property
    def ckpt_every(self) -> int:
        """Optimizer states are stored every ~sqrt(T) steps for replay and resume."""
        return max(1, math.ceil(math.sqrt(self.steps)))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def likelihood_kwargs(self) -> dict:
        """The keyword arguments of engine.likelihood that this preset fixes."""
        return {"sigma": self.sigma, "eps": self.t_eps, "n_steps": self.bpd_steps}

    def to_dict(self) -> dict:
        """The config as JSON types. `ema`, `positional` and `positional_from` appear only when
        used, so that runs made before they existed keep their digest."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        for late in ("ema", "positional", "positional_from"):
            if not d[late]:
                del d[late]
        return d

    def ema_weights(self) -> torch.Tensor:
        """c (T,) float64: the model's weights are sum_k c[k-1] theta_k over the iterates k = 1..T
        (with ema = 0, c = (0, ..., 0, 1)). c_k = (1 - b) b^(T-k) / (1 - b^T): the normalized EMA."""
        k = torch.arange(1, self.steps + 1, dtype=torch.float64)
        if not self.ema:
            return (k == self.steps).to(torch.float64)
        b = self.ema
        return (1 - b) * b ** (self.steps - k) / (1 - b ** self.steps)


PRESETS: dict[str, Preset] = {
    # tiny: the tests' preset. Its likelihood grid is 2 RK4 steps (8 network evaluations, half of 4
    # steps' cost): on test digits, a rotation and noise it reads 0.5-0.9 bits/dim below dopri5
    # (4 steps: 0.1-0.2), in the same order. The tests check mechanics and consistency on it (a
    # gradient against finite differences of the same function, MAGIC against retraining under the
    # same grid), never the grid's accuracy, which benchmarks/grid_error.py measures on `cpu`.
    "tiny": Preset("tiny", n_train=64, source="offline", channels=(8, 16), embed_dim=16, groups=4,
                   batch_size=16, steps=24, lr=2e-3, warmup=0.1, betas=(0.9, 0.99), eps_root=1e-6, bpd_steps=2),
    # lr 5e-4: the smoothness grid's winner (results/grid_small: Spearman 0.97-0.99 against
    # retraining where lr 2e-3 gave 0.38-0.76); larger steps make training chaotic, so removing
    # 1% of the data moves the model in ways a first-order prediction cannot follow.
    "small": Preset("small", n_train=500, source="offline", channels=(16, 32, 64), embed_dim=64, groups=4,
                    batch_size=32, steps=400, lr=5e-4, warmup=0.1, betas=(0.9, 0.99), eps_root=1e-6),
    # cpu: a new image's influences come from the shipped query basis (shipped/cpu), so training
    # may be longer than a per-query replay could afford: 3,000 steps, at half small's learning
    # rate and with Adam's eps at 1e-2 (inside the square root), which keep the metagradient
    # smooth, and learned positional maps at ten times the learning rate (x10), with which the net
    # tells a digit from its rotation by a right angle (Figure 2's rotation gap +0.379 on test
    # digits, where x5 gave +0.275 and the same training without maps +0.089:
    # results/figure2_cpu_positional_x10, results/figure2_cpu_positional_x5,
    # results/figure2_cpu_lr2.5e-4_eps1e-2); x10 rather than x5 because all four of its Figure 2
    # means lie closer to the seed's than the 600-step cpu's did (results/figure2_versus_cpu600_x10),
    # where x5's averaged digits fell farther. LDS protocol A against retraining 0.988
    # (results/lds_cpu_positional_x10); x5 0.982 (results/lds_cpu_positional_x5); without the maps
    # 0.979 (results/lds_cpu_lr2.5e-4_eps1e-2); plain 3,000 steps 0.846 (results/lds_cpu_3000_steps).
    "cpu": Preset("cpu", n_train=2000, source="offline", channels=(16, 32, 64), embed_dim=64, groups=4,
                  batch_size=64, steps=3000, lr=2.5e-4, warmup=0.1, betas=(0.9, 0.99), eps_root=1e-2,
                  positional=10.0),
    "gpu": Preset("gpu", n_train=60000, source="torchvision", channels=(32, 64, 128, 256), embed_dim=256, groups=8,
                  batch_size=256, steps=11700, lr=1e-3, warmup=0.02, betas=(0.9, 0.999), eps_root=1e-8,
                  bpd_steps=16, device="cuda"),
}


def label(p: Preset) -> str:
    """How reports name a configuration: "`cpu`", or "`cpu` with steps=3000, lr=0.00025" for a
    variant of a named preset (the fields that differ), so a report never passes one for the other."""
    base = PRESETS.get(p.name)
    if base is None:
        return f"`{p.name}` (not a named preset)"
    diff = [f"{f.name}={getattr(p, f.name)!r}" for f in dataclasses.fields(p)
            if getattr(p, f.name) != getattr(base, f.name)]
    return f"`{p.name}`" + (f" with {', '.join(diff)}" if diff else "")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_from_dict(d: dict) -> Preset:
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def digest(obj: dict) -> str:
    """sha256 of the canonical JSON of `obj`: the identity of a config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
