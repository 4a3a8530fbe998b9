"""Which training hyperparameters make the metagradient agree with retraining? A grid on `small`.

    python experiments/grid_smoothness.py [--out results/grid_small] [--queries 2] [--drop-sets 12] [--jobs 2] [--only "A;B"]

The seed found a stable metagradient by gridding the learning-rate schedule, batch size and
Adam's hyperparameters. We vary one at a time around the `small` preset (plus the width) and,
for each variant: train it, take the metagradient of Q query functionals, retrain without K
random 1% drop-sets (same seed) and report Spearman's rho between predicted and actual changes.

The query functional here is a cheap stand-in for the exact BPD: the denoising score-matching
loss of a test digit at 8 fixed noise levels (std log-spaced from 0.01 to 25) and fixed noise
draws. It is a smooth function of the final parameters like the BPD, costs one forward pass
instead of ~25,000, and so lets the grid measure the smoothness of *training*, which is what the
hyperparameters change. The winner is then checked with the exact BPD by `python -m engine lds`.

Each variant's result is stored as it finishes (the grid resumes), and grid.json / grid.md
are rewritten after each one; within a variant, its metagradient and each retrain are stored as
they finish (RUN.smoothness/), so an interrupted variant resumes too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, provenance, sde, training as train  # noqa: E402
from engine.experiments.protocols import drop_sets  # noqa: E402
from engine.files import load_or_compute  # noqa: E402
from engine.metagrad import metagradient  # noqa: E402
from engine.presets import PRESETS, Preset, digest, preset_from_dict  # noqa: E402
from engine.store import load_run  # noqa: E402

VARIANTS: dict[str, dict] = {
    # Names say the full difference from today's `small` (lr 5e-4). The first `small` had lr 2e-3.
    "lr 2e-3 (the first small)": {"lr": 2e-3},
    "lr 5e-3": {"lr": 5e-3},
    "lr 2e-3 + betas (0.9, 0.999)": {"lr": 2e-3, "betas": (0.9, 0.999)},
    "lr 2e-3 + eps 1e-8": {"lr": 2e-3, "eps_root": 1e-8},
    # run with --only when there is time: each costs ~3 min on 2 cores (~6 with other work running)
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-3 + eps 1e-4": {"lr": 1e-3, "eps_root": 1e-4},
    "lr 5e-4": {},
    "lr 5e-4 + batch 64": {"batch_size": 64},
    "lr 5e-4 + betas (0.9, 0.999)": {"betas": (0.9, 0.999)},
    "lr 5e-4 + no warmup": {"warmup": 0.0},
    "lr 5e-4 + width (8, 16, 32)": {"channels": (8, 16, 32)},
    # Adam is scale-free except for eps: with our loss summed over 784 pixels, eps_root = 0.6 is
    # the same optimizer as eps_root = 1e-6 on the per-pixel mean loss (0.6 ~ 1e-6 * 784^2).
    "lr 2e-3 + eps 0.6 (= 1e-6 on the mean loss)": {"lr": 2e-3, "eps_root": 0.6},
}
# The sweep around today's `small`: batch, betas, schedule and width, each moved alone.
# The first `small` (lr 2e-3) and lr 1e-3 + eps 1e-4 are the contrast that chose lr 5e-4.
DEFAULT = ["lr 5e-4", "lr 5e-4 + batch 64", "lr 5e-4 + betas (0.9, 0.999)", "lr 5e-4 + no warmup",
           "lr 5e-4 + width (8, 16, 32)", "lr 2e-3 (the first small)", "lr 1e-3 + eps 1e-4"]


def proxy_loss(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(Q,) denoising loss of queries x (Q, 1, 28, 28) at 8 fixed noise levels and draws.

    Every query gets the same draws (one (1, 1, 28, 28) draw per level), so a query's value does
    not depend on which other queries share the batch: its gradient and its value after
    retraining are then the same function.
    """
    g = torch.Generator().manual_seed(seed)
    # the levels span the model's own noise scale (every screened preset has sigma 25)
    stds = torch.logspace(np.log10(0.01), np.log10(model.sigma), 8)
    t = sde.time_of_std(stds, model.sigma)
    out = 0
    for j in range(len(stds)):
        z = torch.randn((1, *x.shape[1:]), generator=g).to(x)
        score = model(x + stds[j] * z, t[j].expand(x.shape[0]).to(x))
        out = out + ((stds[j] * score + z) ** 2).sum((1, 2, 3))
    return out / len(stds)


def _retrain(preset_dict: dict, drop: np.ndarray, queries: np.ndarray) -> list[float]:
    torch.set_num_threads(1)
    p = preset_from_dict(preset_dict)
    w = np.ones(p.n_train, np.float32)
    w[drop] = 0
    s = train.train(p, seed=0, weights=w)
    model = train.make_model(p, 0)
    model.load_state_dict(s.model_params)
    with torch.no_grad():
        return proxy_loss(model, torch.from_numpy(queries)).tolist()


