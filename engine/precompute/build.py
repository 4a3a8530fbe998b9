"""Making a representation (engine.precompute.representation) as resumable chunks of jobs.

Methods:
- "exact": B = J^T (n, P), one forward tangent per training image (engine.precompute.tangents),
  in chunks of `chunk` images. Any query is then exact: grad_w = J^T g. Cost: n tangents,
  about 2 reverse replays' worth of arithmetic each on CPU.
- "lowrank": a randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1) on J at rank K.
  Y = J Omega for K directions Omega (K, n) in weight space (forward tangents), Q = orth(Y)
  (P, K), then A = J^T Q (n, K) by reverse replays with the columns of Q as adjoints
  (engine.metagrad, batched). grad_w ~ J^T Q Q^T g = A (Q^T g), so B = Q^T. Since rank(J) <= n,
  K = n is exact. `init` picks Omega: "random" (Gaussian) or "queries": the MAGIC attributions
  J^T g of fixed test digits (engine.methods.magic_mean), i.e. Y = J J^T G, one power
  iteration from where query gradients live, topped up with Gaussian directions.
- "basis": a query basis (engine.precompute.basis): the exact BPD gradients G (K, P) of K fixed,
  varied images, replayed once, A = J^T G^T (n, K), and B = the ridge pseudo-inverse of G, so a
  query is written in the basis by least squares. Cost: K BPD gradients and K reverse replays;
  no forward tangents.

Every chunk is a job (engine.executor: local processes or Ray) that writes its own file
atomically, stamped with the run; a finished chunk is never redone, so Ctrl-C and reruns
resume. Files: RUN/precomputed/<name>.parts/{fwd,rev}_XXXX.npz and basis.npz.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine import atomic, data
from engine.errors import UserError
from engine.files import why_stale
from engine.precompute import representation as R
from engine.store import Run, load_run

METHODS = ("exact", "lowrank", "basis")
INITS = ("random", "queries")


def _forward_job(run_path: str, omega: np.ndarray, path: str, st: dict) -> str:
    from engine.precompute.tangents import forward_tangents
    run = load_run(run_path)
    t0 = time.perf_counter()
    y = forward_tangents(run, data.load_train(run.preset.n_train, run.preset.source)[0], torch.from_numpy(omega))
    atomic.save_npz(Path(path), y=y.numpy(), seconds=np.array(time.perf_counter() - t0), **_arrays(st))
    return path


def _reverse_job(run_path: str, q: np.ndarray, path: str, st: dict) -> str:
    from engine.metagrad import metagradient, resume_path
    from engine.precompute.tangents import flat_to_dicts
    run = load_run(run_path)
    t0 = time.perf_counter()
    adj = flat_to_dicts(torch.from_numpy(q), run.load_final().model_params)
    # a chunk's replay is hours on CPU: its sweep state is kept after every segment, so a
    # killed job resumes there (its seconds add those of the earlier jobs' part)
    sweep, before = resume_path(path), []
    v = metagradient(run, data.load_train(run.preset.n_train, run.preset.source)[0], adj, resume=sweep,
                     callback=lambda i: before.append(i["seconds"]) if "seconds" in i else None)
    seconds = time.perf_counter() - t0 + sum(before)
    atomic.save_npz(Path(path), v=v.numpy(), seconds=np.array(seconds), **_arrays(st))
    sweep.unlink(missing_ok=True)
    return path



def _gradient_job(run_path: str, x: np.ndarray, path: str, st: dict) -> str:
    """Exact BPD gradients of the images x (k, 1, 28, 28) (a query basis): g (k, P) flat."""
    from engine.bpd import run_bpd
    from engine.precompute.tangents import flatten
    run = load_run(run_path)
    t0 = time.perf_counter()
    _, grads = run_bpd(run, torch.from_numpy(x), grad=True)
    g = torch.stack([flatten(d) for d in grads]).numpy()
    atomic.save_npz(Path(path), g=g, seconds=np.array(time.perf_counter() - t0), **_arrays(st))
    return path


def _arrays(st: dict) -> dict:
    return {k: np.array(v) for k, v in st.items()}


def _directions(run: Run, method: str, rank: int, init: str, callback) -> np.ndarray:
    """Omega (K, n): the identity for "exact"; Gaussian or query-informed for "lowrank"."""
    n = run.preset.n_train
    if method == "exact":
        return np.eye(n, dtype=np.float32)
    # seeded without the rank: the first K directions of any larger rank are these (nested ranges)
    omega = np.random.default_rng([run.seed, 7]).standard_normal((rank, n)).astype(np.float32)
    if init == "queries":
        from engine import methods
        w = methods.get("magic_mean").prepare(run, callback=callback)["grad_w"]  # (D, n) attributions of digits
        m = min(rank, len(w))
        omega[:m] = w[:m] / np.linalg.norm(w[:m], axis=1, keepdims=True) * np.sqrt(n)
    return omega


def _run_chunks(executor, job, parts: Path, prefix: str, blocks: list[np.ndarray], run: Run, st: dict,
                stage: str, cb) -> list[dict]:
    """Run `job` on every block whose part file is missing or stale; return every part's arrays."""
    paths = [parts / f"{prefix}_{j:04d}.npz" for j in range(len(blocks))]
    todo = [j for j, p in enumerate(paths) if why_stale(p, {**st, "block": blocks[j].shape[0]}) is not None]
    done = len(blocks) - len(todo)
    cb({"stage": stage, "i": done, "n": len(blocks)})
    for _ in executor.run(job, [(str(run.path), blocks[j], str(paths[j]), {**st, "block": blocks[j].shape[0]})
                                for j in todo]):
        done += 1
        cb({"stage": stage, "i": done, "n": len(blocks)})
    out = []
    for p in paths:
        with np.load(p, allow_pickle=False) as f:
            out.append({k: f[k] for k in f.files})
    return out


