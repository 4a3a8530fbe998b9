# The two commands of the README's quick start live here, with the setup they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/cpu

.PHONY: setup report test bench clean

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

setup: $(BIN)/.installed

# Main job: train the `cpu` preset once (resumes if interrupted), then the Figure 2 report.
report: setup
	$(BIN)/python -m engine train --preset cpu --out $(RUN)
	$(BIN)/python -m engine figure2 --run $(RUN) --out results/figure2

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_likelihood.py

clean:
	rm -rf $(VENV) runs
