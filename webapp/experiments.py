"""The Compare and Verify pages' computations: a digit's variants, and the BPD of an image after
retraining without a set of training images (a memoized background job, see webapp.service)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from cache import make_key
from engine import data
from engine.store import Run
from webapp.service import Callback, jobs, test_set


def variants(x: torch.Tensor, angle: float, k_avg: int, seed: int) -> dict[str, torch.Tensor]:
    """A test digit (1, 28, 28) rotated by `angle`, averaged with k_avg - 1 other test digits, and noise."""
    tx = torch.from_numpy(test_set()[0])
    others = tx[data.query_indices(k_avg + 1, seed=seed + 1000)]
    others = torch.cat([x[None], others[: k_avg - 1]]) if k_avg > 1 else x[None]
    return {"original": x, "rotated": data.rotate(x, angle), "averaged": data.average(others),
            "noise": data.uniform_noise(1, torch.Generator().manual_seed(seed))[0]}


def retrain_key(run: Run, x: torch.Tensor, drop: np.ndarray) -> str:
    drop = np.unique(np.asarray(drop, np.int64))
    return make_key("retrain", run.digest, np.concatenate([drop.astype(np.float32), x.numpy().ravel()]),
                    run.preset.likelihood_kwargs)


def _retrain(run: Run, x: torch.Tensor, drop: np.ndarray, cb: Callback) -> dict:
    from engine.experiments.bank import retrain_bpd
    cb({"stage": "retraining", "i": 0, "n": 1})
    b = retrain_bpd(run.preset, run.seed, drop, x[None])
    return {"bpd": float(b[0]), "drop": drop}


def retrain_job(run: Run, x: torch.Tensor, drop: np.ndarray, label: str):
    """Retrain the run without `drop` (same seed) and measure the BPD of x (1, 28, 28)."""
    key = retrain_key(run, x, drop)
    drop = np.unique(np.asarray(drop, np.int64))
    return jobs().submit(key, functools.partial(_retrain, run, x, drop), label=label, lane="requested")
