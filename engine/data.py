"""MNIST loading, the deterministic train/query split, and the transforms of the likelihood
comparison (rotate / average / noise). Users' own images: engine.images.

Images are float tensors in [0, 1], shape (1, 28, 28) each, white digit on black, as in MNIST.
"""

from __future__ import annotations

import gzip
import socket
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from engine.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"
SPLIT_SEED = 20261128     # fixes which bundled images each preset trains on
# torchvision opens its mirrors with no timeout: on a network that drops packets (a firewall, a
# GPU machine without internet) each of its 8 tries waits for the OS, minutes in all. A mirror
# silent this long counts as unreachable.
DOWNLOAD_TIMEOUT = 30.0


# ---------------------------------------------------------------- loading

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=None)
def _bundled_train() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_DIR / "train_5k.npz", allow_pickle=False) as z:
        return z["images"], z["labels"]


@lru_cache(maxsize=None)
def _test_set() -> tuple[np.ndarray, np.ndarray]:
    return _read_idx(DATA_DIR / "t10k-images-idx3-ubyte.gz"), _read_idx(DATA_DIR / "t10k-labels-idx1-ubyte.gz")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def load_train(n: int, source: str = "offline", root: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set of a preset: images (n, 1, 28, 28) in [0,1] and labels (n,).

    "offline": the first n of a fixed permutation of the bundled 5k subset, so smaller presets'
    sets are nested in larger ones. "torchvision": the first n of full MNIST, downloaded once.
    """
    if source == "offline":
        images, labels = _bundled_train()
        if n > len(images):
            raise UserError(f"the bundled MNIST subset has {len(images)} images; {n} were asked for")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))[:n]
        return _to_tensor(images[order]), torch.from_numpy(labels[order].astype(np.int64))
    if source == "torchvision":
        from torchvision.datasets import MNIST
        root = Path(root or Path.home() / ".cache" / "mnist-torchvision")
        before = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # process-wide, for the download only
        try:
            ds = MNIST(str(root), train=True, download=True)
        except Exception as e:  # no network, proxy, disk, silence: all end the same way for the user
            raise UserError(f"full MNIST could not be downloaded to {root} ({type(e).__name__}); "
                            f"this needs internet once, or use a preset on the bundled data (tiny, small, cpu)") from None
        finally:
            socket.setdefaulttimeout(before)
        return _to_tensor(ds.data.numpy()[:n]), ds.targets[:n].clone()
    raise UserError(f"unknown data source {source!r}")


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The official MNIST test set: images (10000, 1, 28, 28) in [0,1], labels (10000,)."""
    images, labels = _test_set()
    return _to_tensor(images), torch.from_numpy(labels.astype(np.int64))


def query_indices(k: int, seed: int = 0) -> list[int]:
    """A deterministic sample of k test-set indices: the standard query set for evaluations."""
    return [int(i) for i in np.random.default_rng([SPLIT_SEED, seed]).permutation(10000)[:k]]


# ---------------------------------------------------------------- comparison transforms

def rotate(x: torch.Tensor, degrees: float, interpolation: str = "bilinear") -> torch.Tensor:
    """Rotate (..., 28, 28) images counter-clockwise about the centre (zero fill), resampling
    "bilinear" or "nearest" (torchvision's default); multiples of 90 degrees are exact either way."""
    orders = {"nearest": 0, "bilinear": 1}
    if interpolation not in orders:
        raise ValueError(f"interpolation is nearest or bilinear, not {interpolation!r}")
    a = x.detach().cpu().numpy()
    r = ndimage.rotate(a, degrees, axes=(-1, -2), reshape=False, order=orders[interpolation], mode="constant")
    return quantize(torch.from_numpy(np.clip(r, 0, 1)).to(x.dtype))


def average(xs: torch.Tensor) -> torch.Tensor:
    """Pixel-wise mean of k images: (k, 1, 28, 28) -> (1, 28, 28)."""
    return quantize(xs.mean(0))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels k/255, as every image the model is asked about."""
    return torch.round(x * 255) / 255


def uniform_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """n images of i.i.d. uniform 8-bit pixels: (n, 1, 28, 28)."""
    return torch.randint(0, 256, (n, 1, 28, 28), generator=generator).float() / 255.0
