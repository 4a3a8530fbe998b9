"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A reader therefore sees either the old file or the complete new one, never a torn write,
even if the process is killed mid-way.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask),
        # so results and runs stay readable by whoever could read a plainly written file.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Nothing half-written stays behind, whatever interrupted us.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    """The process umask: from /proc on Linux; elsewhere set and restored once, at import, since
    os.umask can only be read by setting it (not thread-safe, so never done per write)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def save_torch(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def save_text(text: str, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(text), mode="w")


def print_report(lines: list[str], out: "str | Path | None") -> str:
    """A benchmark's report: its lines printed, and written whole to `out` when given. Returns the text."""
    text = "\n".join(lines)
    print(text)
    if out:
        save_text(text + "\n", Path(out))
    return text


def save_npy(arr: np.ndarray, path: Path) -> None:
    _write_atomic(path, lambda f: np.save(f, arr, allow_pickle=False))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """An uncompressed .npz of `arrays`, written atomically (np.savez into the temp file)."""
    _write_atomic(path, lambda f: np.savez(f, **arrays))


def save_bytes(data: bytes, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(data))
