"""Which training makes a default model worth exploring? A screen of candidates around `cpu`.

    python experiments/default_candidates.py [--only "A;B"] [--n 8] [--samples 64] [--drop-sets 12]
        [--jobs 2] [--stages training,samples,figure2,smoothness] [--base cpu] [--device cpu|cuda]
        [--out results/default_candidates]

Each candidate is the base preset with the changes its name says. For each, cheapest first:
- training (stored in runs/candidates/<name>; resumes), its time and final loss;
- sample quality: reverse-SDE samples (500 steps, seed 0) and the share that the classifier of
  experiments/sample_quality.py labels with confidence >= 0.9, with the count per class (a
  collapse onto one class shows there, and a share alone would hide it), and the count by its
  strict ensemble (stored since it exists; the earlier rows have the first classifier's only);
- Figure 2 on n hidden test digits (the report's own inputs, seed 0): the means of the originals,
  their 90-degree rotations, averages of 4 and uniform noise, and the rotation gap that the
  seed's Figure 2 is about (seed: 3.5 / 3.8 / 5.32 / 9.12, gap 0.3);
- the rotation gap alone on the Figure 2 report's 50 originals (--gap-n), with its standard error;
- smoothness, the screen that chose lr 5e-4 on `small` (experiments/grid_smoothness.py): Spearman
  between the metagradient's predicted and the actual change of a proxy query (a denoising loss)
  over 1% drop-set retrains. A candidate that wins here still needs LDS protocol A with the
  exact BPD (python -m engine lds) before it becomes the default.

Stages run across all candidates before the next (--stages picks some), and every stage of
every candidate is stored as it finishes (candidates.json), so the screen resumes
after an interruption (the smoothness stage keeps its metagradient and each retrain beside the
run, so it resumes within a candidate too); candidates.md is rewritten each time. On 2 cores a
3,000-step candidate costs about 40 min, two thirds of it the retrains of the smoothness stage.
On a GPU, give one candidate per command (stages run across candidates, so two trainings come
before either's other stages) and run no two on one card: two `--base gpu` trainings sharing one
H200 each ran at under half the speed of one alone (8,284 of 11,700 steps in 500 s, where one
alone trains all in 314 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import atomic, data, provenance, training as train  # noqa: E402
from engine.bpd import run_bpd  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.experiments import sample_quality as sq  # noqa: E402
from engine.experiments.figure2 import GROUPS, WRITEUP_VALUES, figure2_inputs  # noqa: E402
from engine.presets import PRESETS  # noqa: E402
from engine.sampling import sample  # noqa: E402
from engine.store import load_run  # noqa: E402

# The base the candidates' names describe: `cpu` as it was when screened (600 steps, lr 5e-4, Adam
# eps 1e-6, no positional maps), before its winner below became `cpu`; fixed here so the screen and
# its stored runs stay what they were (every setting `cpu` has changed since is named here: the
# positional maps were missing until a rerun of a candidate trained a different net; the test
# tests/test_default_candidates.py checks every candidate against the preset its report stored).
BASE: dict[str, dict] = {"cpu": {"steps": 600, "lr": 5e-4, "eps_root": 1e-6, "positional": 0.0, "positional_from": 0}}

CANDIDATES: dict[str, dict] = {
    # Names say the full difference from the base (BASE: 2,000 images, 600 steps, lr 5e-4).
    "600 steps (today)": {},
    "3000 steps": {"steps": 3000},
    "3000 steps + lr 1e-3": {"steps": 3000, "lr": 1e-3},
    "3000 steps + 5000 images": {"steps": 3000, "n_train": 5000},
    "6000 steps": {"steps": 6000},
    # A fourth level (7x7 -> 4x4): one 3x3 conv per level gives the three-level net a receptive
    # field of about 15 pixels, under a digit's size, so it can learn strokes but not a digit's
    # shape, and a rotated digit looks as likely as an upright one. Costs more per query (the
    # exact divergence runs the net 784 times), hence the per-BPD seconds in the table.
    "3000 steps + 4 levels": {"steps": 3000, "channels": (16, 32, 64, 64)},
    "3000 steps + 4 levels, 128": {"steps": 3000, "channels": (16, 32, 64, 128)},
    # with --only when there is time
    "1500 steps": {"steps": 1500},
    # Adam's eps inside the square root at 1e-2, about 2.5x the median second moment of the
    # 3000-step run (4e-3; the sum-over-pixels loss makes gradients large, so 1e-6 does nothing):
    # coordinates with small gradients then take smaller steps instead of unit-size ones, which
    # is where a dropped example can flip an update's sign. Does it keep MAGIC's smoothness over
    # 3000 steps, where plain 3000 steps lost it (LDS protocol A on 8 of 50 drop-sets: 0.76)?
    "3000 steps + eps 1e-2": {"steps": 3000, "eps_root": 1e-2},
    # eps 1e-2 recovered part of the smoothness (proxy 0.91, against 0.99 at 600 steps): does a
    # larger eps, 25x the median second moment, recover the rest, and what does it cost the likelihood?
    "3000 steps + eps 1e-1": {"steps": 3000, "eps_root": 1e-1},
    "6000 steps + eps 1e-2": {"steps": 6000, "eps_root": 1e-2},
    # The model's weights as a moving average of the last ~1,000 iterates (engine.presets: ema),
    # carried exactly by the metagradient. Chaotic retraining differences change sign from step
    # to step while a dropped set's effect persists, so the average should keep the systematic
    # part and cancel some of the chaos; averages also usually give better samples.
    "3000 steps + ema 0.999": {"steps": 3000, "ema": 0.999},
    "3000 steps + eps 1e-2 + ema 0.999": {"steps": 3000, "eps_root": 1e-2, "ema": 0.999},
    # Half the learning rate over 3000 steps, with eps 1e-2: the smoothness grid on `small` found
    # the step size the main lever (lr 2e-3: 0.38-0.76; 5e-4: 0.97-0.99); the likelihood should
    # land between 600 and 3000 steps at lr 5e-4.
    "3000 steps + lr 2.5e-4 + eps 1e-2": {"steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2},
    "3000 steps + lr 2e-3": {"steps": 3000, "lr": 2e-3},
    "3000 steps + batch 128": {"steps": 3000, "batch_size": 128},
    # How far are the goals (80% confident samples, rotation gap 0.2) by training budget alone?
    # The same net 4x and 8x longer than the default at lr 1e-3, and the default's smooth
    # setting (lr 2.5e-4, eps 1e-2) 8x longer. A per-query replay and the shipped basis grow
    # linearly with the steps (8x: about 88 h of precompute on 2 cores), so these are a measure
    # of what a larger budget buys, not candidates this machine can ship.
    "12000 steps + lr 1e-3": {"steps": 12000, "lr": 1e-3},
    "24000 steps + lr 1e-3": {"steps": 24000, "lr": 1e-3},
    "24000 steps + lr 2.5e-4 + eps 1e-2": {"steps": 24000, "lr": 2.5e-4, "eps_root": 1e-2},
    # 12,000 steps at lr 1e-3 gave clean strokes but no more digits (14/64): is it the net? The
    # `gpu` preset's net (4 levels, 32-256 channels, 17x the parameters) on the 5,000 bundled
    # images, 12,000 steps at batch 64; about 3x the time per step and per BPD.
    "gpu net + 5000 images + 12000 steps + lr 1e-3": {"steps": 12000, "lr": 1e-3, "n_train": 5000,
                                                      "channels": (32, 64, 128, 256), "embed_dim": 256, "groups": 8},
    # It is the net (40/64, digits in every class) but that net costs 3x per step and per BPD:
    # does the fourth level alone, at a quarter of its parameters, make digits?
    "12000 steps + lr 1e-3 + 4 levels, 128": {"steps": 12000, "lr": 1e-3, "channels": (16, 32, 64, 128)},
    # The same with its weights averaged over the last ~1,000 iterates: does the average, which
    # diffusion models usually sample from, make more of the samples digits? The sample stage
    # scores the last iterate of the same training too, from the same noise.
    "gpu net + 5000 images + 12000 steps + lr 1e-3 + ema 0.999": {
        "steps": 12000, "lr": 1e-3, "n_train": 5000, "channels": (32, 64, 128, 256), "embed_dim": 256, "groups": 8,
        "ema": 0.999},
    # It does (27/64, digits in every class, 1.25x the default's seconds per BPD): with the
    # default's smooth setting (lr 2.5e-4, eps 1e-2), does it keep them, and MAGIC's smoothness?
    "12000 steps + lr 2.5e-4 + eps 1e-2 + 4 levels, 128": {"steps": 12000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                           "channels": (16, 32, 64, 128)},
    # The rotation gap grew only with the smooth setting's training length (3,000 steps: +0.089;
    # 24,000: +0.142; the 4-level net at 12,000: +0.124, all on the report's 50 digits), never with
    # the net alone. Does training 4x longer again reach the seed's 0.2-0.3, on all 5,000 bundled
    # images (about 1,230 and 610 epochs at batch 64; 2,000 images would be memorized sooner)? A
    # measure of what the goal costs, not a default this machine can precompute.
    "96000 steps + lr 2.5e-4 + eps 1e-2 + 5000 images": {"steps": 96000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                          "n_train": 5000},
    "48000 steps + lr 2.5e-4 + eps 1e-2 + 4 levels, 128 + 5000 images": {
        "steps": 48000, "lr": 2.5e-4, "eps_root": 1e-2, "channels": (16, 32, 64, 128), "n_train": 5000},
    # Learned positional maps on the encoder levels (engine.model.ScoreNet `positional`, 17k more
    # parameters on the default's widths). Every net above is convolutional: it sees a digit's
    # strokes, and a digit turned 90 degrees is made of the same strokes, only placed and oriented
    # otherwise in the frame (MNIST digits are taller than wide). Maps per position let the net
    # learn where ink goes. The default with them, and twice and four times as long.
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional": {"steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                       "positional": 1.0},
    "6000 steps + lr 2.5e-4 + eps 1e-2": {"steps": 6000, "lr": 2.5e-4, "eps_root": 1e-2},
    "6000 steps + lr 2.5e-4 + eps 1e-2 + positional": {"steps": 6000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                       "positional": 1.0},
    "12000 steps + lr 2.5e-4 + eps 1e-2 + positional": {"steps": 12000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                        "positional": 1.0},
    # The gap grew with the steps, as if the maps were still learning: Adam moves a parameter by
    # about lr a step, so at lr 2.5e-4 a map entry needs thousands of steps to reach order 1. The
    # maps' own learning-rate factor (engine.model.ScoreNet `positional`) at the default's 3000 steps.
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x3": {"steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                          "positional": 3.0},
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x10": {"steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                           "positional": 10.0},
    # x3 keeps the default's likelihood of digits and nearly reaches a gap of 0.2; x10 passes the
    # seed's 0.3 but costs about 0.25 bits/dim on the digits themselves. Between them:
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x5": {"steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2,
                                                          "positional": 5.0},
    # x5 (the default since) costs the app's preview: its query basis leaves 0.48 of a test digit's
    # gradient unfitted against 0.15 without maps (results/basis_coverage), 0.57 of that in the
    # finest level's map (a parameter per pixel and channel, following each image's strokes).
    # Orientation shows at coarse scale: maps on the coarser levels only (positional_from).
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x5 from level 1": {
        "steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2, "positional": 5.0, "positional_from": 1},
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x5 from level 2": {
        "steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2, "positional": 5.0, "positional_from": 2},
    # At x5 the coarse maps keep the basis's reach (unfitted 0.31 from level 1, 0.16 from level 2)
    # but not the gap (+0.151, +0.122): stronger coarse maps.
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x15 from level 1": {
        "steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2, "positional": 15.0, "positional_from": 1},
    "3000 steps + lr 2.5e-4 + eps 1e-2 + positional x20 from level 2": {
        "steps": 3000, "lr": 2.5e-4, "eps_root": 1e-2, "positional": 20.0, "positional_from": 2},
    # --base gpu (names say the difference from the `gpu` preset: 4 levels, 32-256 channels, batch
    # 256, lr 1e-3, 11,700 steps = 50 epochs of full MNIST), for a GPU machine with no network:
    # the same recipe on the 5,000 bundled images (600 epochs of them), and twice as long. Where do
    # samples and the rotation gap go with a GPU's budget but this data?
    "5000 bundled images": {"n_train": 5000, "source": "offline"},
    "5000 bundled images + 23400 steps": {"n_train": 5000, "source": "offline", "steps": 23400},
    # The recipe's samples stop at two thirds confident (41/64): do averaged weights (the last
    # ~1,000 of 11,700 iterates, engine.presets: ema) make more of them digits?
    "5000 bundled images + ema 0.999": {"n_train": 5000, "source": "offline", "ema": 0.999},
}
DEFAULT = ["600 steps (today)", "3000 steps", "3000 steps + lr 1e-3", "3000 steps + 5000 images", "6000 steps"]


def candidate_preset(name: str, base: str = "cpu", device: Optional[dict] = None):
    """The preset of candidate `name`: `base` as BASE fixes it, with the candidate's changes (and
    {"device": ...} when given; part of the preset, so of its runs' digest)."""
    return dataclasses.replace(PRESETS[base], **{**BASE.get(base, {}), **CANDIDATES[name], **(device or {})})


