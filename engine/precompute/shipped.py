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
        atomic.save_bytes(path.read_bytes(), dest)
        done.append(path.stem)
    return done


def ship(run: Run, name: str, root: Optional[Path] = None) -> Path:
    """Copy the run's representation `name`, checked against the run, to shipped/<preset>/
    (atomically); what `python -m engine precompute ... --ship` does once the precompute is done."""
    if not run.preset.device.startswith("cpu"):
        raise UserError("only CPU runs are shipped: training elsewhere is not bit-for-bit reproducible")
    R.load(run, name)  # refuses a foreign, stale or damaged file with one line
    dest = folder(run.preset.name, root) / f"{name}.npz"
    blob = (R.folder(run) / f"{name}.npz").read_bytes()
    if not (dest.exists() and dest.read_bytes() == blob):
        atomic.save_bytes(blob, dest)
    return dest