def precompute(run: Run, *, method: str = "basis", rank: int = 64, init: str = "random", chunk: int = 8,
               executor=None, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Make (or finish) the run's representation; returns its info (name, rank, seconds of
    compute summed over chunks, multiple of training time, bytes on disk).

    callback gets {"stage": "forward"|"gradients"|"reverse", "i", "n"} in chunks."""
    if method not in METHODS:
        raise UserError(f"unknown precompute method {method!r}; choose one of {', '.join(METHODS)}")
    if init not in INITS:
        raise UserError(f"--init must be one of {', '.join(INITS)}")
    if init != "random" and method != "lowrank":
        raise UserError(f"--init is for --method lowrank (a {method} representation has no random directions to replace)")
    n = run.preset.n_train
    if method == "basis" and rank < 1:
        raise UserError("--rank must be at least 1")
    if method == "lowrank" and not 1 <= rank <= n:
        raise UserError(f"--rank must be between 1 and {n} (the number of training images)")
    if chunk < 1:
        raise UserError("--chunk must be at least 1")
    from engine.metagrad import check_trajectory
    check_trajectory(run)
    if executor is None:
        from engine.executor import LocalExecutor
        executor = LocalExecutor(1)
    cb = callback or (lambda info: None)
    # the init is part of the name: a query-informed basis never overwrites a random one's chunks
    name = {"exact": "exact", "basis": f"basis{rank}"}.get(method) or f"lowrank{rank}" + ("" if init == "random" else f"-{init}")
    parts = R.folder(run) / f"{name}.parts"
    st = {**R.stamp(run), "method": method, "init": {"lowrank": init, "exact": "identity"}.get(method, "images")}
    if method == "basis":
        return _basis(run, name, rank, chunk, parts, st, executor, cb)
    omega = _directions(run, method, rank, init, cb)
    # the directions themselves are part of what a chunk was made for
    st["omega_sha256"] = hashlib.sha256(np.ascontiguousarray(omega).tobytes()).hexdigest()
    blocks = [omega[i: i + chunk] for i in range(0, len(omega), chunk)]
    fwd = _run_chunks(executor, _forward_job, parts, "fwd", blocks, run, st, "forward", cb)
    y = np.concatenate([f["y"] for f in fwd])                                     # (K, P)
    seconds = float(sum(f["seconds"] for f in fwd))
    a = None
    if method == "exact":
        b = y
    else:
        basis = parts / "basis.npz"
        if why_stale(basis, st) is not None:
            q, _ = np.linalg.qr(y.T.astype(np.float64))                          # (P, K) orthonormal
            atomic.save_npz(basis, q=q.astype(np.float32), **_arrays(st))
        with np.load(basis, allow_pickle=False) as f:
            q = f["q"]
        qb = [q.T[i: i + chunk] for i in range(0, rank, chunk)]
        rev = _run_chunks(executor, _reverse_job, parts, "rev", qb, run, st, "reverse", cb)
        a = np.concatenate([r["v"] for r in rev]).T                                # (n, K)
        b = q.T
        seconds += float(sum(r["seconds"] for r in rev))
    return _save(run, name, method, b, a, st, seconds, len(blocks))


def _save(run: Run, name: str, method: str, b: np.ndarray, a: Optional[np.ndarray], st: dict, seconds: float,
          chunks: int, extra: Optional[dict] = None, more: Optional[dict] = None) -> dict:
    train_s = run.train_seconds()
    info = {"rank": int(b.shape[0]), "init": st["init"], "seconds": seconds, "chunks": chunks,
            "train_seconds": train_s, "times_training": seconds / train_s if train_s == train_s and train_s > 0 else None,
            **(more or {})}
    path = R.save(run, name, method, b, a, {k: v for k, v in info.items() if v is not None}, extra)
    return {"name": name, "method": method, **info, "bytes": path.stat().st_size, "path": str(path)}


def _basis(run: Run, name: str, k: int, chunk: int, parts: Path, st: dict, executor, cb) -> dict:
    """The query-basis representation: gradients of the basis images, then their replays."""
    from engine.precompute import basis
    x, names = basis.images(k, run.seed)
    xs = x.numpy()
    st["images_sha256"] = hashlib.sha256(np.ascontiguousarray(xs).tobytes()).hexdigest()
    blocks = [xs[i: i + chunk] for i in range(0, k, chunk)]
    grads = _run_chunks(executor, _gradient_job, parts, "grad", blocks, run, st, "gradients", cb)
    g = np.concatenate([f["g"] for f in grads])                                    # (K, P)
    rev = _run_chunks(executor, _reverse_job, parts, "rev", [g[i: i + chunk] for i in range(0, k, chunk)],
                      run, st, "reverse", cb)
    a = np.concatenate([r["v"] for r in rev]).T                                    # (n, K)
    seconds = float(sum(f["seconds"] for f in grads) + sum(r["seconds"] for r in rev))
    b, gram = basis.ridge_inverse(g)
    # the images' names: a plain test digit's column of A is its exact attribution (the app's
    # query-agnostic mean comes from them)
    return _save(run, name, "basis", b, a, st, seconds, len(blocks), {"gram": gram}, {"images": names})
