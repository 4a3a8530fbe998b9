"""A precomputed representation on disk: grad_w ~ A (B g) for any query gradient g.

    RUN/precomputed/<name>.npz   B (K, P) float32; A (n, K) float32 unless the identity
                                 ("exact": B = J^T, K = n); the stamp; the cost

The stamp ties it to one run: the run's config digest and a sha256 of its final parameters.
`load` refuses (one-line UserError) a file of another run or config, one whose run's weights no
longer match, and a truncated or corrupt file; it is written atomically, so a half-written one
is never read as complete.

The same config trains to the same weights bit for bit on one kind of CPU, but not across kinds:
on a CPU with other vector instructions (AVX-512 against AVX2, say) the float32 sums round
differently, and the `cpu` preset's final weights came out 3.7e-7 apart (relative L2), their
sha256 different. For a query basis, whose file holds its images' query gradients G (= M B, M
its stored Gram matrix), `load` then checks what the weights are for: it recomputes the gradient
of the first basis image under the run's weights and accepts the file when it is within
GRADIENT_TOL (relative L2) of the file's, saying so in info["verified"]; the outcome is kept in
RUN/precomputed/<name>.verified.json, keyed by the file's and the weights' sha256, so it is
computed once. Weights that differ by more than rounding (another training) are refused as before.
"""

from __future__ import annotations

import hashlib
import json
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
# A query gradient's relative L2 change that still counts as the same weights rounded by another
# CPU: float rounding moves it by about 1e-5 (tests/test_precompute.py measures it), a basis
# shipped in float16 by about 2e-4 (results/cpu_rounding: 2.03e-4 on the default), another
# training by order one.
GRADIENT_TOL = 1e-3


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


def _flags(name: str) -> str:
    """The precompute options that make the representation `name` (basis64, lowrank32-queries, exact)."""
    m = re.fullmatch(r"(basis|lowrank)(\d+)(-queries)?", name)
    if name == "exact":
        return " --method exact"
    if m is None:
        return ""
    return f" --method {m[1]} --rank {m[2]}" + (" --init queries" if m[3] else "")


def load(run: Run, name: str) -> Representation:
    """The representation `name` of `run`, verified against the run; else a one-line UserError."""
    path = folder(run) / f"{name}.npz"
    if not path.is_file():
        raise UserError(f"run {run.path} has no precomputed representation {name!r} "
                        f"(make it with: python -m engine precompute --run {run.path}{_flags(name)})")
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
    n, p = run.preset.n_train, sum(int(np.prod(t.shape)) for t in params.values())
    checksum = weights_checksum(params)
    verified = "the run's weights checksum"
    if str(d["weights_sha256"]) != checksum:
        rel = _same_weights_rounded(run, path, d, checksum, p)
        if rel is None:
            raise UserError(f"{path} was made for other final weights than {run.path}/final.pt holds; rerun precompute")
        verified = (f"made on another kind of CPU (other float rounding, so other weights bit for bit): its "
                    f"first image's query gradient under this run's weights is {rel:.1e} from the file's (relative L2)")
    a = d.get("a")
    k = d["b"].shape[0]
    if d["b"].shape[1] != p or (a is None and k != n) or (a is not None and a.shape != (n, k)):
        raise UserError(f"{path} is corrupt (its shapes do not fit this run)")
    info = {k[5:]: v.item() if v.ndim == 0 else v.tolist() for k, v in d.items() if k.startswith("info_")}
    info["bytes"] = path.stat().st_size
    info["verified"] = verified
    extra = {k[6:]: v for k, v in d.items() if k.startswith("extra_")}
    return Representation(name, str(d["method"]), a, d["b"], info, extra or None)


def _same_weights_rounded(run: Run, path: Path, d: dict, checksum: str, p: int) -> Optional[float]:
    """For a query basis stamped with other weights: the relative L2 distance between its first
    image's query gradient under the run's weights and the one in the file, when within
    GRADIENT_TOL (the same training rounded by another CPU); None otherwise, and for every other
    kind of representation (they hold nothing to check against). Cached per (file, weights)."""
    if str(d["method"]) != "basis" or "extra_gram" not in d or "info_images" not in d or d["b"].shape[1] != p:
        return None
    file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    memo = path.with_suffix(".verified.json")
    try:
        seen = json.loads(memo.read_text())
        if seen.get("file_sha256") == file_sha and seen.get("weights_sha256") == checksum:
            return seen["relative_l2"] if seen["relative_l2"] <= GRADIENT_TOL else None
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo, or a damaged one: check again
    rel = query_gradient_distance(run, d)
    if rel is None:
        return None
    atomic.save_json({"file_sha256": file_sha, "weights_sha256": checksum, "image": str(d["info_images"].reshape(-1)[0]),
                      "relative_l2": rel, "tolerance": GRADIENT_TOL}, memo)
    return rel if rel <= GRADIENT_TOL else None


def query_gradient_distance(run: Run, d: dict) -> Optional[float]:
    """Relative L2 distance between the BPD gradient (P,) of a query basis's first image under the
    run's final weights and the one the file holds (G = M B, row 0, from its arrays `d`: "b" (K, P)
    and "extra_gram" (K, K)); None when the file's first image is not the run's first basis image."""
    from engine.bpd import run_bpd
    from engine.precompute import basis
    from engine.precompute.tangents import flatten
    x, names = basis.images(1, run.seed)
    if str(d["info_images"].reshape(-1)[0]) != names[0]:
        return None  # another basis's images: nothing comparable
    g_file = (d["extra_gram"].astype(np.float64) @ d["b"].astype(np.float64))[0]
    _, grads = run_bpd(run, x, grad=True)
    g_run = flatten(grads[0]).double().numpy()
    return float(np.linalg.norm(g_run - g_file) / np.linalg.norm(g_file))


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
