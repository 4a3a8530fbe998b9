# The two commands of the README's quick start live here, with the setup they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/cpu
# the default's shipped basis against exact MAGIC and retraining (its LDS bank): in `report` and `results`
FIDELITY_CPU = $(BIN)/python experiments/precompute_fidelity.py --run $(RUN) --reps basis64 --ranks 4,8,16,32 --n-test 8 \
	--bank results/lds_cpu_positional_x10 --exact-from results/lds_cpu_positional_x10/scores/magic.npz --lds-images --jobs 2 \
	--out results/precompute_cpu

.PHONY: setup app report test bench results ship clean

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(BIN)/.installed-ray: $(BIN)/.installed requirements-ray.txt
	$(BIN)/pip install -q -r requirements-ray.txt
	touch $@

setup: $(BIN)/.installed

# Main job: train the `cpu` preset once (resumes if interrupted), then serve the app on it.
# The app precomputes its galleries in the background and keeps every result in runs/cache.
app: setup
	$(BIN)/python -m engine train --preset cpu --out $(RUN) --replace-other
	APP_RUN=$(RUN) $(BIN)/python -m streamlit run app.py --server.headless true --browser.gatherUsageStats false

# The default model's representation shipped in shipped/cpu/ (a 64-image query basis; hours on
# 2 cores, resumable: see README, Presets): the app installs it at start and checks it against the trained weights;
# then the galleries made from it (shipped/cpu/galleries/, 2 min), which the app takes when everything they depend on matches.
ship: setup
	$(BIN)/python -m engine train --preset cpu --out $(RUN) --replace-other
	$(BIN)/python -m engine precompute --run $(RUN) --method basis --rank 64 --jobs 2 --ship
	$(BIN)/python -m webapp.shipped_galleries --run $(RUN)

# The Figure 2 reports on the `cpu` preset, on test digits and on its training digits (the seed's
# protocol): each resumable; the second took 23 min on 2 cores.
report: setup
	$(BIN)/python -m engine train --preset cpu --out $(RUN) --replace-other
	$(BIN)/python -m engine figure2 --run $(RUN) --out results/figure2
	$(BIN)/python -m engine figure2 --run $(RUN) --images train --out results/figure2_train
	$(FIDELITY_CPU)

# The tests also install the Ray extra: both executors are tested.
test: setup $(BIN)/.installed-ray
	$(BIN)/python -m pytest

# The benchmarks (each prints ratios against a baseline run in the same process).
bench: setup
	$(BIN)/python -m engine train --preset cpu --out $(RUN) --replace-other
	$(BIN)/python -m engine train --preset small --out runs/small --replace-other
	$(BIN)/python benchmarks/bench_likelihood.py --run $(RUN) --out results/bench_likelihood_epyc.txt
	$(BIN)/python benchmarks/grid_error.py --run runs/small --out results/grid_error.txt
	$(BIN)/python benchmarks/grid_error.py --run $(RUN) --out results/grid_error_cpu.txt
	$(BIN)/python benchmarks/bench_metagrad.py --preset small --steps 100 --queries 8 --out results/bench_metagrad.txt
	$(BIN)/python benchmarks/bench_pullback.py --out results/bench_pullback.txt
	$(BIN)/python benchmarks/bench_app.py --run $(RUN) --out results/bench_app.txt
	$(BIN)/python benchmarks/bench_app_browser.py --preset cpu --out results/bench_app_browser.txt --shots results/app
	$(BIN)/python benchmarks/bench_app_browser.py --run $(RUN) --strokes 0 --uploads 0 --picks 5 --no-exact --shots /tmp/shots_picks --out results/bench_app_picks.txt
	$(BIN)/python benchmarks/bench_lane_threads.py --run $(RUN) --out results/bench_lane_threads.txt
	$(BIN)/python benchmarks/bench_precompute.py --run $(RUN) --out results/bench_precompute_cpu.txt
	$(BIN)/python benchmarks/bench_precompute.py --run runs/small --out results/bench_precompute.txt
	$(BIN)/python benchmarks/bench_tangent_batch.py --preset cpu --device cpu --images 2 --steps 8 --out results/bench_tangent_batch_cpu.txt

