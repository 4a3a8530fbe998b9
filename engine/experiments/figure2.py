"""The seed's Figure 2: bits/dim of MNIST digits, their rotations, averages of several digits,
and uniform noise. Lower BPD = more likely. The seed reports 3.5 / 3.8 / 5.32 / 9.12.

The seed's write-up draws its digits from the model's *training* images ("the likelihood of
generating MNIST training images, rotated training images, the average of multiple training
images"); held-out test digits ask more of the model (it never saw them). `images="test"` (the
default) uses test digits, `images="train"` the run's own training images, as the seed did; both
reports state which, and the rotation gap (rotated minus original, paired by digit).

Work is saved after every batch (figure2_partial.npz, keyed by the run and the settings), so
an interrupted report resumes where it stopped.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine import atomic, data, provenance
from engine.bpd import bpd
from engine.presets import digest, label

# The seed write-up's means (its Figure 2), shown beside ours.
WRITEUP_VALUES = {"original": 3.5, "rotated": 3.8, "averaged": 5.32, "noise": 9.12}
GROUPS = list(WRITEUP_VALUES)
IMAGES = ("test", "train")


def mean_stderr(d: np.ndarray) -> dict[str, float]:
    """Mean of paired differences d (n,) and its standard error (0 for a single one)."""
    return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0}


def training_pool(run) -> torch.Tensor:
    """The images `run` trained on (weight > 0), in training-set order: (m, 1, 28, 28)."""
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    return images[torch.from_numpy(run.weights() > 0)]


def figure2_inputs(n: int, angle: float, k_avg: int, seed: int,
                   pool: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The four groups of n images each, (n, 1, 28, 28), fixed by `seed`.

    Digits come from `pool` (m, 1, 28, 28), e.g. a run's training images; by default from the
    MNIST test set, in the order of the standard query set.
    """
    from engine.errors import UserError
    k = n * (1 + k_avg)
    if pool is None:
        pool, _ = data.load_test()
        idx = data.query_indices(k, seed)
    else:
        if k > len(pool):
            raise UserError(f"figure2 needs {k} distinct digits (n x (1 + k_avg)); the pool holds {len(pool)}")
        idx = np.random.default_rng([data.SPLIT_SEED, seed]).permutation(len(pool))[:k].tolist()
    originals = pool[idx[:n]]
    others = pool[idx[n:]].reshape(n, k_avg, 1, 28, 28)
    return {
        "original": originals,
        "rotated": data.rotate(originals, angle),
        "averaged": torch.stack([data.average(o) for o in others]),
        "noise": data.uniform_noise(n, torch.Generator().manual_seed(seed)),
    }


