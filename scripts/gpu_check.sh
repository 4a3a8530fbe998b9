#!/usr/bin/env bash
# Check and time everything GPU-related in one call (see benchmarks/gpu_check.py):
#   scripts/gpu_check.sh [--dry-run] [--steps 200] [--queries 8] [--out results/gpu.md]
# Uses the repository's .venv when there is one, else python3 with torch already installed
# (GPU machines may have no internet, so nothing is installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_check.py "$@"
