"""Does an upload's preprocessing give back the digit from a photo of it? Synthetic phone photos of
MNIST test digits (engine.experiments.photos) through engine.images.preprocess_image, with the
paper evened out (images.flatten_background) and without (one background level for the whole
image, as uploads were preprocessed before it), scored by pixel correlation with the digit itself.

    python experiments/photo_uploads.py [--n 20] [--tight 200] [--out results/photo_uploads]

Photos: each lighting (even, a gradient, vignetting) x grain (3, 8, 15 grey levels) x margin (the
digit's own MNIST padding only, or 60 more pixels of paper), --n digits each, as JPEG; digits
cropped tight to their ink (no margin at all), --tight of them, clean (PNG) and as grainy,
unevenly lit JPEGs. Writes photo_uploads.{md,json} with the command and commit that made them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, images, provenance  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.experiments import photos  # noqa: E402


def score(blob: bytes, digit: np.ndarray, flatten: bool) -> float:
    """Correlation of the preprocessed upload with the digit; -1 where preprocessing refuses it."""
    real = images.flatten_background
    if not flatten:
        images.flatten_background = lambda g: g  # the preprocessing before the paper was evened out
    try:
        return photos.match(images.preprocess_image(blob, "photo"), digit)
    except UserError:
        return -1.0
    finally:
        images.flatten_background = real


def row(name: str, blobs: list[bytes], digits: np.ndarray) -> dict:
    new = np.array([score(b, d, True) for b, d in zip(blobs, digits)])
    old = np.array([score(b, d, False) for b, d in zip(blobs, digits)])
    return {"case": name, "n": len(blobs), "new_mean": float(new.mean()), "new_min": float(new.min()),
            "old_mean": float(old.mean()), "old_min": float(old.min()),
            "worse": int((new < old - 0.01).sum()), "better": int((new > old + 0.01).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="test digits per photo condition")
    ap.add_argument("--tight", type=int, default=200, help="test digits cropped tight")
    ap.add_argument("--out", default="results/photo_uploads")
    a = ap.parse_args()
    if a.n < 1 or a.tight < 1:
        sys.exit("error: --n and --tight must be at least 1")
    provenance.start()
    x = data.load_test()[0][:, 0].numpy().astype(np.float64)
    rows, t0 = [], time.perf_counter()
    for light in photos.LIGHTS:
        for sd in (3, 8, 15):
            for margin in (0, 60):
                blobs = [photos.phone_photo(x[i], light, sd, margin, seed=i) for i in range(a.n)]
                rows.append(row(f"photo: {light} light, grain sd {sd}, margin {margin}", blobs, x[: a.n]))
                print(f"{rows[-1]['case']}: {rows[-1]['new_mean']:.3f} against {rows[-1]['old_mean']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    inks = [photos.tight_crop(x[i]) for i in range(a.tight)]
    rows.append(row("cropped tight, clean (PNG, white paper)", [photos.png(255 * (1 - 0.8 * k)) for k in inks], x[: a.tight]))
    rows.append(row("cropped tight, gradient light, grain sd 8", [photos.jpeg(photos.paper(k, "gradient", 8, seed=i))
                                                                   for i, k in enumerate(inks)], x[: a.tight]))
    report = {**provenance.stamp(), "rows": rows}
    lines = [f"`{report['command']}` at commit {report['commit']}", "",
             "Correlation of the preprocessed upload with the MNIST test digit it shows (best over one-pixel shifts), "
             "with the paper evened out (`images.flatten_background`) and without it (one background level for the "
             "whole image, the preprocessing before it). Synthetic photos (`engine/experiments/photos.py`).", "",
             "| upload | digits | evened out: mean (min) | one level: mean (min) | better / worse by > 0.01 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['n']} | {r['new_mean']:.3f} ({r['new_min']:.3f}) | {r['old_mean']:.3f} ({r['old_min']:.3f}) "
              f"| {r['better']} / {r['worse']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    atomic.save_json(report, Path(a.out) / "photo_uploads.json")
    atomic.save_text(text, Path(a.out) / "photo_uploads.md")
    print(text)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
