"""A wheel built with `python -m build --no-isolation --wheel` carries the Triton kernels, the compiled
extension and the bundled default model.

Built from a copy of the tracked tree with WUERSTCHEN_FAST_NO_CUDA=1 to keep CI short: the CUDA sources
are already compiled by the main build and by tests/test_cmake_build.py; what matters here is packaging.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    env = dict(os.environ, WUERSTCHEN_FAST_NO_CUDA="1")
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(tmp_path / "dist")],
                         cwd=src, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("wuerstchen_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("wuerstchen_fast/_C") and n.endswith(".so") for n in names), sorted(names)[:20]
    for module in ("layer_norm_2d", "resblock", "attention", "ddpm"):
        assert f"wuerstchen_fast/kernels/triton/{module}.py" in names
    for part in ("prior", "decoder", "vqgan", "text_encoder"):
        assert f"wuerstchen_fast/weights/default/{part}/model.safetensors" in names
    assert "wuerstchen_fast/weights/default/sampling.json" in names
    assert not any(n.startswith(("tests/", "bench/", "runs/")) for n in names)
