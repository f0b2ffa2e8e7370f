#!/usr/bin/env bash
# The CPU benchmark suite: small configs, CPU providers only (CUDA hidden), every bench/bench_*.py.
# Writes bench/results/<device>-<date>-<rev>.json and regenerates bench/RESULTS.md.
#   bench/run_cpu.sh                 # the whole suite
#   bench/run_cpu.sh -k layer_norm   # extra arguments go to pytest
# PYTHON picks the interpreter (default: python). These are CPU timings: never report them as GPU results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES=""   # a CPU run even on a GPU machine
export WF_BENCH_DEVICE=cpu
export WF_BENCH_COMMAND="bench/run_cpu.sh${*:+ $*}"
slug=$("$PY" -c "from bench.common import device_slug; print(device_slug())")
rev=$("$PY" -c "from bench.common import git_revision; print(git_revision())")
export WF_GIT_REV="$rev"   # the revision at the start, in the file name and in the JSON alike
out="bench/results/${slug}-$(date -u +%Y%m%d-%H%M)-${rev}.json"
mkdir -p bench/results
echo "run_cpu: writing $out"
rc=0
"$PY" -m pytest bench -q -p no:cacheprovider --benchmark-json "$out" --benchmark-columns=min,median,rounds "$@" || rc=$?
[ -f "$out" ] && "$PY" bench/make_table.py
exit $rc
