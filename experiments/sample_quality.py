"""Sample quality of trained runs: the share of 64 samples that a small MNIST classifier labels
with confidence >= 0.9 (engine.experiments.sample_quality), with the classifier's test accuracy.

    python experiments/sample_quality.py --run runs/cpu [--run runs/other ...] [--n 64] [--seed 0]
        [--steps 500] [--samplers sde,pc,ode] [--out results/sample_quality]

Two measures side by side: the issue's (one classifier, trained on digits only) and a strict one
(engine.experiments.sample_quality.STRICT: an ensemble of five classifiers trained with outlier
exposure), which is not fooled by noise; both are checked on real test digits (the ceiling) and
on 256 images that are not digits, made from held-out test digits (`outliers`, 64 of each kind).
Writes sample_quality.{json,md} (each share with its 95% Wilson interval) and one labelled grid
per run and sampler (<preset>_<sampler>.png; <preset>_<digest>_<sampler>.png when runs share a
preset; each sample under the first classifier's label and confidence, then the strict
ensemble's, black where the strict one is confident); each row carries its run's config digest. Samplers (engine.sampling): "sde" the
reverse-diffusion predictor, "pc" the same with one Langevin corrector step per step (snr 0.16),
both --steps steps from the same seed; "ode" the probability-flow ODE (32 RK4 steps, as the app's
"Generate" used).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, presets, provenance  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.experiments import sample_quality as sq  # noqa: E402
from engine.sampling import sample  # noqa: E402
from engine.store import load_run  # noqa: E402


def interval(k: int, n: int) -> list[float]:
    """The 95% Wilson interval [lo, hi] of a share k / n: 64 samples leave about +-10 points of
    chance, so a share is stated with it (scipy.stats.binomtest)."""
    from scipy.stats import binomtest
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _pct(k: int, n: int) -> str:
    lo, hi = interval(k, n)
    return f"{k / n:.1%}; {lo:.0%}-{hi:.0%}"


def _grid(x: np.ndarray, labels: list, conf: list, path: Path, title: str, strict: Optional[dict] = None) -> None:
    """Saves grid_figure(...) as the PNG `path` (atomically)."""
    import matplotlib.pyplot as plt
    fig = grid_figure(x, labels, conf, title, strict)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def grid_figure(x: np.ndarray, labels: list, conf: list, title: str, strict: Optional[dict] = None):
    """A matplotlib figure: samples x (n, 1, 28, 28), 8 a row, each under its label and confidence;
    with `strict` (a confident_share result on the same x) its label and confidence too, and its
    verdict sets the colour (black: confident)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(x)
    cols = 8
    rows = (n + cols - 1) // cols
    # long run paths and preset labels wrap instead of running off the figure's edge
    title = "\n".join(textwrap.fill(line, 12 * cols) for line in title.splitlines())
    head = 0.14 * (title.count("\n") + 1) + 0.05  # inches the title takes, kept free of the grid
    height = rows * 1.25 + head
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, height))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(x[i, 0], 0, 1), cmap="gray", vmin=0, vmax=1)
            text, ok = f"{labels[i]} {conf[i]:.2f}", conf[i] >= 0.9
            if strict is not None:
                text += f" / {strict['labels'][i]} {strict['confidence'][i]:.2f}"
                ok = strict["confidence"][i] >= 0.9
            ax.set_title(text, fontsize=7 if strict is None else 6, color="black" if ok else "red")
    fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    # laid out by hand: tight_layout packed a tall grid up into the title (a 256-sample grid hid it)
    # and, on two rows, the second row's labels over the first row's images; 0.2 in above each
    # image row is its labels' (1.25 in a row in all)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (head + 0.2) / height,
                        wspace=0.1, hspace=0.2 / 1.05)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="a trained run folder (repeatable)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=500, help="SDE and PC sampler steps")
    ap.add_argument("--samplers", default="sde", help="comma-separated: sde, pc, ode")
    ap.add_argument("--out", default="results/sample_quality")
    a = ap.parse_args()
    samplers = a.samplers.split(",")
    # checked before the classifiers are trained or anything is written
    if not set(samplers) <= {"sde", "pc", "ode"}:
        sys.exit("error: --samplers takes sde, pc and ode")
    if not 1 <= a.n <= 1024 or a.steps < 1 or a.seed < 0:
        sys.exit("error: --n must be between 1 and 1024, --steps at least 1 and --seed 0 or more")
    provenance.start()
    try:
        runs = [load_run(r) for r in a.run]
    except UserError as e:
        sys.exit(f"error: {e}")
    t0 = time.perf_counter()
    net = sq.load_classifier(callback=lambda d: print(f"classifier epoch {d['epoch']}/{d['epochs']} loss {d['loss']:.3f}",
                                                        flush=True))
    acc = sq.test_accuracy(net)
    print(f"classifier test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    strict = sq.load_strict(callback=lambda d: print(f"strict member epoch {d['epoch']}/{d['epochs']}", flush=True))
    acc_strict = sq.test_accuracy(strict)
    print(f"strict ensemble test accuracy {acc_strict:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # the ceiling: real test digits, as many as the samples, through the same threshold
    test_x = data.load_test()[0]
    ref = sq.confident_share(net, test_x[data.query_indices(a.n, 7)])
    ref_strict = sq.confident_share(strict, test_x[data.query_indices(a.n, 7)])
    print(f"{a.n} MNIST test digits: {ref['share']:.1%} confident, strict {ref_strict['share']:.1%}", flush=True)
    # the floor: images that are no digit, made from other test digits (64 of each kind)
    kinds = torch.arange(len(sq.OUTLIER_KINDS)).repeat_interleave(64)
    fakes = sq.outliers(test_x[data.query_indices(len(kinds), 11)], torch.Generator().manual_seed(a.seed), kinds)
    floor = {}
    for name, clf in (("first", net), ("strict", strict)):
        r = sq.confident_share(clf, fakes)
        ok = np.asarray(r["confidence"]) >= 0.9
        floor[name] = {"share": r["share"], "histogram": r["histogram"],
                       "per_kind": {k: float(ok[kinds.numpy() == i].mean()) for i, k in enumerate(sq.OUTLIER_KINDS)}}
        print(f"{len(kinds)} non-digits: {r['share']:.1%} confident to the {name} classifier; per class {r['histogram']}",
              flush=True)
    rows = []
    # grids are named by preset (cpu_sde.png), with the run's digest when two runs share one
    shared = len({r.preset.name for r in runs}) < len(runs)
    for run in runs:
        p = run.preset
        name = f"{p.name}_{run.digest[:8]}" if shared else p.name
        for how in samplers:
            t1 = time.perf_counter()
            model = run.model()  # on the preset's device (a GPU for `gpu`): the noise is drawn there too
            x = sample(model, (a.n, 1, 28, 28), method=how, n_steps=None if how == "ode" else a.steps,
                       seed=a.seed, sigma=p.sigma, eps=p.t_eps, device=str(next(model.parameters()).device)).cpu()
            r = sq.confident_share(net, x)
            rs = sq.confident_share(strict, x)
            _grid(x.numpy(), r["labels"], r["confidence"], Path(a.out) / f"{name}_{how}.png",
                  f"{run.path}: {presets.label(p)}\n{how} sampler: {r['share']:.1%} labelled with confidence >= 0.9, "
                  f"{rs['share']:.1%} by the strict ensemble (label confidence / strict label confidence)", rs)
            k, ks = int(round(r["share"] * a.n)), int(round(rs["share"] * a.n))
            rows.append({"run": str(run.path), "preset": p.name, "preset_label": presets.label(p), "run_digest": run.digest, "sampler": how,
                         "share": r["share"], "confident": k, "interval": interval(k, a.n), "histogram": r["histogram"],
                         "labels": r["labels"], "confidence": r["confidence"],
                         "strict": {"share": rs["share"], "confident": ks, "interval": interval(ks, a.n),
                                    "histogram": rs["histogram"], "labels": rs["labels"], "confidence": rs["confidence"]},
                         "sample_seconds": time.perf_counter() - t1})
            print(f"{run.path} {how}: {rows[-1]['confident']}/{a.n} confident ({r['share']:.1%}); "
                  f"per class {r['histogram']}; strict {rows[-1]['strict']['confident']}/{a.n}, per class "
                  f"{rs['histogram']}; {rows[-1]['sample_seconds']:.0f} s", flush=True)
    st = provenance.stamp()
    atomic.save_json({**st, "classifier": {"recipe": sq.RECIPE, "test_accuracy": acc},
                      "strict_classifier": {"recipe": sq.STRICT, "seeds": list(sq.STRICT_SEEDS), "test_accuracy": acc_strict},
                      "test_digits": {"share": ref["share"], "histogram": ref["histogram"],
                                      "strict_share": ref_strict["share"], "strict_histogram": ref_strict["histogram"]},
                      "non_digits": {"n": len(kinds), "kinds": list(sq.OUTLIER_KINDS), **floor},
                      "n": a.n, "seed": a.seed,
                      "steps": a.steps, "threshold": 0.9, "runs": rows}, Path(a.out) / "sample_quality.json")
    fl = floor["first"]["per_kind"]
    md = [f"`{st['command']}` at commit {st['commit']}.", "",
          f"Classifier: a two-layer CNN trained on the 5,000 bundled training images; test accuracy "
          f"{acc:.2%} on the 10,000 MNIST test digits. {a.n} samples per run and sampler (seed {a.seed}; sde and pc "
          f"{a.steps} steps, ode 32 RK4 steps). "
          f"The same threshold on {a.n} real test digits: {ref['share']:.1%} confident (the ceiling); on "
          f"{len(kinds)} images that are no digit, made from other test digits: {floor['first']['share']:.1%} "
          f"(per class {' '.join(map(str, floor['first']['histogram']))}; "
          + ", ".join(f"{k} {v:.0%}" for k, v in fl.items()) + ").", "",
          f"Strict: the mean of five such classifiers (seeds {', '.join(map(str, sq.STRICT_SEEDS))}) each trained "
          f"with outlier exposure (images that are no digit, target uniform, weight {sq.STRICT['outlier_weight']}); "
          f"test accuracy {acc_strict:.2%}; {ref_strict['share']:.1%} of the {a.n} test digits confident, "
          f"{floor['strict']['share']:.1%} of the {len(kinds)} non-digits.", "",
          "Shares with their 95% Wilson interval (chance alone, over the samples drawn).", "",
          "| run | preset | digest | sampler | confident (>= 0.9) | confident per class 0-9 | strict | strict per class 0-9 | seconds |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['run']} | {r['preset_label']} | {r['run_digest'][:8]} | {r['sampler']} | {r['confident']}/{a.n} "
           f"({_pct(r['confident'], a.n)}) | {' '.join(map(str, r['histogram']))} | {r['strict']['confident']}/{a.n} "
           f"({_pct(r['strict']['confident'], a.n)}) | {' '.join(map(str, r['strict']['histogram']))} | {r['sample_seconds']:.0f} |"
           for r in rows]
    atomic.save_text("\n".join(md) + "\n", Path(a.out) / "sample_quality.md")
    print(f"wrote {a.out}/sample_quality.md")


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
