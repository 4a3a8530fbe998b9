"""A precomputed representation on disk: grad_w ~ A (B g) for any query gradient g.

    RUN/precomputed/<name>.npz   B (K, P) float32; A (n, K) float32 unless the identity
                                 ("exact": B = J^T, K = n); the stamp; the cost

The stamp ties it to one run: the run's config digest and a sha256 of its final parameters.
`load` refuses (one-line UserError) a file of another run or config, one whose run's weights no
longer match, and a truncated or corrupt file; it is written atomically, so a half-written one
is never read as complete.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine import atomic
from engine.errors import UserError
from engine.store import Run

FORMAT = 1


def weights_checksum(params: dict[str, torch.Tensor]) -> str:
    """sha256 of the parameters' float32 bytes, in their (named_parameters) order."""
    h = hashlib.sha256()
    for n, t in params.items():
        h.update(n.encode())
        h.update(t.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def stamp(run: Run) -> dict:
    """What a representation (and each of its chunks) must match to be used for `run`."""
    return {"format": FORMAT, "run_digest": run.digest, "weights_sha256": weights_checksum(run.load_final().model_params)}


def folder(run: Run) -> Path:
    return run.path / "precomputed"


@dataclass
class Representation:
    """grad_w ~ A (B g): A (n, K) or None (the identity), B (K, P)."""
    name: str
    method: str
    a: Optional[np.ndarray]
    b: np.ndarray
    info: dict  # rank, seconds of compute, size on disk, ...
    extra: Optional[dict] = None  # method-specific arrays (a query basis: "gram", its regularized Gram matrix)

    def scores(self, g: np.ndarray) -> np.ndarray:
        """(Q, P) query gradients -> (Q, n) grad_w."""
        c = np.asarray(g, np.float64) @ self.b.T.astype(np.float64)  # (Q, K)
        return c if self.a is None else c @ self.a.T.astype(np.float64)


def save(run: Run, name: str, method: str, b: np.ndarray, a: Optional[np.ndarray], info: dict,
         extra: Optional[dict] = None) -> Path:
    path = folder(run) / f"{name}.npz"
    st = stamp(run)
    arrays = {"b": np.asarray(b, np.float32), "method": np.array(method), "name": np.array(name),
              **{k: np.array(v) for k, v in st.items()}, **{f"info_{k}": np.array(v) for k, v in info.items()},
              **{f"extra_{k}": np.asarray(v) for k, v in (extra or {}).items()}}
    if a is not None:
        arrays["a"] = np.asarray(a, np.float32)
    atomic.save_npz(path, **arrays)
    return path


def available(run: Run) -> list[str]:
    """Names of the run's finished representations (not yet verified)."""
    return sorted(p.stem for p in folder(run).glob("*.npz"))


def load(run: Run, name: str) -> Representation:
    """The representation `name` of `run`, verified against the run; else a one-line UserError."""
    path = folder(run) / f"{name}.npz"
    if not path.is_file():
        raise UserError(f"run {run.path} has no precomputed representation {name!r} "
                        f"(make it with: python -m engine precompute --run {run.path})")
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); delete it and rerun precompute") from None
    need = {"b", "method", "format", "run_digest", "weights_sha256"}
    if not need <= set(d):
        raise UserError(f"{path} is corrupt (not a precomputed representation)")
    if int(d["format"]) != FORMAT:
        raise UserError(f"{path} was written by another version of this tool (format {int(d['format'])})")
    if str(d["run_digest"]) != run.digest:
        raise UserError(f"{path} belongs to another run or config (digest {str(d['run_digest'])[:12]}, "
                        f"expected {run.digest[:12]})")
    params = run.load_final().model_params
    if str(d["weights_sha256"]) != weights_checksum(params):
        raise UserError(f"{path} was made for other final weights than {run.path}/final.pt holds; rerun precompute")
    n, p = run.preset.n_train, sum(int(np.prod(t.shape)) for t in params.values())
    a = d.get("a")
    k = d["b"].shape[0]
    if d["b"].shape[1] != p or (a is None and k != n) or (a is not None and a.shape != (n, k)):
        raise UserError(f"{path} is corrupt (its shapes do not fit this run)")
    info = {k[5:]: v.item() if v.ndim == 0 else v.tolist() for k, v in d.items() if k.startswith("info_")}
    info["bytes"] = path.stat().st_size
    extra = {k[6:]: v for k, v in d.items() if k.startswith("extra_")}
    return Representation(name, str(d["method"]), a, d["b"], info, extra or None)


def default(run: Run) -> Optional[str]:
    """The representation `attribute` uses: the exact one if present, else a query basis (the
    highest K), else a range finder (the highest rank; at equal rank the random one). The order is
    what results/precompute/fidelity.md measured: a query basis is far closer to the exact replay
    than a range finder of the same size."""
    names = available(run)
    if "exact" in names:
        return "exact"
    ranked = []
    for n in names:
        m = re.fullmatch(r"(lowrank|basis)(\d+)(-queries)?", n)
        if m:
            ranked.append((m.group(1) == "basis", int(m.group(2)), m.group(3) is None, n))
    return max(ranked)[3] if ranked else None
