"""Synthetic photos of digits on paper, to check that an upload's preprocessing
(engine.images.preprocess_image) gives back the digit: a digit in dark ink on paper that is evenly
or unevenly lit and grainy, with or without a margin around it, and digits cropped tight.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

LIGHTS = ("even", "gradient", "vignette")


def _ink(digit: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) array in [0, 1] of MNIST-format ink, resized to size (width, height), bicubic."""
    img = Image.fromarray((np.clip(digit, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.float64) / 255


def paper(ink: np.ndarray, light: str = "gradient", sd: float = 8.0, seed: int = 0) -> np.ndarray:
    """Ink (h, w) in [0, 1] on paper as a camera sees it, grey levels (h, w) in [0, 255], unclipped.

    light: "even" (200 everywhere), "gradient" (150 at one corner to 240 at the other) or
    "vignette" (235 at the centre, darker towards the corners, to 145); the ink darkens the paper
    by 80% at full strength; sd: the grain's standard deviation in grey levels (Gaussian).
    """
    h, w = ink.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if light == "even":
        level = np.full((h, w), 200.0)
    elif light == "gradient":
        level = 150 + 90 * (0.6 * xx / w + 0.4 * yy / h)
    elif light == "vignette":
        level = 235 - 180 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    else:
        raise ValueError(f"light must be one of {LIGHTS}, not {light!r}")
    return level * (1 - 0.8 * ink) + np.random.default_rng(seed).normal(0, sd, (h, w))


def phone_photo(digit: np.ndarray, light: str = "gradient", sd: float = 8.0, margin: int = 60, seed: int = 0) -> bytes:
    """An MNIST digit (28, 28) drawn 280 x 280 (its own 4-pixel padding included) with `margin`
    pixels of paper above and below and margin + 30 at the sides, photographed as `paper` says:
    JPEG bytes (quality 80)."""
    ink = np.zeros((280 + 2 * margin, 340 + 2 * margin))
    ink[margin: margin + 280, margin + 30: margin + 310] = _ink(digit, (280, 280))
    return jpeg(paper(ink, light, sd, seed))


def tight_crop(digit: np.ndarray, scale: int = 15) -> np.ndarray:
    """An MNIST digit (28, 28) cropped to its ink (pixels above 0.1) and enlarged `scale` times:
    ink (h, w) in [0, 1], no margin at all."""
    ys, xs = np.nonzero(digit > 0.1)
    crop = digit[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    return _ink(crop, (crop.shape[1] * scale, crop.shape[0] * scale))


def jpeg(grey: np.ndarray, quality: int = 80) -> bytes:
    """Grey levels (h, w), clipped to [0, 255], as RGB JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(grey: np.ndarray) -> bytes:
    """Grey levels (h, w), clipped to [0, 255], as 8-bit grayscale PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def match(x, digit) -> float:
    """Pixel correlation of two 28 x 28 images (any shape that reshapes to it), the best over
    shifts of at most one pixel (centring by mass is only defined to the nearest pixel, in MNIST
    as in preprocessing)."""
    a, b = np.asarray(x, dtype=np.float64).reshape(28, 28), np.asarray(digit, dtype=np.float64).reshape(28, 28)
    return max(float(np.corrcoef(np.roll(a, (dy, dx), (0, 1)).ravel(), b.ravel())[0, 1])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))
