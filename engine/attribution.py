"""MAGIC attribution scores: grad_w[i] = d BPD(x; theta_T(w)) / d w_i at w = 1.

Sign convention (DESIGN.md): removing a set S predicts BPD(1) - sum_{i in S} grad_w[i].
A proponent (makes x more likely; removing it raises the BPD) has grad_w[i] < 0; an
opponent (removing it lowers the BPD) has grad_w[i] > 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine import atomic, data
from engine.errors import UserError
from engine.bpd import run_bpd
from engine.metagrad import metagradient, resume_path
from engine.store import Run


def attribute(run: Run, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None, *,
              scheme: str = "sqrt", k: int = 4, resume: Optional[Path] = None,
              partial_every: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """grad_w (Q, n) and BPD (Q,) for queries x (Q, 1, 28, 28); all Q share one backward sweep.

    callback gets {"stage": "bpd"|"training", "i", "n"} (and, every partial_every training
    steps, the sweep's partial sum "grad_w" (Q, n)); scheme, k, resume (a file for the sweep's
    state, to survive being killed) and partial_every go to engine.metagrad.
    """
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    bpd, qgrads = run_bpd(run, x, grad=True, callback=lambda i: callback and callback({"stage": "bpd", **i}))
    gw = metagradient(run, images, qgrads, scheme=scheme, k=k, resume=resume, partial_every=partial_every,
                      callback=lambda i: callback and callback({"stage": "training", **i}))
    return gw.numpy().astype(np.float64), bpd


def attribute_precomputed(run: Run, rep, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """grad_w (Q, n) and BPD (Q,) from a precomputed representation (engine.precompute): the
    queries' exact BPD gradients g, then A (B g); no replay of training."""
    from engine.precompute.tangents import flatten
    bpd, grads = run_bpd(run, x, grad=True, callback=lambda i: callback and callback({"stage": "bpd", **i}))
    return rep.scores(torch.stack([flatten(g) for g in grads]).numpy()), bpd


def attribute_auto(run: Run, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None, *,
                   replay: bool = False, scheme: str = "sqrt", k: int = 4,
                   partial_every: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, str]:
    """grad_w (Q, n), BPD (Q,) and how they were made: from the run's precomputed representation
    when it has one ("precomputed:<name>"), else (or with replay=True) by a replay of training
    ("replay"). A representation that fails its checks raises a one-line UserError."""
    from engine.precompute import representation
    name = None if replay else representation.default(run)
    if name is None:
        grad_w, bpd = attribute(run, x, callback, scheme=scheme, k=k, partial_every=partial_every)
        return grad_w, bpd, "replay"
    grad_w, bpd = attribute_precomputed(run, representation.load(run, name), x, callback)
    return grad_w, bpd, f"precomputed:{name}"


def progressive(preview: np.ndarray, partial: np.ndarray, done: int, preset) -> np.ndarray:
    """An attribution (..., n) while the exact replay is under way: its partial sum over the last
    `done` training steps (exact for the weights those steps used) plus the preview (from a
    precomputed representation) scaled by the learning-rate share of the steps not replayed yet.

    The preview stands in for the whole run; the scale is a rule of thumb (each step moves the
    weights in proportion to its learning rate), chosen on the `cpu` default: on 4 test digits,
    against retraining, the preview alone gives LDS 0.599; this gives 0.595 at 5% of the steps and
    0.655 / 0.687 / 0.769 / 0.827 at 15 / 25 / 55 / 75%, where the partial sum alone gives 0.147 and
    0.339 / 0.613 / 0.741 / 0.815 (results/partial_replay_cpu). done = 0 gives the preview,
    done = T the exact replay.
    """
    from engine.training import lr_at
    lr = np.array([lr_at(k, preset) for k in range(preset.steps)])
    rest = float(lr[:preset.steps - done].sum() / lr.sum())
    return np.asarray(partial) + rest * np.asarray(preview)


def predict_removal(bpd: float, grad_w: np.ndarray, removed: Sequence[int]) -> float:
    """Predicted BPD after training without `removed`: BPD(1) - sum_{i in S} grad_w[i]."""
    return float(bpd - grad_w[np.asarray(removed, dtype=np.int64)].sum())


def top_k(grad_w: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Indices of the k strongest proponents (most negative grad_w) and opponents (most positive)."""
    order = np.argsort(grad_w, kind="stable")
    return {"proponents": order[:k], "opponents": order[::-1][:k]}


def _chunk_job(run_path: str, x: np.ndarray, path: str, scheme: str, k: int) -> str:
    """One chunk of queries in a worker; the result file is written atomically at the end."""
    from engine.store import load_run
    p = Path(path)
    # the sweep's state after each segment: a killed chunk resumes there (not the k-ary scheme)
    sweep = resume_path(p) if scheme != "kary" else None
    gw, bpd = attribute(load_run(run_path), torch.from_numpy(x), scheme=scheme, k=k, resume=sweep)
    atomic.save_npz(p, grad_w=gw, bpd=bpd, x=x)
    if sweep is not None:
        sweep.unlink(missing_ok=True)
    return path


def attribute_many(run: Run, x: torch.Tensor, parts: Path, executor, *, chunk: int = 8, scheme: str = "sqrt",
                   k: int = 4, callback: Optional[Callable[[dict], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """grad_w (Q, n) and BPD (Q,) for many queries x (Q, 1, 28, 28), `chunk` queries per job.

    Each chunk is an independent job on `executor` (engine.executor) that writes
    parts/chunk_XXXXX.npz atomically; chunks already there (for these very images) are not
    redone, so an interrupted batch resumes. callback gets {"stage": "chunks", "i", "n"}.
    """
    if chunk < 1:
        raise UserError("--chunk must be at least 1")
    parts = Path(parts)
    parts.mkdir(parents=True, exist_ok=True)
    xs = x.numpy()
    starts = list(range(0, len(xs), chunk))
    path = lambda j: parts / f"chunk_{j:05d}.npz"  # noqa: E731

    def load(j: int):
        try:
            with np.load(path(j), allow_pickle=False) as f:
                if np.array_equal(f["x"], xs[starts[j]: starts[j] + chunk]):
                    return f["grad_w"], f["bpd"]
        except (OSError, ValueError, KeyError):
            pass
        return None
    # the folder belongs to one run: a chunk computed under another run's digest is not reused
    stamp = parts / "run_digest.txt"
    if stamp.is_file() and stamp.read_text() != run.digest:
        for f in parts.glob("chunk_*.npz"):
            f.unlink()
    atomic.save_text(run.digest, stamp)
    todo = [j for j in range(len(starts)) if load(j) is None]
    done = len(starts) - len(todo)
    cb = callback or (lambda info: None)
    cb({"stage": "chunks", "i": done, "n": len(starts)})
    for _ in executor.run(_chunk_job, [(str(run.path), xs[starts[j]: starts[j] + chunk], str(path(j)), scheme, k)
                                       for j in todo]):
        done += 1
        cb({"stage": "chunks", "i": done, "n": len(starts)})
    res = [load(j) for j in range(len(starts))]
    if any(r is None for r in res):
        raise RuntimeError(f"a chunk result is missing in {parts} after every job finished")
    return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])
