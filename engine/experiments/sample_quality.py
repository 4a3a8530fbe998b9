"""Are a run's samples digits? A small MNIST classifier's confidence on them.

The classifier is a two-layer CNN trained on the bundled training images (all 5,000, which every
preset's set is nested in) and tested on the official 10,000 test digits. A sample counts as a
digit when the classifier gives one class probability >= 0.9: the share of such samples is the
sample-quality number of the issue and of `experiments/sample_quality.py`. The classifier is
cached on disk (runs/classifier by default), keyed by its recipe and the training images' checksum.
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


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def _shift(x: torch.Tensor, g: torch.Generator, k: int) -> torch.Tensor:
    """Random translations by up to k pixels (samples are not centred as carefully as MNIST)."""
    dx, dy = (int(v) for v in torch.randint(-k, k + 1, (2,), generator=g))
    return torch.roll(x, (dy, dx), (2, 3))


def train_classifier(recipe: dict = RECIPE, callback: Optional[Callable[[dict], None]] = None) -> nn.Module:
    """A CNN trained on the bundled training images by `recipe` (deterministic given its seed)."""
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
