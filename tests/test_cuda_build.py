"""Every CUDA kernel of the extension compiles for sm_80 and sm_90 without register spills.

Compiles each kernels/cuda/*.cu once for both architectures with nvcc `-Xptxas -v --resource-usage`,
with the include dirs and flags of the extension build (torch.utils.cpp_extension, as setup.py),
prints a table of registers / spill stores / spill loads per kernel and architecture, and fails if
any kernel spills. Needs a CUDA toolkit (CUDA_HOME / CUDA_PATH / /usr/local/cuda, as setup.py), not
a GPU; skipped without one.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "kernels" / "cuda").glob("*.cu"))


def _cuda_home():
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


def _flags(cuda_home):
    os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    gen = ROOT / "build" / "generated"
    return ([f"-I{p}" for p in include_paths("cuda")] + [f"-I{ROOT / 'csrc'}", f"-I{gen}"] + list(COMMON_NVCC_FLAGS)
            + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_EXTENSION_NAME=_C",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DWF_WITH_CUDA", "-std=c++20", "-O3"])


_FN = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> list:
    """[(kernel, arch, registers, spill stores, spill loads)] from ptxas -v output."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _FN.search(line)
        if m:
            cur = [m.group(1), m.group(2), None, 0, 0]
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur[3], cur[4] = int(m.group(1)), int(m.group(2))
        m = _REGS.search(line)
        if m and cur[2] is None:
            cur[2] = int(m.group(1))
    return [tuple(r) for r in rows]


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile_without_spills(source, tmp_path):
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    cmd = [str(Path(cuda_home) / "bin" / "nvcc"), "-c", str(source), "-o", str(tmp_path / "k.o"), *_flags(cuda_home),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Xptxas", "-v", "--resource-usage"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = parse_ptxas(r.stdout + r.stderr)
    assert rows, "ptxas printed no kernel statistics"
    names = _demangle([row[0] for row in rows])
    print(f"\n{source.name}: registers / spill stores / spill loads per kernel")
    for name, (_, arch, regs, ss, sl) in zip(names, rows):
        print(f"  {arch}  regs {regs!s:>4}  spill st {ss:>4}  ld {sl:>4}  {name[:150]}")
    spills = [(n, row[1], row[3], row[4]) for n, row in zip(names, rows) if row[3] or row[4]]
    assert not spills, f"kernels spill registers: {spills}"
