"""Representations shipped in the repository, so that the app's default model answers a drawing
from its first start instead of after an hour of background precompute.

    shipped/<preset>/<name>.npz    a representation (engine.precompute.representation) of the run
                                   that `python -m engine train --preset <preset>` makes

Training is bit-for-bit reproducible on one kind of CPU (tests/test_train.py), so the run a fresh
clone trains there has the weights the shipped file was made for; on another kind it rounds to
weights about 4e-7 apart. `install` copies a shipped file into the run's folder only when its
config digest is the run's; whether the weights match too is checked where every representation
is checked, at load (representation.load: the checksum, else for a query basis one recomputed
query gradient): a mismatch is refused with one line, and the app then makes the representation
again in the background (webapp.replays).

A query basis ships smaller than it is kept (`encode`): its basis images' query gradients
G = M B (K, P) in float16, each row scaled by a power of two so that its largest entry is near
2^15 (float16's relative rounding, 2^-11, then holds for every entry within a factor 1e9 of it),
in place of B and M, which `install` recomputes from G as the precompute does
(engine.precompute.basis.ridge_inverse): half the bytes, so the default model's file stays under
the repository's 20 MB for it. benchmarks/bench_ship_encoding.py measures what the rounding does
to scores; the fidelity study runs on the installed file, so its numbers are those of what ships.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from engine import atomic
from engine.errors import UserError
from engine.precompute import representation as R
from engine.store import Run

ROOT = Path(__file__).resolve().parents[2] / "shipped"


def folder(preset: str, root: Optional[Path] = None) -> Path:
    return Path(root or ROOT) / preset


def _digest(path: Path) -> Optional[str]:
    """The config digest a representation file was made for (None if it is not readable as one)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return str(f["run_digest"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def install(run: Run, root: Optional[Path] = None) -> list[str]:
    """Copy each shipped representation of the run's preset whose config digest is the run's
    into the run's folder, unless the run already has one of that name. Returns the names copied.
    Files of another config are left where they are (they belong to another preset's settings)."""
    src = folder(run.preset.name, root)
    done = []
    for path in sorted(src.glob("*.npz")) if src.is_dir() else []:
        dest = R.folder(run) / path.name
        if dest.exists() or _digest(path) != run.digest:
            continue
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = decode({k: f[k] for k in f.files})
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            arrays = None
        if arrays is None:  # undecodable: copied as it is, so that loading it refuses it with one line
            atomic.save_bytes(path.read_bytes(), dest)
        else:
            atomic.save_npz(dest, **arrays)
        done.append(path.stem)
    return done


ENCODING = "basis-g16"
_TOP = 2.0 ** 15  # a row's largest entry is scaled to within [2^14, 2^15]: float16 holds up to 65504


def encode(d: dict) -> dict:
    """A representation's arrays (as in its .npz) -> the arrays shipped. A query basis ("b" (K, P)
    and "extra_gram" (K, K)) becomes "ship_g16" (K, P) float16 and "ship_scale" (K,), with G = M B
    = ship_g16 / ship_scale; every other array, and every other kind of representation, as is."""
    if str(d.get("method")) != "basis" or "extra_gram" not in d:
        return dict(d)
    g = d["extra_gram"].astype(np.float64) @ d["b"].astype(np.float64)
    top = np.abs(g).max(axis=1)
    scale = np.where(top > 0, 2.0 ** np.floor(np.log2(_TOP / np.where(top > 0, top, 1.0))), 1.0)
    out = {k: v for k, v in d.items() if k not in ("b", "extra_gram")}
    return {**out, "ship_g16": (g * scale[:, None]).astype(np.float16), "ship_scale": scale,
            "ship_encoding": np.array(ENCODING)}


def decode(d: dict) -> dict:
    """The shipped arrays -> the representation's (B and M recomputed from G); as is when not encoded."""
    if "ship_encoding" not in d:
        return dict(d)
    if str(d["ship_encoding"]) != ENCODING:
        raise ValueError(f"unknown encoding {d['ship_encoding']}")
    from engine.precompute import basis
    g = d["ship_g16"].astype(np.float64) / d["ship_scale"].astype(np.float64)[:, None]
    b, gram = basis.ridge_inverse(g)
    out = {k: v for k, v in d.items() if not k.startswith("ship_")}
    # marked, so that the installed copy is never taken for the precompute's own (installed_from_shipped)
    return {**out, "b": b.astype(np.float32), "extra_gram": gram, "info_shipped_encoding": np.array(ENCODING)}


def installed_from_shipped(arrays: dict) -> bool:
    """Whether a representation's arrays are a decoded shipped file (already rounded to float16)
    rather than what the precompute wrote."""
    return "info_shipped_encoding" in arrays


def ship(run: Run, name: str, root: Optional[Path] = None) -> Path:
    """Copy the run's representation `name`, checked against the run, to shipped/<preset>/
    (atomically); what `python -m engine precompute ... --ship` does once the precompute is done."""
    if not run.preset.device.startswith("cpu"):
        raise UserError("only CPU runs are shipped: training elsewhere is not bit-for-bit reproducible")
    R.load(run, name)  # refuses a foreign, stale or damaged file with one line
    dest = folder(run.preset.name, root) / f"{name}.npz"
    with np.load(R.folder(run) / f"{name}.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if installed_from_shipped(arrays) and dest.is_file():  # the run holds a shipped file: nothing new to ship
        return dest
    arrays = encode(arrays)
    if not _holds(dest, arrays):  # an unchanged file is not rewritten (nor shows as changed in git)
        atomic.save_npz(dest, **arrays)
    return dest


def _holds(path: Path, arrays: dict) -> bool:
    try:
        with np.load(path, allow_pickle=False) as f:
            return set(f.files) == set(arrays) and all(np.array_equal(f[k], v) for k, v in arrays.items())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
