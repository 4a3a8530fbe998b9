#!/usr/bin/env bash
# Everything GPU-related in one call:
#   scripts/gpu_all.sh OUTDIR [--dry-run]
# writes, each part under its own time limit (GPU_ALL_LIMIT seconds, 240) and a failed part not
# stopping the next:
#   OUTDIR/gpu.md                       scripts/gpu_check.sh --offline: determinism, a training step,
#                                       exact BPD, the metagradient's cost ratios (results/gpu.md)
#   OUTDIR/bench_tangent_batch_gpu.txt  exact BPD against tangent inputs per network call, `gpu` net
#   OUTDIR/bench_likelihood_gpu.txt     exact BPD through ScoreNet.jacobian_diagonal against
#                                       whole-image tangents and the other methods, `gpu` net
#   OUTDIR/log.txt                      each part's exit status and seconds
# Exit status 0 only if every part succeeded. --dry-run: tiny sizes on the CPU, a rehearsal
# (tests/test_gpu_check.py), so that the GPU call is not the script's first run.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ "${1#-}" != "$1" ]; then
  echo "error: usage: scripts/gpu_all.sh OUTDIR [--dry-run]" >&2
  exit 2
fi
OUT=$1
DRY=0
case "${2:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "error: unknown option ${2}; usage: scripts/gpu_all.sh OUTDIR [--dry-run]" >&2; exit 2 ;;
esac
PY="${PY:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
LIMIT="${GPU_ALL_LIMIT:-240}"
mkdir -p "$OUT" || exit 2
: > "$OUT/log.txt"
status=0
part() {  # part NAME COMMAND...: run it under the time limit, log how it ended
  local name=$1 t0=$SECONDS rc
  shift
  timeout "$LIMIT" "$@"
  rc=$?
  echo "$name: exit $rc$([ $rc = 124 ] && echo ' (over the time limit)'), $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  [ $rc = 0 ] || status=1
}
if [ $DRY = 1 ]; then
  part gpu_check "$PY" benchmarks/gpu_check.py --dry-run --queries 2 --out "$OUT/gpu.md"
  part bench_tangent_batch "$PY" benchmarks/bench_tangent_batch.py --preset tiny --device cpu --images 1 --steps 1 \
    --chunks 98,196 --out "$OUT/bench_tangent_batch_gpu.txt"
  part bench_likelihood "$PY" benchmarks/bench_likelihood.py --preset tiny --device cpu --batch 2 \
    --out "$OUT/bench_likelihood_gpu.txt"
else
  part gpu_check "$PY" benchmarks/gpu_check.py --offline --out "$OUT/gpu.md"
  part bench_tangent_batch "$PY" benchmarks/bench_tangent_batch.py --preset gpu --device cuda \
    --out "$OUT/bench_tangent_batch_gpu.txt"
  part bench_likelihood "$PY" benchmarks/bench_likelihood.py --preset gpu --device cuda \
    --out "$OUT/bench_likelihood_gpu.txt"
fi
exit $status
