"""Arbitrary images and arrays into MNIST format: what a user draws, uploads or names on the
command line becomes a float tensor (1, 28, 28) in [0, 1], white digit on black, or a one-line
UserError. Sizes are bounded before decoding (decompression bombs) and before conversion to
floats (memory)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from scipy.optimize import least_squares

from engine.data import _test_set, _to_tensor
from engine.errors import UserError

MAX_PIXELS = 40_000_000   # refuse larger images before decoding them (decompression bombs)
MAX_BYTES = 50_000_000
MAX_SIDE = 1024           # larger images are box-reduced before conversion to floats (bounded memory)


def open_image(data: bytes, name: str = "image") -> Image.Image:
    """Decode image bytes safely; every failure is a one-line UserError."""
    if len(data) > MAX_BYTES:
        raise UserError(f"{name}: file too large ({len(data) / 1e6:.0f} MB; the limit is {MAX_BYTES / 1e6:.0f} MB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{name}: image too large ({w}x{h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels)")
            img.load()
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image (PNG, JPEG, GIF, BMP, TIFF or WebP are understood)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name}: image too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UserError(f"{name}: the image file is damaged or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return img


def to_gray(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float array (H, W) in [0, 1]; transparency is flattened onto the
    background that contrasts with the ink (a transparent canvas with black strokes reads
    as black on white, one with white strokes as white on black).

    An image larger than MAX_SIDE on a side is first box-reduced by an integer factor in its
    8/32-bit form, so memory stays bounded (a 40-megapixel upload would otherwise become a
    1.3 GB float64 RGBA array); the digit ends up 20x20 pixels anyway.
    """
    factor = -(-max(img.size) // MAX_SIDE)
    if factor > 1:
        if img.mode in ("I;16", "I;16B", "I;16L"):
            img = img.convert("I")
        elif img.mode in ("1", "P", "PA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV") or (
                "transparency" in img.info and img.mode not in ("RGBA", "LA")):
            img = img.convert("RGBA" if (img.mode in ("P", "PA", "La", "RGBa") or "transparency" in img.info) else "L")
        img = img.reduce(factor)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return np.clip(a / hi, 0, 1)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64) / 255.0
        alpha = rgba[..., 3]
        lum = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
        if alpha.min() < 1.0:
            opaque = alpha > 0.5
            ink_lum = lum[opaque].mean() if opaque.any() else 0.0
            bg = 1.0 if ink_lum < 0.5 else 0.0
            return lum * alpha + bg * (1 - alpha)
        return lum
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def flatten_background(g: np.ndarray, blocks: int = 8) -> np.ndarray:
    """Even out a photo's paper: g (H, W) in [0, 1], ink brighter than paper -> the same with the
    paper's light and grain taken off, or g itself (the very array) when it is not such a photo.

    A phone photo of a digit on paper is grainy and often lit unevenly (a gradient, vignetting),
    where MNIST's scans were clean; subtracting one background level then leaves the grain or
    the darker side of the paper as "ink", and the crop keeps it. Here the image is cut into
    `blocks` x `blocks` blocks; a block's median is its paper's level (ink covers less than half
    of most blocks) and (median - lower quartile) / 0.674 its grain's standard deviation. A
    surface a + b x + c y + d x^2 + e y^2 (a gradient, vignetting) is fitted to the blocks'
    levels by robust least squares (a Cauchy loss at the scale of 2 grey levels, so that the
    blocks that are mostly ink barely pull on it). Then the image, smoothed by a Gaussian of 1/300
    of its size (else the grain's rare large values survive as specks), less that surface and 4
    standard deviations of the smoothed grain, is returned.

    It is left as it is when fewer than 2/3 of the blocks lie within 6 grey levels of the surface
    (the digit fills the image: cropped tight, where one level for the paper does as well), when
    it has no grain (under 1 grey level: a drawing on the canvas, an MNIST digit; none of the
    10,000 test digits changes), or when the "grain" is ink (over 1/12 of the range).
    """
    h, w = g.shape
    ey = np.linspace(0, h, min(blocks, h) + 1).round().astype(int)
    ex = np.linspace(0, w, min(blocks, w) + 1).round().astype(int)
    level, grain, cy, cx = [], [], [], []
    for y0, y1 in zip(ey[:-1], ey[1:]):
        for x0, x1 in zip(ex[:-1], ex[1:]):
            q25, q50 = np.percentile(g[y0:y1, x0:x1], [25, 50])
            level.append(q50)
            grain.append((q50 - q25) / 0.674)
            cy.append((y0 + y1 - 1) / 2)
            cx.append((x0 + x1 - 1) / 2)
    level = np.array(level)

    def terms(v: np.ndarray, u: np.ndarray) -> list:  # the surface's monomials, coordinates in [-1, 1]
        return [np.ones_like(u * v), u + 0 * v, v + 0 * u, u * u + 0 * v, v * v + 0 * u]
    to_u, to_v = (lambda x: 2 * x / max(w - 1, 1) - 1), (lambda y: 2 * y / max(h - 1, 1) - 1)
    a = np.stack(terms(to_v(np.array(cy)), to_u(np.array(cx))), 1)
    x0 = np.zeros(a.shape[1])
    x0[0] = np.median(level)
    coef = least_squares(lambda c: a @ c - level, x0, loss="cauchy", f_scale=2 / 255).x
    paper = np.abs(a @ coef - level) <= 6 / 255  # the blocks that are paper
    if paper.mean() < 2 / 3:  # the digit fills the image (cropped tight): the blocks' levels are mostly ink's
        return g
    sd = float(np.median(np.array(grain)[paper]))
    if not 1 / 255 <= sd <= 1 / 12:  # no grain (not a photo), or "grain" that is ink
        return g
    surface = sum(c * t for c, t in zip(coef, terms(to_v(np.arange(h))[:, None], to_u(np.arange(w))[None, :])))
    smooth = ndimage.gaussian_filter(g, max(1.0, max(h, w) / 300))
    smoothed = [(q50 - q25) / 0.674 for (q25, q50), keep in
                zip((np.percentile(smooth[y0:y1, x0:x1], [25, 50]) for y0, y1 in zip(ey[:-1], ey[1:])
                     for x0, x1 in zip(ex[:-1], ex[1:])), paper) if keep]  # the smoothed grain's sd, per paper block
    return np.clip(smooth - surface - 4 * float(np.median(smoothed)), 0, None)