STAGES = ("training", "samples", "figure2", "rotation", "smoothness")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def stage_training(run) -> dict:
    return {"train_seconds": run.train_seconds(), "final_loss": float(np.mean(run.losses()[-20:])),
            "run_digest": run.digest}


def _samples(model, p, n: int, classifier, strict=None) -> dict:
    """SDE samples' confident count by `classifier`, and by the `strict` ensemble when given
    (engine.experiments.sample_quality.load_strict: the digits-only classifier is confident on
    many non-digits)."""
    t0 = time.perf_counter()
    # the noise is drawn on the model's device (a GPU for --base gpu)
    x = sample(model, (n, 1, 28, 28), method="sde", n_steps=500, seed=0, sigma=p.sigma, eps=p.t_eps,
               device=str(next(model.parameters()).device)).cpu()
    r = sq.confident_share(classifier, x)
    out = {"confident": int(round(r["share"] * n)), "n": n, "histogram": r["histogram"]}
    if strict is not None:
        rs = sq.confident_share(strict, x)
        out["strict"] = {"confident": int(round(rs["share"] * n)), "histogram": rs["histogram"]}
    return {**out, "seconds": time.perf_counter() - t0}


def stage_samples(run, n: int, classifier, strict=None) -> dict:
    out = _samples(run.model(), run.preset, n, classifier, strict)
    if run.preset.ema:
        # the same training's last iterate, unaveraged (the average never feeds back into
        # training), from the same noise: what the average alone changes
        from engine.bpd import model_for
        out["last_iterate"] = _samples(model_for(run.preset, run.seed, run.load_final().params), run.preset, n,
                                       classifier, strict)
    return out


