#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the wheels of the packages that the GPU machines lack,
# into the git-ignored wheels/ folder that bench/gpu_check.sh installs from there (--no-deps --target).
# Exactly what the GPU image lacks, from each wheel's Requires-Dist against the image's package list
# (torch 2.11, torchvision, Triton 3.6, transformers 5.17, huggingface_hub 1.33, safetensors 0.8, timm,
# regex, requests, filelock, numpy, pillow, tqdm, tokenizers, pytest, pytest-benchmark, pytest-timeout):
#   diffusers        needs huggingface-hub>=1.32, safetensors>=0.8, filelock, numpy, regex, requests,
#                    Pillow: all there; its importlib_metadata only on Python < 3.8 (the image has 3.12)
#   open_clip_torch  the tokenizer's BPE vocabulary; needs torch, torchvision, regex, tqdm,
#                    huggingface-hub, safetensors, timm (there; timm is imported optionally) and ftfy
#   ftfy             needs wcwidth
#   wcwidth          needs nothing
# The working tree travels to the GPU machine in at most 64 MiB, wheels included: keep this set minimal.
#   bench/prepare_wheels.sh [--dest wheels] [--python-version 3.12] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=wheels PYVER=3.12 DRY=0
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
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
rm -f "$DEST"/*.whl  # one version of each: two would stop the whole install there
"${cmd[@]}"
echo "prepare_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
