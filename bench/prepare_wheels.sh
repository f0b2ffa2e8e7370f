#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the wheels of the pure-Python packages that the GPU
# machines lack, into the git-ignored wheels/ folder that bench/gpu_runner.sh installs from there.
# The GPU image already has torch, triton, transformers, tokenizers, huggingface_hub, safetensors,
# pytest, pytest-benchmark, regex, tqdm, timm, torchvision, pillow (see bench/README.md); missing:
#   diffusers (+ importlib_metadata), open_clip_torch (tokenizer vocabulary and text configs),
#   ftfy (+ wcwidth), needed by open_clip's tokenizer.
# The working tree travels to the GPU machine in at most 64 MiB, wheels included: keep this set minimal.
#   bench/prepare_wheels.sh [--dest wheels] [--python-version 3.12] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=wheels PYVER=3.12 DRY=0
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) [ $# -ge 2 ] || { echo "prepare_wheels: --dest needs a folder" >&2; exit 2; }; DEST=$2; shift 2 ;;
    --python-version) [ $# -ge 2 ] || { echo "prepare_wheels: --python-version needs e.g. 3.12" >&2; exit 2; }; PYVER=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "prepare_wheels: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
cmd=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform any -d "$DEST" "${WHEELS[@]}")
echo "+ ${cmd[*]}"
[ "$DRY" = 1 ] && exit 0
mkdir -p "$DEST"
"${cmd[@]}"
echo "prepare_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