def stage_figure2(run, n: int) -> dict:
    inputs = figure2_inputs(n, 90.0, 4, 0)
    t0 = time.perf_counter()
    means = {g: float(np.mean(run_bpd(run, inputs[g])[0])) for g in GROUPS}
    return {**means, "gap": means["rotated"] - means["original"], "n": n, "seconds": time.perf_counter() - t0}


def stage_rotation(run, n: int) -> dict:
    """The rotation gap on the n originals of the Figure 2 report (`engine figure2 --n n`): at n = 8
    its standard error (~0.08 bits/dim) is as large as the differences between candidates."""
    inputs = figure2_inputs(n, 90.0, 4, 0)
    t0 = time.perf_counter()
    b = {g: np.asarray(run_bpd(run, inputs[g])[0], dtype=float) for g in ("original", "rotated")}
    d = b["rotated"] - b["original"]
    return {"original": float(b["original"].mean()), "rotated": float(b["rotated"].mean()), "gap": float(d.mean()),
            "gap_se": float(d.std(ddof=1) / np.sqrt(n)), "gap_per_digit": d.tolist(), "n": n,
            "seconds": time.perf_counter() - t0}


def stage_smoothness(run, runs: Path, queries: int, drop_sets: int, jobs: int) -> dict:
    from grid_smoothness import evaluate  # the same screen, on this candidate
    r = evaluate(run.preset, runs, data.query_indices(queries, seed=1), drop_sets, jobs)
    return {k: r[k] for k in ("spearman", "spearman_mean", "metagradient_seconds")}