# Every file under results/ and RESULTS.md, by the commands that make them. Resumable: every step
# keeps what it finished (retrains, score files, precompute chunks) and skips it on a rerun. On 2 CPU
# cores, with the committed retraining banks: about 10 hours (the comparison's MAGIC, query-agnostic
# MAGIC and TRAK ensembles, the precomputes, of which the exact J of `small` is about 3.2 h, Figure 2,
# the default's basis against exact MAGIC, 40 min; on the default with positional maps, rotated digits
# 6 min each, Figure 2 with 2 and 8 digits averaged 9 min, on training digits 4 min);
# from an empty results/ folder the banks add about 4 hours.
results: setup $(BIN)/.installed-ray
	$(BIN)/python -m engine train --preset small --out runs/small --replace-other
	$(BIN)/python -m engine train --preset cpu --out $(RUN) --replace-other
	$(BIN)/python -m engine compare --run runs/small --out results/lds_small --seeds 4 --jobs 2
	$(BIN)/python -m engine figure4 --run runs/small --scores results/lds_small/scores/magic.npz --out results/figure4_small
	$(BIN)/python -m engine precompute --run runs/small --method lowrank --rank 64 --jobs 2
	$(BIN)/python -m engine precompute --run runs/small --method basis --rank 64 --jobs 2
	$(BIN)/python -m engine precompute --run runs/small --method exact --jobs 2
	$(BIN)/python experiments/precompute_fidelity.py --run runs/small --reps lowrank64,basis64,exact --lds-images --jobs 2 --out results/precompute
	$(BIN)/python -m engine compare --run $(RUN) --out results/lds_cpu_positional_x10 --protocols A --method magic,magic_precomputed,trak,dtrak,ltrak,trak_ens,dtrak_ens,pixel,feature,random --report results/comparison_cpu_positional_x10 --jobs 2
	$(BIN)/python -m engine figure4 --run $(RUN) --scores results/lds_cpu_positional_x10/scores/magic.npz --out results/figure4_cpu_positional_x10
	$(BIN)/python -m engine figure2 --run $(RUN) --out results/figure2
	$(BIN)/python -m engine figure2 --run $(RUN) --images train --out results/figure2_train
	$(BIN)/python -m engine figure2 --run $(RUN) --k-avg 2 --out results/figure2_k2
	$(BIN)/python -m engine figure2 --run $(RUN) --k-avg 8 --out results/figure2_k8
	$(BIN)/python experiments/figure2_versus.py --base results/figure2_cpu600/figure2.json --new results/figure2/figure2.json --out results/figure2_versus_cpu600
	$(BIN)/python experiments/figure2_versus.py --base results/figure2_cpu600_k2/figure2.json --new results/figure2_k2/figure2.json --out results/figure2_versus_cpu600_k2
	$(BIN)/python experiments/figure2_versus.py --base results/figure2_cpu600_k8/figure2.json --new results/figure2_k8/figure2.json --out results/figure2_versus_cpu600_k8
	$(FIDELITY_CPU)
	$(BIN)/python experiments/basis_fit.py --run $(RUN) --out results/basis_fit_cpu
	$(BIN)/python experiments/partial_replay.py --run $(RUN) --out results/partial_replay_cpu
	$(BIN)/python experiments/partial_replay.py --run $(RUN) --drawn --out results/partial_replay_cpu_drawn
	$(BIN)/python experiments/grid_smoothness.py --out results/grid_small
	$(BIN)/python experiments/cpu_rounding.py --run $(RUN) --out results/cpu_rounding
	$(BIN)/python -m engine sample --run $(RUN) --out results/samples_cpu.png --n 64
	$(BIN)/python experiments/sample_quality.py --run $(RUN) --samplers sde,pc,ode --out results/sample_quality
	$(BIN)/python experiments/sample_quality.py --run $(RUN) --samplers sde,pc --steps 4000 --out results/sample_quality_cpu_4000
	$(BIN)/python experiments/rotation_angles.py --run $(RUN) --out results/rotation_angles
	$(BIN)/python experiments/rotation_angles.py --run $(RUN) --images train --out results/rotation_angles_train
	$(BIN)/python experiments/photo_uploads.py --out results/photo_uploads
	$(MAKE) bench
	$(BIN)/python scripts/results_md.py --out RESULTS.md

clean:
	rm -rf $(VENV) runs
