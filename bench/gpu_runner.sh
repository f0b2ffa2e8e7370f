#!/usr/bin/env bash
# GPU runner: on a machine with an NVIDIA GPU, PyTorch, Triton, nvcc and ninja but no package registry,
# install wuerstchen_fast from this working tree, build its extension for the local GPU, run the test
# suite on CUDA, then the benchmarks; JSON, junit XML and a log go to the output folder.
#
#   bench/gpu_runner.sh --out DIR [options]
#     --out DIR          output folder (created): gpu_runner.log, tests-junit.xml, <device>-<date>-<rev>.json
#     --dry-run          print every step, run none of the expensive ones (install, build, tests, benchmarks)
#     --wheels DIR       wheels of missing pure-Python packages (default: wheels/, made by bench/prepare_wheels.sh)
#     --python PY        interpreter that holds torch (default: python3)
#     --arch LIST        TORCH_CUDA_ARCH_LIST (default: the local GPU's compute capability, e.g. 9.0)
#     --rev REV          git revision to record when the tree has no .git (default: git, else "unknown")
#     --tests "ARGS"     pytest arguments for the test step (default: tests)
#     --bench "ARGS"     pytest arguments for the benchmark step (default: bench)
#     --skip-install --skip-build --skip-tests --skip-bench   leave a step out
# Exit status: 0 when every step that ran passed, 1 when one failed (later steps still run), 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="" DRY=0 WHEELS=wheels PY=python3 ARCH="" REV="" TESTS="tests" BENCH="bench"
SKIP_INSTALL=0 SKIP_BUILD=0 SKIP_TESTS=0 SKIP_BENCH=0

usage() { awk 'NR > 5 && /^#/ { sub(/^# ?/, ""); print; next } NR > 5 { exit }' "$0"; }
die() { echo "gpu_runner: $*" >&2; echo "usage:" >&2; usage >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) need "$@"; OUT=$2; shift 2 ;;
    --wheels) need "$@"; WHEELS=$2; shift 2 ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --arch) need "$@"; ARCH=$2; shift 2 ;;
    --rev) need "$@"; REV=$2; shift 2 ;;
    --tests) need "$@"; TESTS=$2; shift 2 ;;
    --bench) need "$@"; BENCH=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[ -n "$OUT" ] || die "--out DIR is required"
if [ -n "$ARCH" ] && ! [[ "$ARCH" =~ ^[0-9]+\.[0-9]+a?(\+PTX)?([\;\ ][0-9]+\.[0-9]+a?(\+PTX)?)*$ ]]; then
  die "--arch '$ARCH' is not a TORCH_CUDA_ARCH_LIST such as 9.0 or '8.0;9.0'"
fi
if [ "$DRY" = 0 ] && [ "$SKIP_INSTALL" = 0 ] && [ ! -d "$WHEELS" ]; then
  die "wheels folder '$WHEELS' does not exist: run bench/prepare_wheels.sh where pip reaches a registry, carry wheels/ along, or pass --skip-install"
fi

mkdir -p "$OUT" || die "cannot create --out '$OUT'"
LOG="$OUT/gpu_runner.log"
: >"$LOG"
FAILED=()
say() { echo "$*" | tee -a "$LOG"; }

# step NAME CMD... : print the command; run it unless --dry-run; record a failure and go on.
step() {
  local name=$1; shift
  say "==> [$name] $*"
  if [ "$DRY" = 1 ]; then say "    (dry run: not run)"; return 0; fi
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "<== [$name] exit $rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
  return 0
}

say "gpu_runner: out=$OUT dry_run=$DRY python=$PY wheels=$WHEELS"
# Cheap facts, also in a dry run: what machine and toolchain this is.
step env sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'no nvidia-smi'; \
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo 'no nvcc on PATH'; ninja --version || echo 'no ninja'; \
  $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available())'"

if [ -z "$ARCH" ]; then
  if [ "$DRY" = 1 ]; then ARCH="<local GPU capability>"; else
    ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) \
      || { say "gpu_runner: no CUDA GPU visible to torch; pass --arch to build anyway"; ARCH="8.0;9.0"; FAILED+=("gpu (none visible)"); }
  fi
fi
if [ -z "$REV" ]; then REV=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown); fi
export WF_GIT_REV="$REV" TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then  # the toolkit root: the folder whose lib64 holds libcudart
  root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  if compgen -G "$root/lib64/libcudart.so*" >/dev/null || compgen -G "$root/lib/libcudart.so*" >/dev/null; then
    export CUDA_HOME=$root
  fi
fi
say "gpu_runner: rev=$REV TORCH_CUDA_ARCH_LIST=$ARCH CUDA_HOME=${CUDA_HOME:-unset}"

if [ "$SKIP_INSTALL" = 0 ]; then
  shopt -s nullglob; whl=("$WHEELS"/*.whl); shopt -u nullglob
  if [ "$DRY" = 1 ] && [ ${#whl[@]} = 0 ]; then whl=("$WHEELS/*.whl"); fi
  if [ ${#whl[@]} -gt 0 ]; then
    step install-wheels "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir "${whl[@]}"
  else
    say "gpu_runner: no wheels in $WHEELS: assuming every dependency is installed"
  fi
fi
if [ "$SKIP_BUILD" = 0 ]; then
  # Editable: the extension is built in place, so tests run against this tree's sources and its _C.
  step build "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -e .
  step info "$PY" -m wuerstchen_fast.info
fi
if [ "$SKIP_TESTS" = 0 ]; then
  # shellcheck disable=SC2086  # TESTS holds several pytest arguments on purpose
  step tests "$PY" -m pytest $TESTS -q -p no:cacheprovider --junitxml "$OUT/tests-junit.xml"
fi
if [ "$SKIP_BENCH" = 0 ]; then
  if [ "$DRY" = 1 ]; then slug="<device>"; else
    slug=$("$PY" -c "from bench.common import device_slug; print(device_slug())" 2>/dev/null || echo gpu)
  fi
  json="$OUT/${slug}-$(date -u +%Y%m%d-%H%M)-${REV}.json"
  export WF_BENCH_COMMAND="bench/gpu_runner.sh --bench \"$BENCH\""
  # shellcheck disable=SC2086
  step bench "$PY" -m pytest $BENCH -q -p no:cacheprovider --benchmark-json "$json" --benchmark-columns=min,median,rounds
  say "gpu_runner: results in $json; copy it to bench/results/ and run python bench/make_table.py"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  say "gpu_runner: FAILED: ${FAILED[*]}"
  exit 1
fi
say "gpu_runner: all steps passed"
exit 0