def evaluate(preset: Preset, runs: Path, queries: list[int], k: int, jobs: int) -> dict:
    """Spearman's rho between the proxy's predicted and actual changes over k retrains.

    The metagradient and each retrain's proxy values are stored beside the run (RUN.smoothness/) as they
    finish, keyed by the run's digest, the queries and the drop-sets, so an interrupted stage
    resumes (its retrains are most of its hour on 2 cores) and a stale file is never reused.
    """
    from scipy.stats import spearmanr
    train.train(preset, seed=0, out=runs)
    run = load_run(runs)
    # the training session's own time, as the run recorded it (a finished run returns at once)
    train_s = run.train_seconds()
    x = data.load_test()[0][queries]
    sets = drop_sets(preset.n_train, k, 0.01, 0)
    cache = runs.with_name(runs.name + ".smoothness")
    key = digest({"run": run.digest, "queries": [int(q) for q in queries], "k": k, "frac": 0.01})

    def compute_metagradient() -> dict:
        model = run.model()
        names = [n for n, _ in model.named_parameters()]
        qgrads, base = [], []
        for i in range(len(queries)):
            v = proxy_loss(model, x[i: i + 1])[0]
            g = torch.autograd.grad(v, list(model.parameters()))
            qgrads.append(dict(zip(names, g)))
            base.append(float(v.detach()))
        images, _ = data.load_train(preset.n_train)
        t0 = time.time()
        gw = metagradient(run, images, qgrads).numpy()
        return {"gw": gw, "base": np.array(base), "seconds": np.array(time.time() - t0)}
    stored = load_or_compute(cache / "metagradient.npz", {"key": key}, compute_metagradient, what="the proxy's metagradient")
    gw, base, mg_s = stored["gw"], stored["base"].tolist(), float(stored["seconds"])
    done: dict[int, list[float]] = {}
    for j in range(k):
        f = cache / f"retrain_{j:03d}.json"
        try:
            r = json.loads(f.read_text()) if f.is_file() else None
        except ValueError:
            r = None  # a damaged file only costs its retrain again
        if isinstance(r, dict) and r.get("key") == key and r.get("set") == sets[j].tolist():
            done[j] = r["proxy"]
    todo = [j for j in range(k) if j not in done]
    if todo:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_retrain, preset.to_dict(), sets[j], x.numpy()): j for j in todo}
            for fut in as_completed(futures):
                j = futures[fut]
                done[j] = fut.result()
                atomic.save_json({"key": key, "set": sets[j].tolist(), "proxy": done[j]}, cache / f"retrain_{j:03d}.json")
    actual = np.array([done[j] for j in range(k)]).T - np.array(base)[:, None]
    predicted = -np.stack([gw[:, s].sum(1) for s in sets], 1)
    rhos = [float(spearmanr(predicted[i], actual[i])[0]) for i in range(len(queries))]
    return {"spearman": rhos, "spearman_mean": float(np.mean(rhos)), "final_loss": float(np.mean(run.losses()[-20:])),
            "train_seconds": train_s, "metagradient_seconds": mg_s,
            "grad_w_norm": float(np.linalg.norm(gw, axis=1).mean()),
            "predicted": predicted.tolist(), "actual": actual.tolist()}


def table(results: dict) -> str:
    lines = ["| variant | Spearman per query | mean | final loss (last 20 steps) | train s | metagradient s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in r['spearman'])} | **{r['spearman_mean']:.3f}** | "
                     f"{r['final_loss']:.2f} | {r['train_seconds']:.0f} | {r['metagradient_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/grid_small")
    ap.add_argument("--runs", default="runs/grid")
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--drop-sets", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="semicolon-separated variant names (names may hold commas)")
    a = ap.parse_args()
    provenance.start()
    out = Path(a.out)
    queries = data.query_indices(a.queries, seed=1)  # not the LDS queries (seed 0)
    path = out / "grid.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    names = [n.strip() for n in a.only.split(";")] if a.only else DEFAULT
    for i, name in enumerate(names):
        if name in results:
            continue
        preset = dataclasses.replace(PRESETS["small"], **VARIANTS[name])
        print(f"[{i + 1}/{len(names)}] {name}", flush=True)
        results[name] = evaluate(preset, Path(a.runs) / "".join(c if c.isalnum() or c in ".-" else "_" for c in name), queries, a.drop_sets, a.jobs)
        print(f"    Spearman {results[name]['spearman']}", flush=True)
        st = provenance.stamp()
        atomic.save_json({**st, "queries": queries, "drop_sets": a.drop_sets, "frac": 0.01, "variants": VARIANTS,
                          "results": results}, path)
        atomic.save_text(table(results) + "\n", out / "grid.md")  # grid.json names the command and commit
    print(table(results))


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
