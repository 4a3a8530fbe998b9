"""RESULTS.md: every measurement under results/, gathered in one page, from the files the commands
wrote (never retyped). Run by `make results` after the commands; `--out RESULTS.md` writes it.

    python scripts/results_md.py --out RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the best-sampling net screened (experiments/default_candidates.py), which several reports measure
GPU_NET = "runs/candidates/cpu/gpu_net___5000_images___12000_steps___lr_1e-3___ema_0.999/run"
# the `cpu` default as screened (positional maps x10): the same config, bit for bit the same weights as runs/cpu
X10 = "runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2___positional_x10/run"
# the default before it (positional maps x5, config d8d40f86), on which several reports were made
X5 = "runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2___positional_x5/run"

# the screened 3,000-step `cpu` variants (experiments/default_candidates.py): no maps (the previous default), then
# maps x10 on every level and on the coarser levels only (Preset.positional_from)
CANDIDATE = "runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2"
COVERAGE_VARIANTS = ["", "___positional_x10", "___positional_x5_from_level_1", "___positional_x5_from_level_2",
                     "___positional_x15_from_level_1", "___positional_x20_from_level_2"]

# (title, the report's Markdown or text, its JSON (provenance), images, how to make it)
SECTIONS = [
    ("Attribution methods against retraining (LDS)", "results/comparison.md", "results/comparison.json",
     ["results/comparison.png"], "python -m engine compare --run runs/small --out results/lds_small --seeds 4 --jobs 2"),
    ("Precomputed replays against exact MAGIC", "results/precompute/fidelity.md", "results/precompute/fidelity.json",
     ["results/precompute/fidelity.png"],
     "python -m engine precompute --run runs/small --method lowrank --rank 64 --jobs 2 && "
     "python -m engine precompute --run runs/small --method basis --rank 64 --jobs 2 && "
     "python -m engine precompute --run runs/small --method exact --jobs 2 && "
     "python experiments/precompute_fidelity.py --run runs/small --reps lowrank64,basis64,exact --lds-images --jobs 2"),
    ("A new image's attribution: precomputed against replay", "results/bench_precompute.txt", None, [],
     "python benchmarks/bench_precompute.py --run runs/small --out results/bench_precompute.txt"),
    ("The app's default model: its shipped representation's cost", "results/bench_precompute_cpu.txt", None, [],
     "python -m engine precompute --run runs/cpu --method basis --rank 64 --jobs 2 --ship && "
     "python benchmarks/bench_precompute.py --run runs/cpu --rep basis64 --out results/bench_precompute_cpu.txt"),
    ("The shipped representation on another kind of CPU", "results/cpu_rounding/cpu_rounding.md",
     "results/cpu_rounding/cpu_rounding.json", [],
     "python experiments/cpu_rounding.py --run runs/cpu --out results/cpu_rounding"),
    ("The shipped query basis in float16: what the rounding does to scores (the x5 default's basis)", "results/bench_ship_encoding_cpu.txt", None, [],
     f"python benchmarks/bench_ship_encoding.py --run {X5} --out results/bench_ship_encoding_cpu.txt"),
    ("The shipped representation on an Intel Xeon (the file was made on an AMD EPYC)", "results/cpu_rounding_xeon/cpu_rounding.md",
     "results/cpu_rounding_xeon/cpu_rounding.json", [],
     "python experiments/cpu_rounding.py --run runs/cpu --out results/cpu_rounding_xeon"),
    ("Figure 2: digits, rotations, averages, noise", "results/figure2/figure2.md", "results/figure2/figure2.json",
     ["results/figure2/figure2.png"], "python -m engine figure2 --run runs/cpu --out results/figure2"),
    ("Figure 2 on the digits the model trained on (the seed's protocol)", "results/figure2_train/figure2.md",
     "results/figure2_train/figure2.json", ["results/figure2_train/figure2.png"],
     "python -m engine figure2 --run runs/cpu --images train --out results/figure2_train"),
    ("Figure 2 with averages of 2 digits (the seed says \"multiple\")", "results/figure2_k2/figure2.md",
     "results/figure2_k2/figure2.json", [], "python -m engine figure2 --run runs/cpu --k-avg 2 --out results/figure2_k2"),
    ("Figure 2 with averages of 8 digits", "results/figure2_k8/figure2.md",
     "results/figure2_k8/figure2.json", [], "python -m engine figure2 --run runs/cpu --k-avg 8 --out results/figure2_k8"),
    ("Figure 2 on the 600-step `cpu` the issue started from (`runs/cpu600`, trained by `python -m engine train --preset cpu "
     "--out runs/cpu600` at 2f7999d: config digest 168077b8)", "results/figure2_cpu600/figure2.md",
     "results/figure2_cpu600/figure2.json", ["results/figure2_cpu600/figure2.png"],
     "python -m engine figure2 --run runs/cpu600 --out results/figure2_cpu600"),
    *[(f"The default's Figure 2 against the 600-step one's, image by image{t}", f"results/figure2_versus_cpu600{s}/versus.md",
       f"results/figure2_versus_cpu600{s}/versus.json", [],
       f"python -m engine figure2 --run runs/cpu600{k} --out results/figure2_cpu600{s} && python experiments/figure2_versus.py "
       f"--base results/figure2_cpu600{s}/figure2.json --new results/figure2{s}/figure2.json --out results/figure2_versus_cpu600{s}")
      for s, k, t in (("", "", " (averages of 4, the report's setting)"), ("_k2", " --k-avg 2", ", averages of 2"),
                      ("_k8", " --k-avg 8", ", averages of 8"))],
    ("The x10 positional-maps candidate's Figure 2 against the 600-step `cpu`'s, image by image",
     "results/figure2_versus_cpu600_x10/versus.md", "results/figure2_versus_cpu600_x10/versus.json", [],
     "python experiments/figure2_versus.py --base results/figure2_cpu600/figure2.json "
     "--new results/figure2_cpu_positional_x10/figure2.json --out results/figure2_versus_cpu600_x10"),
    ("Uploads: synthetic phone photos of test digits, with the paper evened out and without",
     "results/photo_uploads/photo_uploads.md", "results/photo_uploads/photo_uploads.json", [],
     "python experiments/photo_uploads.py --out results/photo_uploads"),
    ("Rotated digits: orientation against resampling", "results/rotation_angles/rotation_angles.md",
     "results/rotation_angles/rotation_angles.json", [], "python experiments/rotation_angles.py"),
    ("The same on the default's own training digits (the seed's protocol)", "results/rotation_angles_train/rotation_angles.md",
     "results/rotation_angles_train/rotation_angles.json", [],
     "python experiments/rotation_angles.py --images train --out results/rotation_angles_train"),
    ("The same under the best-sampling net screened (the `gpu` net, 5,000 images, 12,000 steps, EMA)",
     "results/rotation_angles_gpu_net/rotation_angles.md", "results/rotation_angles_gpu_net/rotation_angles.json", [],
     f"python experiments/rotation_angles.py --run {GPU_NET} --n 20 --angles 15,90 --back '' --out results/rotation_angles_gpu_net"),
    ("Sample quality: are the samples digits?", "results/sample_quality/sample_quality.md",
     "results/sample_quality/sample_quality.json",
     ["results/sample_quality/cpu_sde.png", "results/sample_quality/cpu_pc.png", "results/sample_quality/cpu_ode.png"],
     "python experiments/sample_quality.py --run runs/cpu --samplers sde,pc,ode --out results/sample_quality"),
    ("The same on the 600-step `cpu` the issue started from (its run trained by `python -m engine train --preset cpu "
     "--out runs/cpu600` at 2f7999d: config digest 168077b8)", "results/sample_quality_cpu600/sample_quality.md",
     "results/sample_quality_cpu600/sample_quality.json", ["results/sample_quality_cpu600/cpu_pc.png"],
     "python experiments/sample_quality.py --run runs/cpu600 --samplers sde,pc,ode --out results/sample_quality_cpu600"),
    ("The x5 default with 4,000-step samplers (the steps that lift the gpu net)", "results/sample_quality_cpu_4000/sample_quality.md",
     "results/sample_quality_cpu_4000/sample_quality.json", ["results/sample_quality_cpu_4000/cpu_pc.png"],
     "python experiments/sample_quality.py --run runs/cpu --samplers sde,pc --steps 4000 --out results/sample_quality_cpu_4000"),
    ("Samplers on the best-sampling net screened (the `gpu` net, 5,000 images, EMA), 1,000 steps",
     "results/sample_quality_gpu_net/sample_quality.md", "results/sample_quality_gpu_net/sample_quality.json",
     ["results/sample_quality_gpu_net/cpu_pc.png"],
     f"python experiments/sample_quality.py --run {GPU_NET} "
     "--samplers sde,pc,ode --steps 1000 --out results/sample_quality_gpu_net"),
    ("The same, 4,000 steps", "results/sample_quality_gpu_net_4000/sample_quality.md",
     "results/sample_quality_gpu_net_4000/sample_quality.json", ["results/sample_quality_gpu_net_4000/cpu_pc.png"],
     f"python experiments/sample_quality.py --run {GPU_NET} "
     "--samplers sde,pc --steps 4000 --out results/sample_quality_gpu_net_4000"),
    ("The same predictor-corrector sampler, 256 samples", "results/sample_quality_gpu_net_4000_n256/sample_quality.md",
     "results/sample_quality_gpu_net_4000_n256/sample_quality.json", ["results/sample_quality_gpu_net_4000_n256/cpu_pc.png"],
     f"python experiments/sample_quality.py --run {GPU_NET} "
     "--samplers pc --steps 4000 --n 256 --out results/sample_quality_gpu_net_4000_n256"),
    ("Figure 4: who the top proponents and opponents are", "results/figure4_small/figure4.md",
     "results/figure4_small/figure4.json", ["results/figure4_small/figure4.png", "results/figure4_small/figure4_classes.png"],
     "python -m engine figure4 --run runs/small --scores results/lds_small/scores/magic.npz --out results/figure4_small"),
    ("The previous `cpu` default (3,000 steps, lr 2.5e-4, Adam eps 1e-2, no positional maps; its run as screened): methods against retraining, protocol A",
     "results/comparison_cpu_lr2.5e-4_eps1e-2.md", "results/comparison_cpu_lr2.5e-4_eps1e-2.json",
     ["results/comparison_cpu_lr2.5e-4_eps1e-2.png", "results/lds_cpu_lr2.5e-4_eps1e-2/reports/magic_A.png"],
     "python -m engine compare --run runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2/run "
     "--out results/lds_cpu_lr2.5e-4_eps1e-2 --protocols A --method magic,magic_precomputed,trak,dtrak,ltrak,trak_ens,dtrak_ens,pixel,feature,random "
     "--report results/comparison_cpu_lr2.5e-4_eps1e-2 --jobs 2"),
    ("The previous `cpu` default: Figure 2 on its run as screened", "results/figure2_cpu_lr2.5e-4_eps1e-2/figure2.md",
     "results/figure2_cpu_lr2.5e-4_eps1e-2/figure2.json", ["results/figure2_cpu_lr2.5e-4_eps1e-2/figure2.png"],
     "python -m engine figure2 --run runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2/run "
     "--out results/figure2_cpu_lr2.5e-4_eps1e-2"),
    ("Sample quality: the earlier 600-step `cpu` against the 3,000-step previous default", "results/sample_quality_cpu_lr2.5e-4_eps1e-2/sample_quality.md",
     "results/sample_quality_cpu_lr2.5e-4_eps1e-2/sample_quality.json",
     ["results/sample_quality_cpu_lr2.5e-4_eps1e-2/cpu_66ab7878_pc.png"],
     "python experiments/sample_quality.py --run runs/cpu --run runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2/run "
     "--samplers sde,pc,ode --out results/sample_quality_cpu_lr2.5e-4_eps1e-2"),
    ("The previous `cpu` default: Figure 4", "results/figure4_cpu_lr2.5e-4_eps1e-2/figure4.md",
     "results/figure4_cpu_lr2.5e-4_eps1e-2/figure4.json",
     ["results/figure4_cpu_lr2.5e-4_eps1e-2/figure4.png", "results/figure4_cpu_lr2.5e-4_eps1e-2/figure4_classes.png"],
     "python -m engine figure4 --run runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2/run "
     "--scores results/lds_cpu_lr2.5e-4_eps1e-2/scores/magic.npz --out results/figure4_cpu_lr2.5e-4_eps1e-2"),
    ("The `cpu` default: its shipped basis against exact MAGIC", "results/precompute_cpu/fidelity.md",
     "results/precompute_cpu/fidelity.json", ["results/precompute_cpu/fidelity.png"],
     "python experiments/precompute_fidelity.py --run runs/cpu --reps basis64 --ranks 4,8,16,32 --n-test 8 "
     "--bank results/lds_cpu_positional_x10 --exact-from results/lds_cpu_positional_x10/scores/magic.npz "
     "--lds-images --jobs 2 --out results/precompute_cpu"),
    ("The `cpu` default: how its basis fits a new query (ridge, leave-one-out, references)", "results/basis_fit_cpu/fit.md",
     "results/basis_fit_cpu/fit.json", ["results/basis_fit_cpu/fit.png"],
     "python experiments/basis_fit.py --out results/basis_fit_cpu"),
    ("The `cpu` default: a partly finished exact replay, alone and refining the preview", "results/partial_replay_cpu/partial_replay.md",
     "results/partial_replay_cpu/partial_replay.json", [],
     "python experiments/partial_replay.py --run runs/cpu --out results/partial_replay_cpu"),
    ("The `cpu` default: a partly finished exact replay on drawn digits", "results/partial_replay_cpu_drawn/partial_replay.md",
     "results/partial_replay_cpu_drawn/partial_replay.json", [],
     "python experiments/partial_replay.py --run runs/cpu --drawn --out results/partial_replay_cpu_drawn"),
    ("The x5 default (positional maps x5, config d8d40f86, the `cpu` default before x10): methods against retraining, protocol A",
     "results/comparison_cpu_positional_x5.md", "results/comparison_cpu_positional_x5.json",
     ["results/comparison_cpu_positional_x5.png", "results/lds_cpu_positional_x5/reports/magic_A.png"],
     f"python -m engine compare --run {X5} --out results/lds_cpu_positional_x5 --protocols A "
     "--method magic,magic_precomputed,trak,dtrak,ltrak,trak_ens,dtrak_ens,pixel,feature,random "
     "--report results/comparison_cpu_positional_x5 --jobs 2"),
    ("The `cpu` default (positional maps x10; its run as screened): methods against retraining, protocol A",
     "results/comparison_cpu_positional_x10.md", "results/comparison_cpu_positional_x10.json",
     ["results/comparison_cpu_positional_x10.png", "results/lds_cpu_positional_x10/reports/magic_A.png"],
     f"python -m engine compare --run {X10} --out results/lds_cpu_positional_x10 --protocols A "
     "--method magic,trak,dtrak,ltrak,pixel,feature,random --report results/comparison_cpu_positional_x10 --jobs 2"),
    ("The x5 default: Figure 2 on its run as screened", "results/figure2_cpu_positional_x5/figure2.md",
     "results/figure2_cpu_positional_x5/figure2.json", ["results/figure2_cpu_positional_x5/figure2.png"],
     f"python -m engine figure2 --run {X5} --out results/figure2_cpu_positional_x5"),
    ("Positional maps against the preview: how much of a query's gradient a 64-image basis spans, seven `cpu` variants",
     "results/basis_coverage/coverage.md", "results/basis_coverage/coverage.json", [],
     "python experiments/basis_coverage.py --runs runs/cpu," + ",".join(f"{CANDIDATE}{v}/run" for v in COVERAGE_VARIANTS)
     + " --out results/basis_coverage"),
    ("The `cpu` default: how much of a query's gradient larger bases span (more replays, or chosen vectors)",
     "results/basis_coverage_size/coverage.md", "results/basis_coverage_size/coverage.json", [],
     "python experiments/basis_coverage.py --runs runs/cpu --k 32 --sizes 64,128,256,320 --principal 64 "
     "--out results/basis_coverage_size"),
    *[(f"Figure 2 with positional maps {v[len('___positional_'):].replace('_', ' ')}",
       f"results/figure2_cpu_positional_{v[len('___positional_'):]}/figure2.md",
       f"results/figure2_cpu_positional_{v[len('___positional_'):]}/figure2.json",
       [f"results/figure2_cpu_positional_{v[len('___positional_'):]}/figure2.png"],
       f"python -m engine figure2 --run {CANDIDATE}{v}/run --out results/figure2_cpu_positional_{v[len('___positional_'):]}")
      for v in COVERAGE_VARIANTS[1:]],
    ("The x5 default: Figure 4 (on its run as screened)", "results/figure4_cpu_positional_x5/figure4.md",
     "results/figure4_cpu_positional_x5/figure4.json",
     ["results/figure4_cpu_positional_x5/figure4.png", "results/figure4_cpu_positional_x5/figure4_classes.png"],
     f"python -m engine figure4 --run {X5} --scores results/lds_cpu_positional_x5/scores/magic.npz "
     "--out results/figure4_cpu_positional_x5"),
    ("The `cpu` default (x10): Figure 4 (on its run as screened)", "results/figure4_cpu_positional_x10/figure4.md",
     "results/figure4_cpu_positional_x10/figure4.json",
     ["results/figure4_cpu_positional_x10/figure4.png", "results/figure4_cpu_positional_x10/figure4_classes.png"],
     f"python -m engine figure4 --run {X10} --scores results/lds_cpu_positional_x10/scores/magic.npz "
     "--out results/figure4_cpu_positional_x10"),
    ("The `cpu` default (x10): Figure 2 on its training digits (on its run as screened)",
     "results/figure2_train_cpu_positional_x10/figure2.md", "results/figure2_train_cpu_positional_x10/figure2.json",
     ["results/figure2_train_cpu_positional_x10/figure2.png"],
     f"python -m engine figure2 --run {X10} --images train --out results/figure2_train_cpu_positional_x10"),
    *[(f"The `cpu` default (x10): Figure 2 with averages of {k} digits (on its run as screened)",
       f"results/figure2_cpu_positional_x10_k{k}/figure2.md", f"results/figure2_cpu_positional_x10_k{k}/figure2.json", [],
       f"python -m engine figure2 --run {X10} --k-avg {k} --out results/figure2_cpu_positional_x10_k{k}") for k in (2, 8)],
    ("The `cpu` default (x10): rotated digits by angle (on its run as screened)",
     "results/rotation_angles_cpu_positional_x10/rotation_angles.md",
     "results/rotation_angles_cpu_positional_x10/rotation_angles.json", [],
     f"python experiments/rotation_angles.py --run {X10} --out results/rotation_angles_cpu_positional_x10"),
    ("The same on its training digits", "results/rotation_angles_train_cpu_positional_x10/rotation_angles.md",
     "results/rotation_angles_train_cpu_positional_x10/rotation_angles.json", [],
     f"python experiments/rotation_angles.py --run {X10} --images train --out results/rotation_angles_train_cpu_positional_x10"),
    ("Training hyperparameters against metagradient smoothness", "results/grid_small/grid.md",
     "results/grid_small/grid.json", [], "python experiments/grid_smoothness.py --out results/grid_small"),
    ("Which training makes a default worth exploring: candidates around `cpu`",
     "results/default_candidates/candidates.md", "results/default_candidates/candidates.json", [],
     "python experiments/default_candidates.py --only NAME --stages STAGES"),
    ("Exact bits/dim: cost against the alternatives, on an Intel Xeon (previous default)", "results/bench_likelihood.txt", None, [],
     "python benchmarks/bench_likelihood.py --run runs/cpu --out results/bench_likelihood.txt"),
    ("The same on the default, on an AMD EPYC (what `make bench` writes)", "results/bench_likelihood_epyc.txt", None, [],
     "python benchmarks/bench_likelihood.py --run runs/cpu --out results/bench_likelihood_epyc.txt"),
    ("The exact BPD's gradient against an earlier score network, in one process", "results/bench_engine_ab_cpu.txt", None, [],
     "python benchmarks/bench_engine_ab.py --run runs/cpu --against 609dee9 --repeats 5 --out results/bench_engine_ab_cpu.txt"),
    ("The likelihood grid against dopri5", "results/grid_error.txt", None, [],
     "python benchmarks/grid_error.py --run runs/small --out results/grid_error.txt"),
    ("The likelihood grid against dopri5 on the `cpu` default", "results/grid_error_cpu.txt", None, [],
     "python benchmarks/grid_error.py --run runs/cpu --out results/grid_error_cpu.txt"),
    ("The cost of MAGIC against training", "results/bench_metagrad.txt", None, [],
     "python benchmarks/bench_metagrad.py --preset small --steps 100 --queries 8 --out results/bench_metagrad.txt"),
    ("The `cpu` default: one query's metagradient, stored states against a segment's graphs kept", "results/bench_metagrad_cpu.txt", None, [],
     "python benchmarks/bench_metagrad.py --preset cpu --stages segment1,sqrt1 --out results/bench_metagrad_cpu.txt"),
    ("Where a metagradient step's time goes", "results/bench_pullback.txt", None, [],
     "python benchmarks/bench_pullback.py --out results/bench_pullback.txt"),
    ("The same on `cpu`, one thread (a replay chunk's setting)", "results/bench_pullback_cpu.txt", None, [],
     "python benchmarks/bench_pullback.py --preset cpu --threads 1 --reps 5 --out results/bench_pullback_cpu.txt"),
    ("App latency (AppTest)", "results/bench_app.txt", None, [],
     "python benchmarks/bench_app.py --run runs/cpu --out results/bench_app.txt"),
    ("The app on a fresh clone (headless Chromium): a stroke's influences", "results/bench_app_browser.txt", None,
     ["results/app/1_draw_influences.png", "results/app/4_galleries.png"],
     "python benchmarks/bench_app_browser.py --preset cpu --out results/bench_app_browser.txt --shots results/app"),
    ("The app: a visitor clicking through 5 test digits, one a second, until the last one's influences",
     "results/bench_app_picks.txt", None, [],
     "python benchmarks/bench_app_browser.py --run runs/cpu --strokes 0 --uploads 0 --picks 5 --no-exact "
     "--shots /tmp/shots_after --out results/bench_app_picks.txt"),
    ("The same before jobs were released: the app at 6e2cf6d, with this benchmark as of 9ed9570 (its +changes)",
     "results/bench_app_picks_6e2cf6d.txt", None, [],
     "python benchmarks/bench_app_browser.py --run runs/cpu --strokes 0 --uploads 0 --picks 5 --no-exact "
     "--out results/bench_app_picks_6e2cf6d.txt (in a checkout of 6e2cf6d)"),
    ("The app before its server stopped a full garbage collection after every rerun: a stroke, then its exact "
     "replay (the app at 11067eb)", "results/bench_app_exact_11067eb.txt", None, [],
     "python benchmarks/bench_app_browser.py --run runs/cpu --strokes 1 --uploads 0 --picks 0 "
     "--shots /tmp/shots_gc_on --out results/bench_app_exact_11067eb.txt (in a checkout of 11067eb)"),
    ("The app's long jobs on 1 thread and on every core: the exact replay and a BPD with its gradient",
     "results/bench_lane_threads.txt", None, [],
     "python benchmarks/bench_lane_threads.py --run runs/cpu --out results/bench_lane_threads.txt"),
    ("The same on an Intel Xeon (another kind of CPU than the shipped file's)", "results/bench_app_browser_xeon.txt", None, [],
     "python benchmarks/bench_app_browser.py --preset cpu --out results/bench_app_browser_xeon.txt --shots /tmp/shots_xeon3"),
    ("GPU", "results/gpu.md", None, [], "scripts/gpu_check.sh --offline --out results/gpu.md"),
    ("The `gpu` recipe on the bundled images, on one GPU", "results/default_candidates_gpu/candidates.md",
     "results/default_candidates_gpu/candidates.json", [],
     "python experiments/default_candidates.py --base gpu --out results/default_candidates_gpu --only NAME"),
    ("Exact bits/dim against tangent inputs per network call, on one GPU", "results/bench_tangent_batch_h200.txt",
     None, [], "python benchmarks/bench_tangent_batch.py --out results/bench_tangent_batch_h200.txt"),
    ("The same on 2 CPU cores (`cpu` network)", "results/bench_tangent_batch_cpu.txt", None, [],
     "python benchmarks/bench_tangent_batch.py --preset cpu --device cpu --images 2 --steps 8 "
     "--out results/bench_tangent_batch_cpu.txt"),
]


def stage_stamps(meta: dict) -> set[tuple[str, str]]:
    """(command, commit) of every stage of a report made by several invocations, each stage
    stamped with its own `by` (experiments/default_candidates.py); empty for a one-command report,
    whose top-level stamp is then the whole story."""
    results = meta.get("results")
    if not isinstance(results, dict):
        return set()
    return {(st["by"]["command"], st["by"]["commit"]) for r in results.values() if isinstance(r, dict)
            for st in r.values() if isinstance(st, dict) and isinstance(st.get("by"), dict)}


def section(title: str, report: str, meta: str | None, images: list[str], how: str) -> list[str]:
    out = [f"## {title}", ""]
    path = ROOT / report
    if not path.is_file():
        return out + [f"Not made yet: `{how}`.", ""]
    made = None
    if meta and (ROOT / meta).is_file():
        m = json.loads((ROOT / meta).read_text())
        stamps = stage_stamps(m)
        if stamps:
            made = (f"Made stage by stage by `{' '.join(m['command'].split()[:2])}`: {len(stamps)} invocations, at "
                    f"commits {', '.join(sorted({c for _, c in stamps}))}; each cell's command and commit are "
                    f"its stage's `by` in `{meta}`.")
        elif "command" in m:
            made = f"Made by `{m['command']}` at commit {m['commit']}" + (
                f" (run config {m['run_digest'][:12]})" if "run_digest" in m else "") + "."
    text = path.read_text().rstrip()
    head = text.splitlines()[:3]
    if made is None and head and head[0].startswith("# python "):
        made = f"Made by `{head[0][2:]}`."
    # a markdown report whose stamp is its first paragraph under the title (results/gpu.md)
    stamps = [m for m in (re.fullmatch(r"`(python [^`]+)` at commit (.+)", line) for line in head[1:]) if m]
    if made is None and stamps:
        made = f"Made by `{stamps[0].group(1)}` at commit {stamps[0].group(2)}."
    out += [made or f"Made by `{how}` (this file predates results that record their command and commit).", ""]
    if path.suffix == ".md":
        out += [line.replace("# ", "### ", 1) if line.startswith("# ") else line for line in text.splitlines()]
    else:
        out += ["```", text, "```"]
    out += [""] + [f"![{Path(i).stem}]({i})" for i in images if (ROOT / i).is_file()] + [""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="write here (default: stdout)")
    a = ap.parse_args()
    lines = ["# Results", "", "Generated by `python scripts/results_md.py --out RESULTS.md` from the files under "
             "`results/`; each section names the command that made its numbers. `make results` remakes those of the "
             "`cpu` and `small` presets' own runs; the others (made on candidate runs, the current default's own included, on another machine, or at a named earlier commit) "
             "are remade by the command their section names. Reports made on `runs/cpu` before the `cpu` preset got its "
             "positional maps name run config 66ab7878 or a 66,161-parameter net (the default before them); those made on it "
             "with positional maps x5 name config d8d40f86; today's `cpu` (maps x10) is config 7f746953, 88,113 parameters.", ""]
    for s in SECTIONS:
        lines += section(*s)
    text = "\n".join(lines).rstrip() + "\n"
    if a.out:
        from engine import atomic
        atomic.save_text(text, Path(a.out))
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
