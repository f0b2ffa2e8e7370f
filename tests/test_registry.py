"""The backend registry: selection order, explicit requests, quiet automatic fallback, reasons."""
import os
import subprocess
import sys

import pytest
import torch

import wuerstchen_fast
from wuerstchen_fast.ops import layer_norm_2d, registry
from wuerstchen_fast.ops.registry import BackendUnavailableError, resolve


@pytest.fixture(autouse=True)
def _clean_state():
    yield
    wuerstchen_fast.set_backend(None)


def test_auto_picks_the_fastest_capable_backend_on_cpu():
    x = torch.randn(1, 4, 2, 2)
    # The cpu extension beats eager on the CPU (bench/bench_layer_norm_2d.py); Triton's interpreter
    # is never chosen automatically, it is for tests.
    assert resolve("layer_norm_2d", x) == "cpu"


def test_auto_falls_back_quietly_to_the_reference():
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)  # no fused backend supports float64
    assert resolve("layer_norm_2d", x) == "torch"
    torch.testing.assert_close(layer_norm_2d(x), wuerstchen_fast.ops.reference.layer_norm_2d(x))


def test_explicit_request_that_cannot_run_lists_every_backend():
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(BackendUnavailableError) as e:
        resolve("layer_norm_2d", x, backend="cuda")
    msg = str(e.value)
    for name in registry.BACKENDS:
        assert f"  {name}: " in msg
    assert "no CUDA GPU" in msg or "not built" in msg or "without CUDA" in msg


def test_priority_list_takes_the_first_that_can_run():
    x = torch.randn(1, 4, 2, 2)
    assert resolve("layer_norm_2d", x, backend="cuda,torch") == "torch"


def test_selection_order_call_then_context_then_global():
    x = torch.randn(1, 4, 2, 2)
    wuerstchen_fast.set_backend("torch")
    assert resolve("layer_norm_2d", x) == "torch"
    with wuerstchen_fast.backend("cpu"):
        assert resolve("layer_norm_2d", x) == "cpu"
        with wuerstchen_fast.backend("torch"):
            assert resolve("layer_norm_2d", x) == "torch"
        assert resolve("layer_norm_2d", x, backend="torch") == "torch"
        assert wuerstchen_fast.get_backend() == "cpu"
    assert wuerstchen_fast.get_backend() == "torch"
    wuerstchen_fast.set_backend("auto")
    assert wuerstchen_fast.get_backend() == "auto"


def test_context_manager_restores_on_error():
    with pytest.raises(RuntimeError):
        with wuerstchen_fast.backend("torch"):
            raise RuntimeError("boom")
    assert wuerstchen_fast.get_backend() == "auto"


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        wuerstchen_fast.set_backend("fast")
    with pytest.raises(ValueError, match="unknown backend"):
        layer_norm_2d(torch.randn(1, 2, 2, 2), backend="gpu")


def test_environment_variable_is_honoured():
    code = ("import torch, wuerstchen_fast as w; from wuerstchen_fast.ops.registry import resolve;"
            "print(w.get_backend(), resolve('layer_norm_2d', torch.randn(1, 2, 2, 2)))")
    env = dict(os.environ, WUERSTCHEN_FAST_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch"]
    env["WUERSTCHEN_FAST_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "WUERSTCHEN_FAST_BACKEND" in bad.stderr


def test_every_op_has_a_reference_and_samples():
    for op in registry.all_ops():
        assert "torch" in op.impls, op.name
        assert op.samples is not None and op.samples(), op.name


def test_info_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "wuerstchen_fast.info"], capture_output=True, text=True, check=True)
    table = out.stdout
    assert "layer_norm_2d" in table
    row = next(line for line in table.splitlines() if line.startswith("layer_norm_2d"))
    assert row.split()[1] == "available"  # the torch reference
    if not torch.cuda.is_available():
        assert "built, unavailable: no GPU" in row  # CI builds the CUDA kernels with no GPU
    assert "archs 8.0;9.0" in table or torch.cuda.is_available()
