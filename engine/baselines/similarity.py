"""The trivial baselines papers report: how alike a training image is to the query.

A similar training image is taken to be a proponent, so the score (grad_w's sign convention:
negative = proponent) is minus the cosine similarity, either of raw pixels or of the score
network's own bottleneck features (the last encoder level, after its GroupNorm and SiLU) for the
clean image presented at a few noise levels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine import sde
from engine.store import Run


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """a (Q, d), b (n, d) -> (Q, n) cosine similarities."""
    return (F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T).numpy()


def pixel_scores(images: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """-cos(x_q, image_i) over raw pixels: images (n, 1, 28, 28), x (Q, 1, 28, 28) -> (Q, n)."""
    return -_cosine(x.reshape(len(x), -1), images.reshape(len(images), -1))


@torch.no_grad()
def network_features(run: Run, x: torch.Tensor, stds: tuple = (0.1, 0.5), batch: int = 256) -> torch.Tensor:
    """(B, d) bottleneck features of x (B, 1, 28, 28) at the times where s(t) = each of `stds`,
    concatenated over the levels."""
    model = run.model().eval()
    caught = []
    hook = model.enc_n[-1].register_forward_hook(lambda mod, inp, out: caught.append(F.silu(out).flatten(1)))
    try:
        per_level = []
        for s in stds:
            t = sde.time_of_std(torch.tensor(float(s)), model.sigma).float()
            for i in range(0, len(x), batch):
                xb = x[i: i + batch].float()
                model(xb, t.expand(len(xb)))
            per_level.append(torch.cat(caught))
            caught.clear()
    finally:
        hook.remove()
    return torch.cat(per_level, dim=1)


def feature_scores(run: Run, images: torch.Tensor, x: torch.Tensor, stds: tuple = (0.1, 0.5)) -> np.ndarray:
    """-cos of the score network's features (network_features): -> (Q, n)."""
    return -_cosine(network_features(run, x, stds), network_features(run, images, stds))
