"""bench/gpu_runner.sh and bench/prepare_wheels.sh argument handling, through --dry-run (no GPU needed)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "bench" / "gpu_runner.sh"
WHEELS = ROOT / "bench" / "prepare_wheels.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(script, *args):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_prints_every_step_and_runs_none(tmp_path):
    out = tmp_path / "out"
    r = run(RUNNER, "--dry-run", "--out", str(out), "--arch", "9.0", "--rev", "abc123", "--wheels", str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    steps = ["[env]", "[install-wheels]", "[build]", "[info]", "[tests]", "[bench]"]
    positions = [text.index(s) for s in steps]
    assert positions == sorted(positions), text  # in this order
    assert "pip install --no-index --no-deps --no-build-isolation --no-cache-dir -e ." in text
    assert "TORCH_CUDA_ARCH_LIST=9.0" in text and "rev=abc123" in text
    assert f"--junitxml {out}/tests-junit.xml" in text
    assert f"--benchmark-json {out}/<device>-" in text and "-abc123.json" in text
    assert text.count("(dry run: not run)") == len(steps)
    assert (out / "gpu_runner.log").read_text() == text  # the log holds what was printed
    assert list(out.iterdir()) == [out / "gpu_runner.log"]  # nothing else ran


def test_dry_run_skips_and_selections(tmp_path):
    r = run(RUNNER, "--dry-run", "--out", str(tmp_path), "--skip-install", "--skip-build", "--skip-bench",
            "--tests", "tests/test_layer_norm_2d.py -k cuda")
    assert r.returncode == 0, r.stderr
    assert "[install-wheels]" not in r.stdout and "[build]" not in r.stdout and "[bench]" not in r.stdout
    assert "pytest tests/test_layer_norm_2d.py -k cuda -q" in r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--out DIR is required"),
    (["--out"], "--out needs a value"),
    (["--out", "--dry-run"], "--out needs a value"),
    (["--out", "x", "--frobnicate"], "unknown argument '--frobnicate'"),
    (["--out", "x", "--arch", "sm90"], "is not a TORCH_CUDA_ARCH_LIST"),
    (["--out", "x", "--wheels", "/nonexistent/wheels"], "wheels folder '/nonexistent/wheels' does not exist"),
])
def test_bad_arguments_fail_with_a_message_and_usage(tmp_path, args, message):
    r = subprocess.run(["bash", str(RUNNER), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "usage:" in r.stderr and "--dry-run" in r.stderr


def test_help_exits_zero():
    r = run(RUNNER, "--help")
    assert r.returncode == 0 and "--out DIR" in r.stdout


def test_prepare_wheels_dry_run_and_bad_arguments(tmp_path):
    r = run(WHEELS, "--dry-run", "--dest", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    assert "pip download --no-deps --only-binary=:all:" in r.stdout and "diffusers==" in r.stdout
    assert not (tmp_path / "w").exists()
    r = run(WHEELS, "--bogus")
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
