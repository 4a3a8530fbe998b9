"""The retraining bank: the actual BPD of test queries under models retrained without a set of
training images, kept on disk and shared by every method, protocol and later run of the LDS.

A retrained model is determined by (the run's config digest, the retraining seed, the dropped
indices), so each retrain's result lives in one file named by a digest of exactly that:

    OUT/bank/<digest>.json   {"run_digest", "seed", "drop", "bpd": {query: BPD}}

A query is a test index (its key is the index as text) or any image (its key is "img:" and a
digest of its pixels, `image_key`), so drawn, rotated or averaged images join the same bank.

Asking for queries a file lacks retrains once more and adds them to the file; nothing is ever
deleted, whatever the queries, protocol or sets asked for next. Each retrain is an independent
job (engine.executor) that writes its file atomically, so any executor may rerun a lost one.

Banks written before this layout (OUT/retrains/set_XXX.json for protocol A and
OUT/retrains_b/set_XXX_seed_S.json for B, each folder stamped by stamp.json) are read as well,
where their stamp says they belong to this run, these queries and these sets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine import atomic, data
from engine.presets import Preset, preset_from_dict
from engine.store import Run


def retrain_bpd(preset: Preset, seed: int, drop: np.ndarray, queries: torch.Tensor,
                images: Optional[torch.Tensor] = None) -> np.ndarray:
    """Exact BPD (Q,) of `queries` (Q, 1, 28, 28) under the preset retrained without `drop`."""
    from engine import training as train
    from engine.bpd import bpd
    if images is None:
        images, _ = data.load_train(preset.n_train, preset.source)
    w = np.ones(images.shape[0], np.float32)
    w[np.asarray(drop, np.int64)] = 0.0
    state = train.train(preset, seed=seed, weights=w, images=images)
    return bpd(preset, seed, state.model_params, queries)[0]


def key(run_digest: str, seed: int, drop: np.ndarray) -> str:
    """The file name of a retrain: a digest of what determines the retrained model."""
    ident = json.dumps([run_digest, int(seed), np.asarray(drop, np.int64).tolist()])
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or torn by a crash of an older writer: retrained


def image_key(x: torch.Tensor) -> str:
    """The bank's key of an image (1, 28, 28) that is not a test digit: a digest of its float32 pixels."""
    return "img:" + hashlib.sha256(np.ascontiguousarray(x.detach().cpu().numpy(), np.float32).tobytes()).hexdigest()[:16]


def _images_of(queries: list, images: dict) -> torch.Tensor:
    """(Q, 1, 28, 28): test digits for integer queries, the given image for an "img:" key."""
    test_x = data.load_test()[0]
    return torch.stack([torch.as_tensor(images[q]) if isinstance(q, str) else test_x[int(q)] for q in queries])


def _retrain_job(preset_dict: dict, run_digest: str, seed: int, drop: np.ndarray, queries: list, path: str,
                 images: Optional[dict] = None) -> str:
    """One retrain in a worker process: BPD of `queries` (test indices or image keys of `images`),
    merged into the file at `path`."""
    x = _images_of(queries, images or {})
    bpd = retrain_bpd(preset_from_dict(preset_dict), seed, drop, x)
    old = _read(Path(path)) or {}
    merged = {**old.get("bpd", {}), **{str(q): float(b) for q, b in zip(queries, bpd)}}
    atomic.save_json({"run_digest": run_digest, "seed": int(seed), "drop": np.asarray(drop).tolist(), "bpd": merged},
                     Path(path))
    return path


def _legacy(out: Path, run: Run, queries: list[int], protocol: str, settings: dict, j: int, s: int,
            drop: np.ndarray) -> dict[str, float]:
    """BPDs of a retrain from a bank of the earlier layout, if its stamp matches ({} otherwise)."""
    if protocol == "A":
        folder, name = out / "retrains", f"set_{j:03d}.json"
        stamp = {"run_digest": run.digest, "queries": queries, "frac": settings["frac"], "seed": settings["seed"]}
    else:
        folder, name = out / "retrains_b", f"set_{j:03d}_seed_{s}.json"
        stamp = {"run_digest": run.digest, "queries": queries, "protocol": "B", "alpha": settings["alpha"],
                 "seed": settings["seed"]}
    if _read(folder / "stamp.json") != stamp:
        return {}
    r = _read(folder / name)
    if r is None or r.get("drop") != np.asarray(drop).tolist() or len(r.get("bpd", [])) != len(queries):
        return {}
    return {str(q): float(b) for q, b in zip(queries, r["bpd"])}


def retrained(run: Run, out: Path, queries: Sequence, drops: np.ndarray, seeds: int, *, protocol: str,
              settings: dict, executor, callback: Optional[Callable[[dict], None]] = None,
              images: Optional[dict] = None) -> np.ndarray:
    """Retrained BPD (S, Q, K) of the queries without each drop (K, m), for the seeds run.seed + s,
    s < `seeds`; retrains only what no file holds yet. A query is a test index, or an image key
    (`image_key`) whose image (1, 28, 28) `images` maps it to.

    callback gets {"stage": "retrain", "i", "n"} as retrains finish (first with what is done)."""
    images = {k: np.asarray(v, np.float32) for k, v in (images or {}).items()}
    queries = [q if isinstance(q, str) else int(q) for q in queries]
    missing = [q for q in queries if isinstance(q, str) and q not in images]
    if missing:
        raise ValueError(f"no image given for the bank queries {missing}")
    tests = [q for q in queries if not isinstance(q, str)]  # what a legacy bank can know
    folder = Path(out) / "bank"
    cb = callback or (lambda info: None)
    pairs = [(j, s) for j in range(len(drops)) for s in range(seeds)]

    def path(j: int, s: int) -> Path:
        return folder / f"{key(run.digest, run.seed + s, drops[j])}.json"

    def known(j: int, s: int) -> dict[str, float]:
        r = _read(path(j, s)) or {}
        ok = r.get("drop") == drops[j].tolist() and r.get("seed") == run.seed + s and r.get("run_digest") == run.digest
        return {**_legacy(Path(out), run, tests, protocol, settings, j, s, drops[j]), **(r.get("bpd", {}) if ok else {})}

    values = {p: known(*p) for p in pairs}
    todo = [p for p in pairs if any(str(q) not in values[p] for q in queries)]
    done = len(pairs) - len(todo)
    cb({"stage": "retrain", "i": done, "n": len(pairs)})
    if todo:
        # queries a file (of either layout) already answers are not asked again; the rest are retrained
        def job(j: int, s: int) -> tuple:
            ask = [q for q in queries if str(q) not in values[(j, s)]]
            return (run.preset.to_dict(), run.digest, run.seed + s, drops[j], ask, str(path(j, s)),
                    {q: images[q] for q in ask if isinstance(q, str)})
        jobs = [job(j, s) for j, s in todo]
        for _ in executor.run(_retrain_job, jobs):
            done += 1
            cb({"stage": "retrain", "i": done, "n": len(pairs)})
        for p in todo:  # what a legacy file knew is kept beside the new values
            r = _read(path(*p))
            merged = {**values[p], **r["bpd"]}
            if merged != r["bpd"]:
                atomic.save_json({**r, "bpd": merged}, path(*p))
            values[p] = merged
    return np.array([[[values[(j, s)][str(q)] for j in range(len(drops))] for q in queries] for s in range(seeds)])
