#!/usr/bin/env bash
# GPU check: one command that fits one 10-minute call on a GPU machine (NVIDIA H200, 16 cores, torch and
# Triton preinstalled, no package registry) and leaves the results of every stage that finished.
#
#   bench/gpu_check.sh --out DIR [options]
#     --out DIR        output folder (created; at most 8 files, none in subfolders): gpu_check.log,
#                      summary.json, tests-junit.xml, <device>-<date>-<rev>.json (headline benchmarks),
#                      <device>-<date>-<rev>-compile.json, tune-cache.json, logs.tar.gz
#     --dry-run        print the plan (stages, budgets, commands) and run nothing
#     --rehearse       the same stages on this machine's CPU at tiny shapes (what CI runs)
#     --only LIST      run only these stages (comma-separated), e.g. --only tests,bench for a rerun
#     --python PY      interpreter that holds torch (default: python3)
#     --wheels DIR     wheels of the packages the image lacks (default: wheels/, see bench/prepare_wheels.sh)
#     --arch LIST      TORCH_CUDA_ARCH_LIST for the build (default: the local GPU's capability, e.g. 9.0)
#     --rev REV        git revision to record when the tree has no .git (default: git, else "unknown")
# Exit status: 0 when every stage that ran passed (the optional compile stage may time out), 1 when
# a stage failed or ran out of time, 2 for bad arguments.
#
# Stages, each under `timeout` with its own budget, each recording its result in summary.json as it ends
# (a stage cut off by its budget leaves every earlier one). Budgets on the GPU, in seconds, and where each
# number comes from: measured on the 2-core development machine, then scaled as said. That machine was
# shared and heavily loaded while measuring, so CPU time (user + sys of one process) is used, not wall time.
#   env      25  nvidia-smi, versions, the copy and bf16-matmul ceilings. Measured: a python that imports torch
#                and bench.common, 2.8 s of CPU. On the H200 the ceilings are 20 copies of 1 GiB (0.5 ms each
#                at 4.3 TB/s) and 20 bf16 8192^3 matmuls (1.4 ms each at 790 TFLOP/s), under 1 s with warm-up;
#                CUDA's start 1-3 s: ~8 s expected, x3 for a cold disk cache on a fresh machine.
#   wheels   10  pip install --no-index --no-deps --target of the 4 wheels (8.3 MiB): 0.6 s measured, and one
#                python that imports diffusers and open_clip (~3 s).
#   build    90  the extension for the local arch only, MAX_JOBS = all cores. Measured, one unit at a time, for
#                sm_90 alone: 9 translation units, 360 s of CPU together, 34-49 s each (the heaviest csrc/ops.cpp
#                at 49 s user + 2 s sys; the four .cu files 34-43 s). With 16 cores ninja runs all 9 at once, so
#                the wall time is the longest unit, ~51 s if a core there is as fast as one here, plus linking and
#                setup.py's start (~8 s): ~60 s, x1.5 for a slower core. A rerun on a warm machine finds _C
#                current and skips the compile.
#   verify   75  python -m wuerstchen_fast.tune --check-only at the released v2 shapes in fp32, bf16 and fp16
#                (and Stable Cascade's where tune knows them). Measured: Triton compiles one kernel for sm_90 in
#                0.28 s of CPU (Triton 3.6: 158 compiles, 79 kernels x sm_80/sm_90, 44 s, through
#                testing/triton_aot.py). ~40 forward kernels x 3 dtypes = 34 s; 3 process starts (~5 s each with
#                CUDA's); one reference/kernel pair per op x backend, milliseconds on the GPU: ~55 s.
#   tests   160  the cuda-marked tests and the kernel families' tests, on the GPU, one test per family and
#                backend first (bench/gpu_check_plugin.py), 60 s per test at most. 751 tests are selected (608
#                collected here + 143 marked cuda); on the GPU a test costs its Triton compiles (0.28 s each new
#                specialization) plus milliseconds, so 751 x 0.28 = 210 s if none shared one: the stage stops
#                starting tests at budget - 20 s, and the family-first order means what ran covers every family.
#                The summary says how many did not run.
#   bench   150  Stage C step (v2, batch 2, bf16): diffusers eager, ours auto, ours auto + CUDA graphs; sample()
#                1024x1024 at 60+12 steps for the same three; Stage B step (256x256 latent) and Stage A decode
#                (1024^2) for diffusers and auto; the memory-bound fused ops (ddpm_step, dwconv_ln, grn: eager,
#                triton, cuda); sample() at 29+12. A row is a first call, >= 2 warm-ups, 1 peak-memory call and
#                >= 3 timed rounds (WF_BENCH_BUDGET_S=0.3): 7 calls. FLOPs counted here (FlopCounterMode, v2
#                configs): Stage C step 2.31 TFLOP, Stage B step 2.86, Stage A decode 2.17; sample() 175 TFLOP at
#                60+12 (221 ms at 790 TFLOP/s), 103 at 29+12. At a pessimistic 11% of that rate (or
#                launch-bound), 2 s a 60+12 image: 3 rows x 7 calls = 42 s, plus one counted call; 29+12: 25 s;
#                the step, decode and op rows ~15 s; the v2 models built on the GPU ~20 s; Triton JIT at bf16
#                ~15 s; two python starts ~10 s: ~140 s.
#   compile  30  optional, last: diffusers' torch.compile recipe and ours compiled, on the Stage C step. Its
#                warm-up alone takes minutes, so it gets 30 s plus whatever the earlier stages left of the
#                540 s; a timeout there is expected and does not fail the check.
#   sum     540  = 9 minutes, inside one 10-minute device call; the machine's start (1-2 min) comes on top,
#                within the 15 minutes of device time, which leaves ~3 minutes to rerun a failed stage
#                (--only; on the still-warm machine the wheels and the build are found done).
set -uo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."
ROOT=$(pwd)