def preprocess_array(gray: np.ndarray, name: str = "image") -> torch.Tensor:
    """An (H, W) grayscale array in [0,1] -> (1, 28, 28) MNIST-format tensor.

    As MNIST was made: invert if the digit is dark on light (judged by the border), even out a
    photo's paper (`flatten_background`), stretch contrast, crop to the digit, fit it in a 20x20
    box keeping its aspect ratio (anti-aliased), and place it in 28x28 with its centre of mass at
    the centre.
    """
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 1:
        raise UserError(f"{name}: expected a 2-D image, got shape {g.shape}")
    if not np.isfinite(g).all():
        raise UserError(f"{name}: the image contains NaN or infinite values")
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if np.median(border) > 0.5:
        g = 1.0 - g
    g = flatten_background(g)
    bg = np.median(np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]]))
    g = np.clip(g - bg, 0, None)
    peak = g.max()
    if peak < 0.1:
        raise UserError(f"{name}: no digit found (the image is blank or has almost no contrast)")
    g = g / peak
    rows, cols = np.nonzero(g > 0.1)
    g = g[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    h, w = g.shape
    scale = 20.0 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    box = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float64) / 255.0
    canvas = np.zeros((28, 28))
    top, left = (28 - nh) // 2, (28 - nw) // 2
    canvas[top: top + nh, left: left + nw] = box
    cy, cx = ndimage.center_of_mass(canvas)
    canvas = ndimage.shift(canvas, (round(13.5 - cy), round(13.5 - cx)), order=0, mode="constant")
    # Quantize to 8 bits like every MNIST image, so BPD's +8 offset means what it says.
    return torch.from_numpy(np.round(np.clip(canvas, 0, 1) * 255) / 255).float().unsqueeze(0)


def preprocess_image(data: bytes, name: str = "image") -> torch.Tensor:
    """Image file bytes (PNG, JPEG, ...) -> (1, 28, 28) MNIST-format tensor."""
    return preprocess_array(to_gray(open_image(data, name)), name)


def load_npy(data: bytes, name: str = "array") -> torch.Tensor:
    """A .npy float array of shape (28, 28) in [0,1], taken as is -> (1, 28, 28).

    The header is checked before anything is allocated: a header declaring a huge array is
    refused without reserving what it declares."""
    try:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(f)
    except Exception as e:
        raise UserError(f"{name}: not a readable .npy array ({type(e).__name__})") from None
    if tuple(shape) != (28, 28):
        raise UserError(f"{name}: expected shape (28, 28), got {tuple(shape)}")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise UserError(f"{name}: not a readable .npy array ({type(e).__name__})") from None
    if a.shape != (28, 28):
        raise UserError(f"{name}: expected shape (28, 28), got {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise UserError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise UserError(f"{name}: the array contains NaN or infinite values")
    if a.min() < 0 or a.max() > 1:
        raise UserError(f"{name}: values must lie in [0, 1] (found {a.min():.3g} to {a.max():.3g})")
    return torch.from_numpy(a).float().unsqueeze(0)


def load_input(spec: str) -> torch.Tensor:
    """A CLI INPUT -> (1, 28, 28): `test:I`, a `.npy` array, or an image file."""
    if spec.startswith("test:"):
        try:
            i = int(spec[5:])
        except ValueError:
            raise UserError(f"{spec}: expected test:I with an integer I") from None
        if not 0 <= i < 10000:
            raise UserError(f"{spec}: the MNIST test set has indices 0..9999")
        images, _ = _test_set()
        return _to_tensor(images[i: i + 1])[0]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{spec}: {'a folder, not an image file' if path.is_dir() else 'no such file'}")
    data = path.read_bytes()
    if path.suffix.lower() == ".npy":
        return load_npy(data, spec)
    return preprocess_image(data, spec)