def table(results: dict) -> str:
    lines = ["| candidate | train s | final loss | samples confident (per class 0-9) | original / rotated / "
             "averaged / noise (bits/dim) | rotation gap | s per BPD | rotation gap on the report's digits (± SE) "
             "| smoothness (Spearman) |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = list(CANDIDATES) + sorted(set(results) - set(CANDIDATES))  # the json's keys come back sorted
    for name in sorted(results, key=order.index):
        r = results[name]
        t, s, f, rot, m = (r.get(k) for k in STAGES)
        cells = [name,
                 f"{t['train_seconds']:.0f}" if t else "…", f"{t['final_loss']:.1f}" if t else "…",
                 (f"{s['confident']}/{s['n']} ({' '.join(map(str, s['histogram']))})"
                  + (f"; strict {s['strict']['confident']}/{s['n']}" if "strict" in s else "")
                  + (f"; last iterate {s['last_iterate']['confident']}/{s['n']}" if "last_iterate" in s else "")
                  if s else "…"),
                 " / ".join(f"{f[g]:.2f}" for g in GROUPS) if f else "…", f"{f['gap']:+.2f}" if f else "…",
                 f"{f['seconds'] / (4 * f['n']):.1f}" if f else "…",
                 f"{rot['gap']:+.3f} ± {rot['gap_se']:.3f} (n {rot['n']})" if rot else "…",
                 f"{m['spearman_mean']:.3f} ({', '.join(f'{v:.2f}' for v in m['spearman'])})" if m else "…"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| seed write-up | | | | {' / '.join(str(WRITEUP_VALUES[g]) for g in GROUPS)} | +0.30 | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/default_candidates")
    ap.add_argument("--runs", default="runs/candidates")
    ap.add_argument("--base", default="cpu", help="the preset the candidates change")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="train and evaluate on this device instead of the preset's")
    ap.add_argument("--only", help="semicolon-separated candidate names (names may hold commas)")
    ap.add_argument("--n", type=int, default=8, help="test digits per Figure 2 group")
    ap.add_argument("--gap-n", type=int, default=50, help="originals of the rotation stage (the report's n)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--queries", type=int, default=2, help="proxy queries of the smoothness stage")
    ap.add_argument("--drop-sets", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=2, help="retrains in parallel")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(";")] if a.only else DEFAULT
    unknown = [n for n in names if n not in CANDIDATES]
    stages = [st.strip() for st in a.stages.split(",")]
    if any(st not in STAGES for st in stages):
        sys.exit(f"error: unknown stage in {a.stages!r}; stages: {', '.join(STAGES)}")
    if unknown or a.base not in PRESETS:
        sys.exit(f"error: unknown {'candidate ' + repr(unknown[0]) if unknown else 'preset ' + repr(a.base)}; "
                 f"candidates: {'; '.join(CANDIDATES)}")
    if a.n < 1 or a.gap_n < 2 or a.samples < 1 or a.drop_sets < 2 or a.queries < 1 or a.jobs < 1:
        sys.exit("error: --n, --samples, --queries and --jobs must be >= 1, --gap-n and --drop-sets >= 2")
    provenance.start()
    out = Path(a.out)
    path = out / "candidates.json"
    try:
        results = json.loads(path.read_text())["results"] if path.is_file() else {}
    except (ValueError, KeyError):
        sys.exit(f"error: {path} is not a candidates report; move it away to start afresh")
    classifier = None
    settings = {"base": a.base, "n": a.n, "samples": a.samples, "queries": a.queries, "drop_sets": a.drop_sets}
    if a.gap_n != 50:  # a key only when it differs, so that the stages stored before it are kept
        settings["gap_n"] = a.gap_n
    device = {"device": a.device} if a.device else {}  # part of the preset, so of its runs' digest
    presets = {name: candidate_preset(name, a.base, device) for name in names}
    for name, preset in presets.items():
        r = results.setdefault(name, {})
        if r.get("settings") != settings or r.get("preset") != preset.to_dict():
            r.clear()  # other settings or another base: nothing of it is reused
            r.update(settings=settings, preset=preset.to_dict())
    # Stage by stage across the candidates, not candidate by candidate: the cheap stages of
    # every candidate come first, so the screen can be read (and cut short) before the retrains.
    for stage in stages:
        for i, (name, preset) in enumerate(presets.items()):
            r = results[name]
            folder = Path(a.runs) / a.base / slug(name)
            if stage in r:
                continue
            print(f"[{i + 1}/{len(names)}] {name}: {stage}", flush=True)
            try:
                train.train(preset, seed=0, out=folder / "run")
                run = load_run(folder / "run")
                if stage == "training":
                    r[stage] = stage_training(run)
                elif stage == "samples":
                    classifier = classifier or (sq.load_classifier(), sq.load_strict())
                    r[stage] = stage_samples(run, a.samples, *classifier)
                elif stage == "figure2":
                    r[stage] = stage_figure2(run, a.n)
                elif stage == "rotation":
                    r[stage] = stage_rotation(run, a.gap_n)
                else:
                    r[stage] = stage_smoothness(run, folder / "run", a.queries, a.drop_sets, a.jobs)
            except UserError as e:
                sys.exit(f"error: {e}")
            # one candidate's stages come from several invocations (resumes, --stages): each
            # stage says which command and checkout made it
            r[stage]["by"] = provenance.stamp()
            atomic.save_json({**provenance.stamp(), "candidates": CANDIDATES, "results": results}, path)
            atomic.save_text(table(results) + "\n", out / "candidates.md")  # the json names the command and commit
    print(table({n: results[n] for n in names}))


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
