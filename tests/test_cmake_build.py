"""CMakeLists.txt builds the same extension as setup.py from the same source list (csrc/sources.txt).

Configures and builds in a temporary folder (CUDA sources too, when a toolkit is found), then loads
the result in a fresh process (a second copy cannot load beside the installed one: both register
the wuerstchen_fast_C op library) and runs an op on the CPU against the reference.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sources(cuda: bool):
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#") and (cuda or not l.strip().endswith(".cu"))]


@pytest.mark.slow
def test_cmake_builds_the_extension(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed for this test (the Makefile installs it from PyPI when missing)"
    build = tmp_path / "build"
    env = dict(os.environ)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, f"-DPython3_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    cuda = "WF_WITH_CUDA:BOOL=ON" in (build / "CMakeCache.txt").read_text()
    b = subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True, env=env)
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-3000:]
    # every source of the list was compiled (none forgotten, none extra)
    built = {p.name for p in (build / "CMakeFiles" / "_C.dir").rglob("*.o") if p.name.endswith((".cpp.o", ".cu.o"))}
    assert {Path(s).name + ".o" for s in _sources(cuda)} == built
    (so,) = build.glob("_C*.so")
    check = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("_C", {str(so)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        info = m.build_info()
        assert info["torch_version"] == torch.__version__ and info["with_cuda"] == {cuda}, info
        x = torch.randn(2, 7, 3, 5) * 3 + 1
        ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (7,), eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(torch.ops.wuerstchen_fast_C.layer_norm_2d(x, 1e-6), ref)
        print("ok", info)
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]
