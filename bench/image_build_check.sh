#!/usr/bin/env bash
# Build the extension against the GPU image's torch and Triton (not our pins), here, without a GPU:
# the GPU machines hold torch 2.11.0+cu130 and Triton 3.6.0, while the project's venv pins newer ones.
#
#   bench/image_build_check.sh [--python PY] [--torch 2.11.0] [--triton 3.6.0] [--arch 9.0] [--alt DIR]
#
# 1. pip install --no-deps --target of that torch and Triton into DIR (default .venv/alt; ~1.8 GB, once).
#    PyPI's torch 2.11.0 for x86-64 is the CUDA 13.0 build (it requires cuda-toolkit 13.0.2), the same
#    CUDA major as the image's nvcc 13.0; its CUDA libraries come from the venv's nvidia-* packages.
# 2. A copy of the tracked sources (so this tree's build/ and _C are untouched), built there with that
#    torch first on PYTHONPATH: all C++ translation units and, where nvcc is found, every .cu file for
#    TORCH_CUDA_ARCH_LIST=--arch (the image's GPU: 9.0).
# 3. In that copy, under that torch: import the built _C (undefined symbols show up here), print its build
#    info, and run the extension's CPU tests (tests/test_extension.py, tests/test_layer_norm_2d.py -k cpu).
# Takes ~4-7 minutes of 2 cores for the build (not part of CI: the 1.2 GB torch download and the build
# would double CI's time for a check that only changes when setup.py, csrc/ or a torch release does).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
ROOT=$(pwd)
PY=python3 TORCH=2.11.0 TRITON=3.6.0 ARCH=9.0 ALT=.venv/alt
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python|--torch|--triton|--arch|--alt)
      [ $# -ge 2 ] || { echo "image_build_check: $1 needs a value" >&2; exit 2; }
      case "$1" in --python) PY=$2 ;; --torch) TORCH=$2 ;; --triton) TRITON=$2 ;; --arch) ARCH=$2 ;; --alt) ALT=$2 ;; esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "image_build_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$ALT" in /*) ;; *) ALT=$ROOT/$ALT ;; esac
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # still right after the cd below
TORCH_DIR=$ALT/torch-$TORCH TRITON_DIR=$ALT/triton-$TRITON
for spec in "torch==$TORCH:$TORCH_DIR" "triton==$TRITON:$TRITON_DIR"; do
  dir=${spec#*:}
  if [ ! -f "$dir/.complete" ]; then
    echo "+ pip install --no-deps --target $dir ${spec%%:*}"
    rm -rf "$dir"
    "$PY" -m pip install -q --no-deps --target "$dir" "${spec%%:*}"
    touch "$dir/.complete"
  fi
done
export PYTHONPATH="$TORCH_DIR:$TRITON_DIR"
"$PY" -c "import torch, triton; assert torch.__version__.startswith('$TORCH'), torch.__version__; \
assert triton.__version__ == '$TRITON', triton.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__)"

SRC=build/image-check/src
mkdir -p "$SRC"
# Copied with their times kept, so a second run recompiles only what changed (ninja in the copy's build/).
git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t "$SRC"
cd "$SRC"
if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit root: the folder whose lib64 (or lib) holds libcudart, as setup.py
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")" /usr/local/cuda; do
    if compgen -G "$c/lib64/libcudart.so*" >/dev/null || compgen -G "$c/lib/libcudart.so*" >/dev/null; then
      CUDA_HOME=$c; break
    fi
  done
fi
if [ -n "${CUDA_HOME:-}" ]; then
  echo "image_build_check: nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'), TORCH_CUDA_ARCH_LIST=$ARCH"
  export CUDA_HOME TORCH_CUDA_ARCH_LIST=$ARCH
else
  echo "image_build_check: no nvcc found: the C++ sources only (set CUDA_HOME to compile the .cu files too)"
fi
t0=$SECONDS
# (torch's vectorized headers warn about '#pragma unroll' in every C++ unit: those lines are left out)
set +o pipefail
"$PY" setup.py -q build_ext --inplace 2>&1 | { grep -v "Wunknown-pragmas\|#pragma unroll\|^ *| *$\|^ *[0-9]* | " || true; }
rc=${PIPESTATUS[0]}
set -o pipefail
[ "$rc" = 0 ] || { echo "image_build_check: the build failed (exit $rc) against torch $TORCH" >&2; exit 1; }
echo "image_build_check: build took $((SECONDS - t0)) s"
"$PY" -c "
import torch, wuerstchen_fast
from wuerstchen_fast._extension import build_info, extension
info = build_info()
assert extension() is not None and info is not None, 'the built _C did not load under torch ' + torch.__version__
assert info['torch_version'] == torch.__version__, info
print('image_build_check: _C loads under torch', torch.__version__, info)
"
"$PY" -m pytest -q -p no:cacheprovider tests/test_extension.py tests/test_layer_norm_2d.py -k "cpu or extension"
echo "image_build_check: passed (torch $TORCH, Triton $TRITON)"
