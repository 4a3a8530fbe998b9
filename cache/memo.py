"""Checksummed diskcache memo of dicts of numpy arrays and JSON-able values."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import diskcache
import numpy as np

import engine

# Bump when a change to the engine alters results without changing a run's config digest.
ENGINE_VERSION = engine.__version__


def make_key(kind: str, run_digest: str, array: Optional[np.ndarray] = None, settings: Optional[dict] = None) -> str:
    """sha256 of (engine version, kind, run digest, the array's dtype/shape/bytes, settings as JSON)."""
    h = hashlib.sha256()
    h.update(json.dumps([ENGINE_VERSION, kind, run_digest, settings or {}], sort_keys=True).encode())
    if array is not None:
        a = np.ascontiguousarray(array)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return f"{kind}:{h.hexdigest()}"


def _encode(value: dict) -> bytes:
    """{name: ndarray | JSON value} -> bytes (npz, no pickles) prefixed by its sha256."""
    arrays = {k: v for k, v in value.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in value.items() if not isinstance(v, np.ndarray)}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    body = buf.getvalue()
    return hashlib.sha256(body).digest() + body


def _decode(blob: bytes) -> dict:
    if not isinstance(blob, bytes) or len(blob) < 32 or hashlib.sha256(blob[32:]).digest() != blob[:32]:
        raise ValueError("checksum mismatch")
    with np.load(io.BytesIO(blob[32:]), allow_pickle=False) as f:
        out = {k: f[k] for k in f.files if k != "__meta__"}
        out.update(json.loads(f["__meta__"].tobytes().decode()))
    return out


class Memo:
    """Disk memo of dict results. Entries survive restarts; least recently used go past `size_limit`."""

    def __init__(self, directory: Path, size_limit: int = 2 * 2**30):
        self.dir = Path(directory)
        # cull_limit=0: diskcache's own culling drops 10 entries at once, the newest included;
        # `set` culls just enough, least recently used first.
        self.cache = diskcache.Cache(str(self.dir), size_limit=size_limit, cull_limit=0,
                                     eviction_policy="least-recently-used")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        """The stored value, or None if absent, unreadable or corrupt (then it is deleted)."""
        try:
            blob = self.cache.get(key)
        except Exception:  # an unreadable entry is a cache miss: drop it and recompute
            blob = b"corrupt"
        if blob is None:
            return None
        try:
            return _decode(blob)
        except Exception:
            self.cache.delete(key)
            return None

    def set(self, key: str, value: dict) -> None:
        self.cache.set(key, _encode(value))
        self._evict(keep=key)

    def _evict(self, keep: str) -> None:
        """Delete least recently used entries, one at a time, until under the size limit.

        diskcache culls 10 entries per round (the newest too, in a small cache), so the
        oldest key is looked up in its SQLite table (diskcache 5's schema: Cache.access_time)."""
        while self.cache.volume() > self.cache.size_limit:
            row = self.cache._sql("SELECT key FROM Cache WHERE key != ? ORDER BY access_time LIMIT 1", (keep,)).fetchone()
            if row is None:
                break
            self.cache.delete(row[0])

    @contextmanager
    def lock(self, key: str):
        """Exclusive for `key` across threads and processes, by an OS file lock (flock) on
        DIR/locks/<digest>.lock. The kernel releases it when its holder dies, however it dies
        (SIGKILL, a container restarted under another hostname, a reused PID), so a dead holder
        can never keep a key."""
        with self._guard:
            tl = self._locks.setdefault(key, threading.Lock())
        with tl:
            folder = self.dir / "locks"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def get_or_compute(self, key: str, fn: Callable[[], dict]) -> dict:
        """The memoized fn(): computed once per key even when many callers ask at once."""
        hit = self.get(key)
        if hit is not None:
            return hit
        with self.lock(key):
            hit = self.get(key)  # another caller may have finished it while we waited
            if hit is not None:
                return hit
            value = fn()
            self.set(key, value)
            return _decode(_encode(value))  # what later callers will read, arrays included
