"""Preprocessing of arbitrary images into MNIST format, and every bad input's one-line error."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import data, images
from engine.errors import UserError
from engine.experiments import photos


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _photo_of_digit(i: int) -> tuple[torch.Tensor, Image.Image]:
    """Test digit i drawn large, dark on a light, off-centre canvas: how a person's upload looks."""
    x, _ = data.load_test()
    digit = Image.fromarray((255 - x[i, 0].numpy() * 255).astype(np.uint8)).resize((280, 280), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (500, 400), 235)
    canvas.paste(digit, (40, 90))
    return x[i], canvas


@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_an_upload_of_a_test_digit_comes_back_as_that_digit(i):
    original, photo = _photo_of_digit(i)
    x = images.preprocess_image(_png(photo))
    assert x.shape == (1, 28, 28) and x.min() >= 0 and x.max() == 1
    assert photos.match(x, original) > 0.85, photos.match(x, original)
    ys, xs = np.nonzero(x[0].numpy() > 0.1)
    assert ys.max() - ys.min() < 21 and xs.max() - xs.min() < 21  # fits the 20x20 box
    cy, cx = np.array(np.nonzero(x[0].numpy())).mean(1)
    mass = x[0].numpy()
    com = np.array([(mass.sum(1) * np.arange(28)).sum(), (mass.sum(0) * np.arange(28)).sum()]) / mass.sum()
    assert np.abs(com - 13.5).max() <= 1.0


@pytest.mark.parametrize("i,light,sd,margin", [(0, "gradient", 8, 60), (1, "vignette", 15, 0), (19, "gradient", 15, 60), (14, "even", 8, 60),
                                               (3, "gradient", 3, 0)])
def test_a_phone_photo_of_a_digit_comes_back_as_that_digit(i, light, sd, margin):
    # grainy, unevenly lit paper: one background level taken off the whole image left the grain
    # or the darker side of the paper as ink (results/photo_uploads: correlation 0.25-0.44 on average)
    x = data.load_test()[0][i, 0].numpy()
    got = images.preprocess_image(photos.phone_photo(x, light, sd, margin, seed=i), "photo.jpg")
    assert photos.match(got, x) > 0.9, photos.match(got, x)
    ys, xs = np.nonzero(got[0].numpy() > 0.1)
    assert ys.max() - ys.min() < 21 and xs.max() - xs.min() < 21


def test_clean_images_and_tight_crops_are_left_exactly_as_they_are():
    # a canvas drawing, MNIST digits, evenly lit paper without grain and a grainy photo of a digit
    # cropped tight: no correction at all, so drawings and clean uploads keep their pixels (and
    # bits/dim), and a digit that fills the image keeps its strokes
    canvas = np.zeros((280, 280))
    canvas[60:80, 70:210] = 1.0
    canvas[80:230, 120:140] = 0.8
    digits = data.load_test()[0][:2000, 0].numpy().astype(np.float64)
    flat = 1 - photos.paper(np.pad(photos.tight_crop(digits[5]), 80), "even", 0.0) / 255
    tight = 1 - np.clip(photos.paper(photos.tight_crop(digits[32]), "gradient", 8.0, seed=32), 0, 255) / 255
    for g in (canvas, flat, tight, *digits):
        assert images.flatten_background(g) is g
    # while the same paper, lit unevenly and grainy around a digit with a margin, is corrected:
    # its darker side is not ink
    ink = np.pad(photos.tight_crop(digits[2]), 80)
    uneven = 1 - np.clip(photos.paper(ink, "gradient", 8.0), 0, 255) / 255
    out = images.flatten_background(uneven)
    away = ink < 0.01
    away[60:-60, 60:-60] = False  # the paper well away from the digit
    assert uneven[away].max() > 0.35 and np.percentile(out[away], 99.9) == 0


def test_odd_modes_read_the_same_as_grayscale():
    _, photo = _photo_of_digit(0)
    ref = images.preprocess_image(_png(photo))
    a = np.asarray(photo)
    rgba = np.zeros((*a.shape, 4), np.uint8)
    rgba[..., 3] = 255 - a  # black ink, alpha = ink, transparent background
    variants = {
        "RGBA transparent": Image.fromarray(rgba, "RGBA"),
        "palette": photo.convert("P"),
        "16-bit": Image.fromarray(a.astype(np.uint16) * 257),
        "RGB": photo.convert("RGB"),
        "1-bit": photo.point(lambda v: 255 if v > 128 else 0).convert("1"),
    }
    for name, img in variants.items():
        got = images.preprocess_image(_png(img), name)
        assert photos.match(got, ref) > 0.95, name


def test_white_on_black_and_black_on_white_agree():
    _, photo = _photo_of_digit(1)
    inverted = Image.fromarray(255 - np.asarray(photo))
    assert photos.match(images.preprocess_image(_png(photo)), images.preprocess_image(_png(inverted))) > 0.99


