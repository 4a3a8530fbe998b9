# The two commands of the README's quick start live here, with the setup they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/cpu

.PHONY: setup app report test bench clean

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
	$(BIN)/python -m engine train --preset cpu --out $(RUN)
	APP_RUN=$(RUN) $(BIN)/python -m streamlit run app.py --server.headless true --browser.gatherUsageStats false

# The Figure 2 report on the `cpu` preset (about 40 min on 2 cores; resumable).
report: setup
	$(BIN)/python -m engine train --preset cpu --out $(RUN)
	$(BIN)/python -m engine figure2 --run $(RUN) --out results/figure2

# The tests also install the Ray extra: both executors are tested.
test: setup $(BIN)/.installed-ray
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_likelihood.py
	$(BIN)/python benchmarks/bench_metagrad.py --preset small --out results/bench_metagrad.txt

clean:
	rm -rf $(VENV) runs
