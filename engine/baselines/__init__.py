"""Attribution baselines in grad_w's shape (Q, n) and sign convention (negative = proponent).

    from engine.baselines import scores
    s = scores("trak", run, x)          # x (Q, 1, 28, 28) -> (Q, n)

Methods: trak, dtrak, ltrak (engine.baselines.trak, through `traker`), pixel, feature
(engine.baselines.similarity). MAGIC itself is engine.attribution. Parameters (projection
dimension, timesteps, damping, noise levels) have defaults fixed before any evaluation and are
passed as keyword arguments.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from engine import data
from engine.errors import UserError
from engine.store import Run

METHODS = ("trak", "dtrak", "ltrak", "pixel", "feature")

DESCRIPTIONS = {
    "magic": "MAGIC: exact metagradient of the exact BPD through all of training",
    "trak": "TRAK, denoising loss averaged over 10 timesteps, projected to 2048 dims",
    "dtrak": "D-TRAK: squared-norm output function, same timesteps and projection",
    "ltrak": "likelihood-TRAK: TRAK's kernel with the exact-BPD gradient as the query feature",
    "pixel": "cosine similarity of raw pixels",
    "feature": "cosine similarity of the score network's bottleneck features",
}


def scores(method: str, run: Run, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None,
           **params) -> np.ndarray:
    """(Q, n) scores of `method` for queries x (Q, 1, 28, 28) on the run's final model."""
    from engine.baselines import similarity, trak
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    if method in trak.VARIANTS:
        return trak.trak_scores(run, images, x, method, callback=callback, **params)
    if method == "pixel":
        return similarity.pixel_scores(images, x)
    if method == "feature":
        return similarity.feature_scores(run, images, x, **params)
    raise UserError(f"unknown method {method!r}; choose magic or one of {', '.join(METHODS)}")