STAGES=(env wheels build verify tests bench compile)
declare -A BUDGET=([env]=25 [wheels]=10 [build]=90 [verify]=75 [tests]=160 [bench]=150 [compile]=30)
# --rehearse, on a CPU (CI): short budgets, and compile's is too short on purpose, so every run exercises
# the path of a stage cut off by its budget.
# Caps, not expectations: a shared, loaded CI machine must not fail it (most stages end far sooner).
declare -A REHEARSE_BUDGET=([env]=120 [wheels]=60 [build]=180 [verify]=120 [tests]=120 [bench]=240 [compile]=3)
TOTAL_BUDGET=540
OPTIONAL=" compile "

usage() { awk 'NR > 3 && /^#/ { sub(/^# ?/, ""); print; next } NR > 3 { exit }' "$SELF" | sed -n '1,/^Exit status/p'; }
die() { echo "gpu_check: $*" >&2; echo "usage:" >&2; usage >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"; }

# ------------------------------------------------------------------------------------------ one stage
# `gpu_check.sh __stage NAME` runs one stage's body in its own process, so that `timeout` can stop it
# (and everything it started) without stopping the script. Settings come in through the environment.
run() {  # print a command; run it unless this is a dry run
  echo "+ $*"
  [ "${WF_CHECK_DRY:-0}" = 1 ] && return 0
  "$@"
}

stage_env() {
  run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv || echo "gpu_check: no nvidia-smi (no NVIDIA driver here)"
  if [ "${WF_CHECK_DRY:-0}" = 0 ]; then
    { command -v nvcc >/dev/null && nvcc --version | tail -n 2; } || echo "no nvcc on PATH"
    ninja --version 2>/dev/null || echo "no ninja on PATH"
    echo "cpus: $(nproc)  machine: $(uname -m)"
  fi
  run "$PY" bench/gpu_check_report.py env --out "$WORK/env.json"
}

stage_wheels() {
  shopt -s nullglob; local whl=("$WHEELS"/*.whl); shopt -u nullglob
  if [ "${WF_CHECK_DRY:-0}" = 1 ] && [ ${#whl[@]} = 0 ]; then whl=("$WHEELS/*.whl"); fi
  [ ${#whl[@]} -gt 0 ] || { echo "gpu_check: no wheels in $WHEELS (bench/prepare_wheels.sh makes them)"; return 1; }
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}" \
    || return 1
  run "$PY" -m pip list -q --path "$SITE" --format freeze || return 1
  run "$PY" -c "$WHEELS_IMPORT"  # they import with the image's packages
}

stage_build() {
  local arch=$ARCH no_cuda=0
  if [ -z "$arch" ] && [ "${WF_CHECK_DRY:-0}" = 1 ]; then
    arch="<the GPU's capability, e.g. 9.0>"
  elif [ -z "$arch" ]; then
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) || arch=""
  fi
  if [ -z "$arch" ]; then
    [ "$REHEARSE" = 1 ] || { echo "gpu_check: no CUDA GPU visible to torch; pass --arch to build anyway"; return 1; }
    no_cuda=1  # rehearsal on a CPU: the CPU kernels only
  fi
  echo "gpu_check: TORCH_CUDA_ARCH_LIST=${arch:-none} MAX_JOBS=$JOBS CUDA_HOME=${CUDA_HOME:-unset}"
  # A rerun on a warm machine (or the rehearsal, on CI's fresh build) finds a current _C and skips the compile.
  local current=0
  run "$PY" bench/gpu_check_report.py build-current --out "$WORK/build.json" $([ "$no_cuda" = 1 ] || echo "--arch $arch") \
    && [ "${WF_CHECK_DRY:-0}" = 0 ] && current=1
  [ $current = 1 ] && return 0  # it also recorded the build facts
  WUERSTCHEN_FAST_NO_CUDA=$no_cuda TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$JOBS \
    run "$PY" setup.py -q build_ext --inplace || return 1
  run "$PY" bench/gpu_check_report.py build-info --out "$WORK/build.json" $([ "$no_cuda" = 1 ] || echo --expect-cuda)
}

stage_verify() {
  if [ ! -f wuerstchen_fast/tune.py ] && [ "${WF_CHECK_DRY:-0}" = 0 ]; then
    echo "gpu_check: wuerstchen_fast/tune.py does not exist in this tree: verification not available"
    return 3
  fi
  local rc=0 dt
  for dt in $VERIFY_DTYPES; do
    run "$PY" -m wuerstchen_fast.tune --check-only --device "$DEVICE" --dtype "$dt" $VERIFY_ARGS || rc=1
  done
  run "$PY" -m wuerstchen_fast.info || rc=1
  return $rc
}

stage_tests() {
  local files=() f
  for f in $TEST_FILES; do [ -f "$f" ] && files+=("$f"); done
  for f in tests/test_*.py; do grep -q "pytest.mark.cuda" "$f" && [[ " ${files[*]} " != *" $f "* ]] && files+=("$f"); done
  local deadline=$((STAGE_BUDGET - TEST_MARGIN)); [ $deadline -gt 5 ] || deadline=5
  run "$PY" -m pytest -p bench.gpu_check_plugin --wf-order families --wf-families "$FAMILIES" \
    --wf-deadline $deadline --wf-results "$WORK/tests.jsonl" --timeout "$TEST_TIMEOUT" --timeout-method signal \
    -q -rfE --junitxml "$OUT/tests-junit.xml" $TEST_SELECT "${files[@]}"
}

bench_ids() {  # the headline rows, most important first
  local e=${E2E_STEPS%% *} e2=${E2E_STEPS#* }
  echo "bench/bench_stages.py::test_stage_c_step[diffusers] bench/bench_stages.py::test_stage_c_step[auto]"
  echo "bench/bench_stages.py::test_stage_c_step[auto-cudagraphs]"
  echo "bench/bench_e2e.py::test_e2e_sample[$e-diffusers] bench/bench_e2e.py::test_e2e_sample[$e-auto]"
  echo "bench/bench_e2e.py::test_e2e_sample[$e-auto-cudagraphs]"
  echo "bench/bench_stages.py::test_stage_b_step[diffusers] bench/bench_stages.py::test_stage_b_step[auto]"
  echo "bench/bench_stages.py::test_stage_a_decode[diffusers] bench/bench_stages.py::test_stage_a_decode[auto]"
  # The memory-bound fused ops against the copy ceiling (eager, triton, cuda; compile rows are left out by -k).
  echo "bench/bench_ops_ddpm_mixing.py::test_ddpm_step bench/bench_ops_convnext.py::test_dwconv_ln"
  echo "bench/bench_ops_convnext.py::test_grn"
  if [ "$e2" != "$E2E_STEPS" ]; then
    echo "bench/bench_e2e.py::test_e2e_sample[$e2-diffusers] bench/bench_e2e.py::test_e2e_sample[$e2-auto]"
  fi
  # Stable Cascade at its released sizes (3.6B prior, 1.5B decoder): the forwards vs diffusers' StableCascadeUNet.
  echo "bench/bench_stable_cascade.py::test_forward[prior-diffusers] bench/bench_stable_cascade.py::test_forward[prior-auto]"
  echo "bench/bench_stable_cascade.py::test_forward[decoder-diffusers] bench/bench_stable_cascade.py::test_forward[decoder-auto]"
}

stage_bench() {
  local deadline=$((STAGE_BUDGET - BENCH_MARGIN)); [ $deadline -gt 5 ] || deadline=5
  # shellcheck disable=SC2046  # one node id per word
  WF_BENCH_COMMAND="bench/gpu_check.sh (bench stage)" \
    run "$PY" -m pytest -p bench.gpu_check_plugin --wf-deadline $deadline --wf-results "$WORK/bench.jsonl" \
    -q -p no:cacheprovider --benchmark-json "$OUT/$RESULT.json" --benchmark-columns=min,median,rounds \
    -k "not compile" $(bench_ids)
}

stage_compile() {
  WF_BENCH_COMMAND="bench/gpu_check.sh (compile stage)" \
    run "$PY" -m pytest -p bench.gpu_check_plugin --wf-results "$WORK/compile.jsonl" -q -p no:cacheprovider \
    --benchmark-json "$OUT/$RESULT-compile.json" --benchmark-columns=min,median,rounds \
    "bench/bench_stages.py::test_stage_c_step[diffusers]" "bench/bench_stages.py::test_stage_c_step[diffusers-compile]" \
    "bench/bench_stages.py::test_stage_c_step[auto-compile]"
}

if [ "${1:-}" = "__stage" ]; then
  "stage_$2"
  exit $?
fi

# ------------------------------------------------------------------------------------------ arguments
OUT="" DRY=0 REHEARSE=0 ONLY="" PY=python3 WHEELS=wheels ARCH="" REV=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) need "$@"; OUT=$2; shift 2 ;;
    --only) need "$@"; ONLY=$2; shift 2 ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --wheels) need "$@"; WHEELS=$2; shift 2 ;;
    --arch) need "$@"; ARCH=$2; shift 2 ;;
    --rev) need "$@"; REV=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --rehearse) REHEARSE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[ -n "$OUT" ] || die "--out DIR is required"
if [ -n "$ARCH" ] && ! [[ "$ARCH" =~ ^[0-9]+\.[0-9]+a?(\+PTX)?([\;\ ][0-9]+\.[0-9]+a?(\+PTX)?)*$ ]]; then
  die "--arch '$ARCH' is not a TORCH_CUDA_ARCH_LIST such as 9.0 or '8.0;9.0'"
fi
SELECTED=()
if [ -n "$ONLY" ]; then
  IFS=, read -ra SELECTED <<<"$ONLY"
  for s in "${SELECTED[@]}"; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || die "--only: unknown stage '$s' (stages: ${STAGES[*]})"
  done
else
  SELECTED=("${STAGES[@]}")
fi
selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
if [ "$DRY" = 0 ] && selected wheels && [ "$REHEARSE" = 0 ] && [ ! -d "$WHEELS" ]; then
  die "wheels folder '$WHEELS' does not exist: run bench/prepare_wheels.sh where pip reaches a registry and carry wheels/ along, or leave the stage out (--only)"
fi
command -v timeout >/dev/null || die "needs coreutils' timeout"

if [ "$REHEARSE" = 1 ]; then
  for s in "${STAGES[@]}"; do BUDGET[$s]=${REHEARSE_BUDGET[$s]}; done
  TOTAL_BUDGET=0; for s in "${STAGES[@]}"; do TOTAL_BUDGET=$((TOTAL_BUDGET + BUDGET[$s])); done
fi

# ------------------------------------------------------------------------------------------ settings
mkdir -p "$OUT" || die "cannot create --out '$OUT'"
OUT=$(cd "$OUT" && pwd)
WORK=build/gpu_check      # ignored by git; kept on a warm machine, so a rerun of one stage finds the rest
SITE=$WORK/site
[ "$DRY" = 1 ] || mkdir -p "$WORK"
[ -n "$REV" ] || REV=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then  # the toolkit root: the folder whose lib holds libcudart
  root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  if compgen -G "$root/lib64/libcudart.so*" >/dev/null || compgen -G "$root/lib/libcudart.so*" >/dev/null; then
    export CUDA_HOME=$root
  fi
fi
export PYTHONPATH="$ROOT/$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WF_GIT_REV="$REV"
export WUERSTCHEN_FAST_CACHE=$ROOT/$WORK/tune-cache
WHEELS_IMPORT="import diffusers, open_clip, ftfy"
TEST_FILES="tests/test_ops_*.py tests/test_layer_norm_2d.py tests/test_opcheck.py tests/test_model_fused.py tests/test_compile.py"
FAMILIES="test_ops_*.py,test_layer_norm_2d.py,test_opcheck.py,test_model_fused.py,test_compile.py"
if [ "$REHEARSE" = 1 ]; then
  # A CPU, tiny shapes: two quick kernel families under Triton's interpreter, the tiny bench configs.
  # One thread: on a shared, loaded CPU, OpenMP's spinning threads made a tiny step 30x slower.
  export CUDA_VISIBLE_DEVICES="" WF_BENCH_DEVICE=cpu WF_BENCH_SIZE=tiny WF_BENCH_BUDGET_S=0.02 OMP_NUM_THREADS=1
  DEVICE=cpu VERIFY_DTYPES="float32" VERIFY_ARGS="--height 128 --width 128 --batch 1"
  TEST_FILES="tests/test_ops_ddpm.py tests/test_layer_norm_2d.py" FAMILIES="test_ops_ddpm.py,test_layer_norm_2d.py"
  TEST_SELECT="-k float32" TEST_TIMEOUT=30 TEST_MARGIN=90 BENCH_MARGIN=180 E2E_STEPS="2+2 1+1"
  WHEELS_IMPORT=${WF_CHECK_WHEELS_IMPORT:-$WHEELS_IMPORT}  # the rehearsal's test brings a wheel of its own
else
  export WF_BENCH_DEVICE=cuda WF_BENCH_SIZE=released WF_BENCH_BUDGET_S=0.3
  DEVICE=cuda VERIFY_DTYPES="float32 bfloat16 float16" VERIFY_ARGS=""
  TEST_SELECT="" TEST_TIMEOUT=60 TEST_MARGIN=20 BENCH_MARGIN=15 E2E_STEPS="60+12 29+12"
fi
SLUG=gpu
if [ "$DRY" = 0 ] && [ "$REHEARSE" = 0 ]; then
  SLUG=$("$PY" -c "from bench.common import device_slug; print(device_slug())" 2>/dev/null || echo gpu)
elif [ "$REHEARSE" = 1 ]; then
  SLUG=rehearsal
elif [ "$DRY" = 1 ]; then
  SLUG="<device>"
fi
RESULT="${SLUG}-$(date -u +%Y%m%d-%H%M)-${REV}"
export OUT WORK SITE PY WHEELS ARCH JOBS REHEARSE DEVICE VERIFY_DTYPES VERIFY_ARGS TEST_FILES FAMILIES TEST_SELECT \
  TEST_TIMEOUT TEST_MARGIN BENCH_MARGIN E2E_STEPS RESULT WHEELS_IMPORT

LOG=$OUT/gpu_check.log
REPORT=("$PY" "$ROOT/bench/gpu_check_report.py")
say() { echo "$*" | tee -a "$LOG"; }

# ------------------------------------------------------------------------------------------ the plan
if [ "$DRY" = 1 ]; then
  : >"$LOG"
  say "gpu_check plan ($([ "$REHEARSE" = 1 ] && echo "rehearsal on a CPU" || echo "GPU")), out=$OUT"
  sum=0
  for s in "${STAGES[@]}"; do
    selected "$s" || continue
    sum=$((sum + BUDGET[$s]))
    say "[$s] budget ${BUDGET[$s]} s$([[ "$OPTIONAL" == *" $s "* ]] && echo " (optional; plus whatever the earlier stages left)")"
    STAGE_BUDGET=${BUDGET[$s]} WF_CHECK_DRY=1 bash "$SELF" __stage "$s" 2>&1 | sed 's/^/    /' | tee -a "$LOG"
  done
  say "total budget: $sum s of $TOTAL_BUDGET s"
  exit 0
fi

# ------------------------------------------------------------------------------------------ run
: >"$LOG"
START=$SECONDS
DEADLINE=$((START + TOTAL_BUDGET))
FAILED=()
say "gpu_check: out=$OUT rehearse=$REHEARSE python=$PY rev=$REV stages=${SELECTED[*]} total budget ${TOTAL_BUDGET} s"
"${REPORT[@]}" init --out "$OUT" --rev "$REV" --rehearse "$REHEARSE" --result "$RESULT" >>"$LOG" 2>&1

for s in "${STAGES[@]}"; do
  selected "$s" || continue
  budget=${BUDGET[$s]}
  left=$((DEADLINE - SECONDS))
  if [[ "$OPTIONAL" == *" $s "* ]] && [ "$REHEARSE" = 0 ]; then
    [ $left -gt "$budget" ] && budget=$left  # the optional stage takes what the others left
  elif [ "$budget" -gt $left ]; then
    budget=$left
  fi
  if [ "$budget" -lt 3 ]; then
    say "==> [$s] skipped: only $left s of the $TOTAL_BUDGET s left"
    "${REPORT[@]}" stage --out "$OUT" --name "$s" --rc 125 --seconds 0 --budget "$budget" --work "$WORK" >>"$LOG" 2>&1
    FAILED+=("$s (no time left)")
    continue
  fi
  say "==> [$s] budget $budget s"
  rm -f "$WORK/$s.jsonl"
  t0=$SECONDS
  STAGE_BUDGET=$budget WF_STAGE_START=$(date +%s) timeout -s INT -k 15 "$budget" bash "$SELF" __stage "$s" 2>&1 \
    | tee "$WORK/$s.log" >>"$LOG"
  rc=${PIPESTATUS[0]}
  secs=$((SECONDS - t0))
  status=$("${REPORT[@]}" stage --out "$OUT" --name "$s" --rc "$rc" --seconds "$secs" --budget "$budget" \
           --work "$WORK" --optional "$([[ "$OPTIONAL" == *" $s "* ]] && echo 1 || echo 0)" 2>>"$LOG")
  say "<== [$s] ${status:-unrecorded} (exit $rc) in $secs s of $budget s"
  case "$status" in
    ok|partial|not-available|optional-timeout) ;;
    *) FAILED+=("$s (${status:-unrecorded})") ;;
  esac
  "${REPORT[@]}" pack --out "$OUT" --work "$WORK" >>"$LOG" 2>&1  # logs.tar.gz after every stage
done

"${REPORT[@]}" finish --out "$OUT" --work "$WORK" --seconds $((SECONDS - START)) 2>&1 | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "gpu_check: FAILED: ${FAILED[*]}"
  exit 1
fi
say "gpu_check: every stage that ran passed"
exit 0
