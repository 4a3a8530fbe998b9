"""Are a run's samples digits? A small MNIST classifier's confidence on them.

The classifier is a two-layer CNN trained on the bundled training images (all 5,000, which every
preset's set is nested in) and tested on the official 10,000 test digits. A sample counts as a
digit when the classifier gives one class probability >= 0.9: the share of such samples is the
sample-quality number of the issue and of `experiments/sample_quality.py`. The classifier is
cached on disk (runs/classifier by default), keyed by its recipe and the training images' checksum.

That classifier has only ever seen digits, so it must put every image in some class, and it is
confident on many images that are no digit at all: noise, for one, it mostly calls an "8" with
confidence (`experiments/sample_quality.py` measures how often, on the `outliers` below made from
held-out test digits). The strict measure beside it (`STRICT`) is an ensemble of five
classifiers of the same recipe (seeds 0-4; their mean probability), each trained with outlier
exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019): every batch of digits is paired with as many
images that are not digits, whose target is the uniform distribution over the ten classes (loss
weight 0.5). The outliers are made from the same batch: uniform noise, Bernoulli noise, thresholded
smoothed noise (blobs), and the digits cut into 7x7 patches and shuffled (strokes without a digit's
layout, what an undertrained model draws). Ensembles also disagree off the data, which lowers their
mean confidence there (Lakshminarayanan et al., NeurIPS 2017).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from engine import atomic, data

RECIPE = {"epochs": 8, "batch": 64, "lr": 1e-3, "seed": 0, "n_train": 5000, "shift": 2}
# the strict measure: RECIPE with outlier exposure, one classifier per seed
STRICT = {**RECIPE, "outlier_weight": 0.5}
STRICT_SEEDS = (0, 1, 2, 3, 4)
OUTLIER_KINDS = ("uniform noise", "Bernoulli noise", "blobs", "shuffled patches")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def _shift(x: torch.Tensor, g: torch.Generator, k: int) -> torch.Tensor:
    """Random translations by up to k pixels (samples are not centred as carefully as MNIST)."""
    dx, dy = (int(v) for v in torch.randint(-k, k + 1, (2,), generator=g))
    return torch.roll(x, (dy, dx), (2, 3))


def outliers(x: torch.Tensor, g: torch.Generator, kinds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images that are not digits, one per digit of x (B, 1, 28, 28), of the kinds OUTLIER_KINDS
    (indices (B,) into it; drawn uniformly from g when None): uniform noise; Bernoulli noise with
    density 0.1-0.6; blobs (uniform noise averaged over 5x5 and thresholded at 0.50-0.56); and
    the digit itself cut into 16 patches of 7x7, shuffled. Returns (B, 1, 28, 28) in [0, 1]."""
    b = len(x)
    if kinds is None:
        kinds = torch.randint(0, len(OUTLIER_KINDS), (b,), generator=g)
    uniform = torch.rand(x.shape, generator=g)
    density = torch.rand(b, 1, 1, 1, generator=g) * 0.5 + 0.1
    bernoulli = (torch.rand(x.shape, generator=g) < density).to(x.dtype)
    smooth = nn.functional.avg_pool2d(torch.rand(x.shape, generator=g), 5, 1, 2)
    blobs = (smooth > torch.rand(b, 1, 1, 1, generator=g) * 0.06 + 0.5).to(x.dtype)
    # (B, 1, 4, 4, 7, 7) patches -> 16 in a random order per image -> the 4 x 4 grid again
    patches = x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(b, 16, 7, 7)
    order = torch.argsort(torch.rand(b, 16, generator=g), 1)
    patches = patches[torch.arange(b)[:, None], order]
    shuffled = patches.reshape(b, 4, 4, 7, 7).permute(0, 1, 3, 2, 4).reshape(b, 1, 28, 28)
    return torch.stack([uniform, bernoulli, blobs, shuffled], 1)[torch.arange(b), kinds]


def train_classifier(recipe: dict = RECIPE, callback: Optional[Callable[[dict], None]] = None) -> nn.Module:
    """A CNN trained on the bundled training images by `recipe` (deterministic given its seed).
    With recipe["outlier_weight"] w > 0, each batch's loss adds w times the cross-entropy between
    the uniform distribution and the net's output on `outliers` of that batch (outlier exposure)."""
    torch.manual_seed(recipe["seed"])
    x, y = data.load_train(recipe["n_train"])
    net, g = _net(), torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    n, b = len(x), recipe["batch"]
    for epoch in range(recipe["epochs"]):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, b):
            idx = perm[i: i + b]
            loss = nn.functional.cross_entropy(net(_shift(x[idx], g, recipe["shift"])), y[idx])
            if recipe.get("outlier_weight", 0) > 0:
                logp = nn.functional.log_softmax(net(outliers(x[idx], g)), 1)
                loss = loss - recipe["outlier_weight"] * logp.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if callback is not None:
            callback({"epoch": epoch + 1, "epochs": recipe["epochs"], "loss": float(loss.detach())})
    return net.eval()


def load_classifier(root: Path = Path("runs/classifier"), recipe: dict = RECIPE, callback=None) -> nn.Module:
    """The cached classifier for `recipe`, trained (and saved atomically) when missing or stale."""
    x, _ = data.load_train(recipe["n_train"])
    key = hashlib.sha256(repr(sorted(recipe.items())).encode() + x.numpy().tobytes()).hexdigest()[:16]
    path = Path(root) / f"classifier_{key}.pt"
    net = _net()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    net = train_classifier(recipe, callback)
    atomic.save_torch(net.state_dict(), path)
    return net


class Ensemble(nn.Module):
    """Classifiers whose mean probability is the ensemble's: forward returns the log of it, so
    that softmax of the output (as `probabilities` takes) is the members' mean softmax."""

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([nn.functional.log_softmax(n(x), 1) for n in self.nets])
        return torch.logsumexp(logp, 0) - np.log(len(self.nets))


def load_strict(root: Path = Path("runs/classifier"), recipe: dict = STRICT, seeds=STRICT_SEEDS,
                callback=None) -> Ensemble:
    """The strict measure's ensemble: one cached classifier per seed, trained by `recipe`."""
    return Ensemble([load_classifier(root, {**recipe, "seed": s}, callback) for s in seeds]).eval()


@torch.no_grad()
def probabilities(net: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Class probabilities (B, 10) of images x (B, 1, 28, 28), clipped to [0, 1] first."""
    x = x.clamp(0, 1)
    return torch.cat([torch.softmax(net(x[i: i + batch]), 1) for i in range(0, len(x), batch)])


def test_accuracy(net: nn.Module) -> float:
    """Accuracy on the official 10,000 MNIST test digits."""
    x, y = data.load_test()
    return float((probabilities(net, x).argmax(1) == y).float().mean())


def confident_share(net: nn.Module, x: torch.Tensor, threshold: float = 0.9) -> dict:
    """{"share": fraction of images whose top class probability >= threshold, "labels": (B,) top
    classes, "confidence": (B,) top probabilities, "histogram": count per class among the confident}."""
    p = probabilities(net, x)
    conf, lab = p.max(1)
    ok = conf >= threshold
    return {"share": float(ok.float().mean()), "labels": lab.tolist(), "confidence": conf.tolist(),
            "histogram": np.bincount(lab[ok].numpy(), minlength=10).tolist()}
