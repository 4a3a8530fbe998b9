"""Which retrainings a protocol asks for.

Protocol A (the seed write-up's): K random drop-sets of ceil(frac * n) images, each retrained once
with the run's seed (same batches and noise: only the dropped images' weights change).
Protocol B (the diffusion-attribution literature's): K random subsets keeping round(alpha * n)
images, each retrained with several seeds and the BPDs averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError


def drop_sets(n: int, k: int, frac: float, seed: int) -> np.ndarray:
    """(K, m) sorted training indices, m = ceil(frac * n) (DESIGN.md), no repeats within a set."""
    if not 0 < frac < 1:
        raise UserError(f"--frac must be between 0 and 1, got {frac}")
    if k < 3:
        raise UserError(f"--drop-sets must be at least 3 for a rank correlation, got {k}")
    m = max(1, math.ceil(frac * n - 1e-9))
    rng = np.random.default_rng([seed, n, m])
    return np.stack([np.sort(rng.choice(n, m, replace=False)) for _ in range(k)])


def keep_sets(n: int, k: int, alpha: float, seed: int) -> np.ndarray:
    """(K, m) sorted indices each protocol-B subset keeps, m = round(alpha * n)."""
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1, got {alpha}")
    if k < 3:
        raise UserError(f"--subsets must be at least 3 for a rank correlation, got {k}")
    m = max(1, round(alpha * n))
    rng = np.random.default_rng([seed, n, m, 1])
    return np.stack([np.sort(rng.choice(n, m, replace=False)) for _ in range(k)])


@dataclass
class Plan:
    """What a protocol retrains: drops (K, m) removed per retrain, with `seeds` seeds each."""
    protocol: str
    drops: np.ndarray
    seeds: int
    settings: dict  # frac or alpha, and the seed of the sets: for the report


def plan(protocol: str, n: int, k: int, *, frac: float = 0.01, alpha: float = 0.5, seeds: int = 2,
         seed: int = 0) -> Plan:
    if protocol == "A":
        return Plan("A", drop_sets(n, k, frac, seed), 1, {"frac": frac, "seed": seed})
    if protocol == "B":
        if seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {seeds}")
        keep = keep_sets(n, k, alpha, seed)
        return Plan("B", np.stack([np.setdiff1d(np.arange(n), s) for s in keep]), seeds, {"alpha": alpha, "seed": seed})
    raise UserError(f"--protocol must be A or B, got {protocol!r}")