def _huge_png_header(w: int, h: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


BAD_IMAGES = {
    "non-image bytes": (b"this is not an image at all", "not an image"),
    "truncated PNG": (None, "damaged or truncated"),
    "20000x20000 image": (_huge_png_header(20000, 20000), "too large"),
    "all-black canvas": (_png(Image.new("L", (300, 300), 0)), "no digit"),
    "all-white canvas": (_png(Image.new("L", (300, 300), 255)), "no digit"),
    "transparent canvas": (_png(Image.new("RGBA", (300, 300), (0, 0, 0, 0))), "no digit"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_give_one_line_errors(case):
    payload, msg = BAD_IMAGES[case]
    if payload is None:
        full = _png(_photo_of_digit(0)[1])
        payload = full[: len(full) // 2]
    with pytest.raises(UserError, match=msg) as e:
        images.preprocess_image(payload, case)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arr,msg", [
    (np.full((28, 28), np.nan), "NaN"),
    (np.zeros((32, 32)), "shape"),
    (np.full((28, 28), 2.0), r"\[0, 1\]"),
    (np.array(["a"] * 784).reshape(28, 28), "numeric"),
])
def test_bad_arrays_give_one_line_errors(arr, msg):
    with pytest.raises(UserError, match=msg):
        images.load_npy(_npy(arr))
    with pytest.raises(UserError, match="not a readable"):
        images.load_npy(b"\x93NUMPY garbage")


def test_inputs_by_spec(tmp_path):
    x, _ = data.load_test()
    assert torch.equal(images.load_input("test:7"), x[7])
    for bad in ["test:10000", "test:x", str(tmp_path / "missing.png")]:
        with pytest.raises(UserError):
            images.load_input(bad)


def test_training_subsets_are_nested_and_deterministic():
    a, la = data.load_train(64)
    b, lb = data.load_train(500)
    assert torch.equal(a, b[:64]) and torch.equal(la, lb[:64])
    assert sorted(set(lb.tolist())) == list(range(10))


def test_comparison_transforms():
    x, _ = data.load_test()
    r = data.rotate(x[:2], 90)
    assert torch.allclose(r, torch.rot90(x[:2], 1, dims=(-2, -1)), atol=1 / 255 + 1e-6)
    assert torch.allclose(data.rotate(x[:2], 90, "nearest"), r, atol=1 / 255 + 1e-6)
    # off the right angles, nearest keeps the digit's own grey levels; bilinear makes new ones
    levels = set(x[:2].flatten().tolist())
    assert set(data.rotate(x[:2], 45, "nearest").flatten().tolist()) <= levels
    assert not set(data.rotate(x[:2], 45).flatten().tolist()) <= levels
    with pytest.raises(ValueError):
        data.rotate(x[:2], 45, "bicubic")
    assert torch.allclose(data.average(x[:4]), torch.round(x[:4].mean(0) * 255) / 255)
    noise = data.uniform_noise(100, torch.Generator().manual_seed(0))
    assert noise.shape == (100, 1, 28, 28) and abs(noise.mean().item() - 0.5) < 0.01


def test_full_mnist_offline_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", NoNetwork)
    with pytest.raises(UserError, match="could not be downloaded.*needs internet"):
        data.load_train(60000, "torchvision", root=tmp_path)


def test_a_mirror_that_never_answers_is_a_clear_error_not_a_hang(monkeypatch, tmp_path):
    # a server that accepts connections and then says nothing, as behind a firewall that drops
    # packets: torchvision has no timeout of its own, so without engine.data's this test hangs
    import socket
    import threading
    import time
    import torchvision.datasets
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(16)], daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 0.5)
    before = socket.getdefaulttimeout()
    t0 = time.monotonic()
    with pytest.raises(UserError, match="could not be downloaded"):
        data.load_train(60000, "torchvision", root=tmp_path)
    assert time.monotonic() - t0 < 30  # 4 files x 1 mirror x 0.5 s, and some slack
    assert socket.getdefaulttimeout() == before  # the process's default is back
    server.close()


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """mkstemp's 0600 would make results unreadable to anyone else; a plain open() gives 0666 less the umask."""
    import os
    from engine import atomic
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for path, save in ((tmp_path / "a.json", lambda p: atomic.save_json({"a": 1}, p)),
                       (tmp_path / "b.txt", lambda p: atomic.save_text("b", p))):
        save(path)
        assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
    assert not list(tmp_path.glob(".*.tmp"))


_BIG = """
import io, resource, sys
sys.path.insert(0, {root!r})
from PIL import Image, ImageDraw
from engine import data, images
img = Image.new("L", (8000, 5000), 255)            # 40 megapixels, a black stroke on white
ImageDraw.Draw(img).line([(2000, 1000), (6000, 4000)], fill=0, width=400)
buf = io.BytesIO()
img.convert("RGBA").save(buf, format="PNG")
blob = buf.getvalue()
del img, buf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = images.preprocess_image(blob, "big.png")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(tuple(x.shape), float(x.max()), (after - before) // 1024)
"""


def test_a_40_megapixel_upload_is_decoded_in_bounded_memory():
    # decoded as 8-bit RGBA (160 MB) and box-reduced before any float conversion; converting the
    # full image to float64 RGBA, as before, costs 1.3 GB more than that
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _BIG.format(root=str(root))], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, peak, extra_mb = out.stdout.split(")")[0] + ")", *out.stdout.split(")")[1].split()
    assert shape == "(1, 28, 28)" and float(peak) == 1.0
    assert int(extra_mb) < 400, f"peak resident memory grew by {extra_mb} MB"
