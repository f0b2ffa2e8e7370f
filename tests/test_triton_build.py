"""Every Triton kernel in the registry compiles for sm_80 and sm_90 (no GPU needed), without spills.

Compiles in a child process with TRITON_INTERPRET unset (the interpreter's functions cannot be
compiled) and prints each kernel's registers and spills into the test log (`-s` or the report).
Twice: with the pinned Triton, and with the Triton of the GPU machines' image (IMAGE_TRITON), which
`make venv` installs beside it (--target, at set-up: tests never download); its folder can be named
by WF_IMAGE_TRITON_DIR.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


IMAGE_TRITON = "3.6.0"  # the GPU machines' image (torch 2.11.0+cu130); the Makefile's IMAGE_TRITON


def _image_triton_dir() -> Path:
    return Path(os.environ.get("WF_IMAGE_TRITON_DIR") or Path(sys.prefix) / "alt" / f"triton-{IMAGE_TRITON}")


@pytest.fixture(scope="module", params=["pinned", IMAGE_TRITON], ids=lambda v: f"triton-{v}")
def resources(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param != "pinned":
        alt = _image_triton_dir()
        assert (alt / "triton").is_dir(), (
            f"Triton {request.param} is not installed in {alt}: run `make venv` (it runs `pip install --no-deps "
            f"--target {alt} triton=={request.param}`), or point WF_IMAGE_TRITON_DIR at such a folder")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(alt), env.get("PYTHONPATH")]))
        version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                                 capture_output=True, text=True, timeout=300).stdout.strip()
        assert version == request.param, f"{alt} gave Triton {version!r}, not {request.param}"
    out = subprocess.run([sys.executable, "-m", "wuerstchen_fast.testing.triton_aot", "--arch", "80", "90", "--json"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"\nTriton kernels ({request.param}), ahead-of-time for sm_80/sm_90:")
    for r in rows:
        print(f"  {r['kernel']:32s} sm_{r['arch']}: {r['registers']:3d} regs, "
              f"spill {r['spill_stores']}/{r['spill_loads']} B, shared {r['shared_bytes']} B")
    return rows


def test_every_kernel_compiles_for_both_archs(resources):
    from wuerstchen_fast.testing.triton_aot import all_specs

    names = {s["name"] for s in all_specs()}
    assert names, "the registry lists no Triton kernels"
    for arch in (80, 90):
        assert {r["kernel"] for r in resources if r["arch"] == arch} == names


# Known defect: Triton 3.6 allocates ~3x the registers of the pinned Triton for the same kernels and tiles
# (layer_norm_2d's forward at BLOCK_C=16, BLOCK_P=128, 4 warps: 168 registers on sm_90, against 56), so the
# normalization kernels (13: layer_norm_2d, mixing's norm_mod and depthwise backward, modulation's backward,
# resblock's dwconv_ln) exceed the 128-register budget there, and 4 backward kernels spill (layer_norm_2d,
# norm_mod twice, attention's dq at bf16 d64). They compile and run
# (the test above); on the GPU image they are slower than they need to be until their tiles fit both.
IMAGE_RESOURCES_DEFECT = "Triton 3.6 uses ~3x the registers of the pinned Triton for the normalization kernels"


def _image_triton_defect(request):
    if request.node.callspec.params["resources"] != "pinned":
        request.applymarker(pytest.mark.xfail(strict=True, reason=IMAGE_RESOURCES_DEFECT))


def test_no_kernel_spills(resources, request):
    _image_triton_defect(request)
    spilling = [r for r in resources if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling


def test_register_budget(resources, request):
    _image_triton_defect(request)
    # Each kernel within its spec's budget (default 128, see testing/triton_aot.py); 255 is the hardware cap.
    over = [r for r in resources if r["registers"] > r["max_registers"]]
    assert not over, over