def run_figure2(run, out: Path, *, n: int = 50, angle: float = 90.0, k_avg: int = 4, seed: int = 0,
                images: str = "test", callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Compute the four groups' BPDs under `run`'s model; write figure2.{json,md,png} to `out`.

    `images`: "test" (held-out MNIST test digits) or "train" (the run's training images, the
    seed's protocol). Returns the report dict (also the JSON file): per group mean, std, min,
    max, the paired rotation gap, and the table.
    """
    from engine.errors import UserError
    if n < 1 or k_avg < 2:
        raise UserError("figure2 needs --n >= 1 and --k-avg >= 2")
    if seed < 0:
        raise UserError(f"figure2 --seed must be 0 or more, got {seed}")
    if not math.isfinite(angle):
        raise UserError(f"figure2 --angle must be a finite number of degrees, got {angle}")
    if images not in IMAGES:
        raise UserError(f"figure2 --images is test or train, not {images!r}")
    inputs = figure2_inputs(n, angle, k_avg, seed, pool=training_pool(run) if images == "train" else None)
    p = run.preset
    spec = {"run": run.digest, "n": n, "angle": angle, "k_avg": k_avg, "seed": seed, "bpd_steps": p.bpd_steps}
    # the test-digit key is what it was before `images` existed, so old partial files still resume
    key = digest(spec if images == "test" else {**spec, "images": images})
    partial_path = out / "figure2_partial.npz"
    done: dict[str, np.ndarray] = {}
    if partial_path.is_file():
        try:
            with np.load(partial_path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    done = {g: z[g] for g in GROUPS if g in z}
        except (OSError, ValueError, KeyError):
            done = {}  # a damaged partial file only costs a recomputation
    params = run.load_final().model_params
    total = n * len(GROUPS)
    step = 0
    for g in GROUPS:
        vals = list(done.get(g, np.zeros(0)))
        for i in range(n):
            step += 1
            if i < len(vals):
                continue
            vals.extend(bpd(p, run.seed, params, inputs[g][i: i + 1])[0].tolist())
            done[g] = np.array(vals)
            _save_partial(partial_path, key, done)
            if callback is not None:
                callback({"i": step, "n": total, "group": g})
    stats = {g: {"mean": float(done[g].mean()), "std": float(done[g].std(ddof=1)) if n > 1 else 0.0,
                 "min": float(done[g].min()), "max": float(done[g].max()), "writeup": WRITEUP_VALUES[g]} for g in GROUPS}
    means = [stats[g]["mean"] for g in GROUPS]
    gap = done["rotated"] - done["original"]  # paired: each digit against its own rotation
    report = {
        **provenance.stamp(), "run": str(run.path), "run_digest": run.digest, "preset": p.name, "preset_label": label(p),
        "images": images, "n_per_group": n, "angle": angle, "k_avg": k_avg, "seed": seed,
        "rotation_gap": mean_stderr(gap),
        "bpd_steps": p.bpd_steps, "groups": stats, "bpd": {g: done[g].tolist() for g in GROUPS},
        "ordering_holds": bool(all(a < b for a, b in zip(means, means[1:]))),
        "noise_above_8": bool(stats["noise"]["mean"] > 8),
    }
    report["table"] = _table(report)
    atomic.save_json(report, out / "figure2.json")
    atomic.save_text(report["table"] + "\n", out / "figure2.md")
    atomic.save_bytes(_plot(done), out / "figure2.png")
    partial_path.unlink(missing_ok=True)
    return report


def _save_partial(path: Path, key: str, done: dict[str, np.ndarray]) -> None:
    atomic.save_npz(path, key=np.array(key), **done)


def _table(r: dict) -> str:
    train = r.get("images", "test") == "train"
    names = {"original": "MNIST training digits (seen in training)" if train else "MNIST test digits",
             "rotated": f"rotated {r['angle']:g} deg", "averaged": f"average of {r['k_avg']} digits", "noise": "uniform noise"}
    lines = [f"Bits/dim on preset {r.get('preset_label', '`' + r['preset'] + '`')} ({r['n_per_group']} images per group; RK4, {r['bpd_steps']} steps in log s(t))",
             "", "| group | mean | std | min | max | seed write-up |", "|---|---|---|---|---|---|"]
    for g in GROUPS:
        s = r["groups"][g]
        lines.append(f"| {names[g]} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['writeup']} |")
    lines += ["", f"ordering original < rotated < averaged < noise: {'holds' if r['ordering_holds'] else 'does NOT hold'}; "
              f"noise above 8 bits/dim: {'yes' if r['noise_above_8'] else 'no'}"]
    if "rotation_gap" in r:
        g = r["rotation_gap"]
        lines += ["", f"rotation gap (rotated minus original, paired by digit): {g['mean']:+.3f} "
                      f"(standard error {g['stderr']:.3f}; seed write-up +0.3, on training digits)"]
    return "\n".join(lines)


def _plot(done: dict[str, np.ndarray]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    rng = np.random.default_rng(0)
    for i, g in enumerate(GROUPS):
        v = done[g]
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=8, alpha=0.5)
        ax.hlines(v.mean(), i - 0.3, i + 0.3, color="k", lw=2, label="our mean" if i == 0 else None)
        ax.scatter([i + 0.35], [WRITEUP_VALUES[g]], marker="D", color="red", s=30, label="seed write-up" if i == 0 else None)
    ax.axhline(8, color="gray", ls=":", lw=1)
    ax.set_xticks(range(len(GROUPS)), ["original", "rotated", "averaged", "noise"])
    ax.set_ylabel("bits/dim (lower = more likely)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
