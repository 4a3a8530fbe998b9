"""Results kept on disk and reused while they still describe the same thing.

`load_or_compute(path, stamp, compute)` reads the arrays of an .npz whose stamp (the run's
digest, the queries, the settings: whatever determines the result) matches, and otherwise
computes them, writes them atomically with the stamp, and says why through the `engine` logger
(the CLI prints it on stderr): a result is never recomputed silently, and never reused for
something else.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine import atomic

log = logging.getLogger("engine")


def _same(stored: np.ndarray, want) -> bool:
    if isinstance(want, str):
        return str(stored) == want
    return np.asarray(stored).tolist() == np.asarray(want).tolist()


def _read(path: Path, stamp: dict) -> tuple[Optional[dict], Optional[str]]:
    """(the arrays at `path`, None) if it holds a result stamped with `stamp`, else (None, why not)."""
    if not path.is_file():
        return None, "not computed yet"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return None, f"{path.name} is unreadable ({type(e).__name__})"
    for k, v in stamp.items():
        if k not in arrays:
            return None, f"{path.name} has no {k!r}"
        if not _same(arrays[k], v):
            return None, f"{path.name} was made for another {k.replace('_', ' ')}"
    return arrays, None


def read_stamped(path: Path, stamp: dict) -> tuple[Optional[dict], Optional[str]]:
    """(the arrays at `path`, None) if it holds a result stamped with `stamp`, else (None, why not)."""
    return _read(Path(path), stamp)


def why_stale(path: Path, stamp: dict) -> Optional[str]:
    """None if `path` holds a result stamped with `stamp`, else the reason it cannot be used."""
    return _read(path, stamp)[1]


def load_or_compute(path: Path, stamp: dict, compute: Callable[[], dict], *, what: str) -> dict:
    """The arrays stored at `path` (an .npz) if its stamp matches, else compute() -> {name: array},
    saved with the stamp. `what` names the result in the message that says why it is computed."""
    path = Path(path)
    arrays, reason = _read(path, stamp)
    if arrays is not None:
        return arrays
    log.info("computing %s (%s)", what, reason)
    value = compute()
    arrays = {**{k: np.asarray(v) for k, v in value.items()}, **{k: np.asarray(v) for k, v in stamp.items()}}
    atomic.save_npz(path, **arrays)
    return arrays
