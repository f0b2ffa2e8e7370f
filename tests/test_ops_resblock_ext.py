"""resblock / resblock_stage_b on the extension backends (cpu here, cuda on a GPU) vs the float64 reference.

The "ext" composition (ops/resblock_ext.py: dwconv_ln kernel, torch GEMMs, extension GRN and modulation
kernels), forward and every gradient, with the same checks as test_ops_resblock.py's Triton variants:
float32/bfloat16/float16, contiguous/channels-last/strided, odd shapes, Stage B skip, folded modulation.
Stage C with a skip (a grouped conv) is outside the extension: the registry must say so.
"""
import pytest
import torch

from conftest import DEVICE
from test_ops_resblock import _check, _inputs
from wuerstchen_fast.ops import registry, resblock, resblock_stage_b
from wuerstchen_fast.ops.registry import BackendUnavailableError

EXT = "cuda" if DEVICE == "cuda" else "cpu"
_REASONS = registry.get_op("resblock").impls[EXT].available()
pytestmark = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS) or "available")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("stage_b", [False, True], ids=["stage_c", "stage_b"])
def test_dtypes(stage_b, dtype):
    _check(stage_b, None, 2, 16, 3, 5, 8 if stage_b else 0, dtype, backend=EXT)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_layouts_with_stage_b_skip(layout):
    _check(True, None, 1, 24, 4, 4, 8, torch.float32, layout, backend=EXT)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_stage_c(layout):
    _check(False, None, 2, 7, 5, 3, 0, torch.float32, layout, backend=EXT)


@pytest.mark.parametrize("shape", [(1, 40, 1, 1), (2, 7, 1, 7), (1, 320, 5, 5), (1, 16, 24, 24)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(shape):
    _check(False, None, *shape, 0, torch.float32, backend=EXT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_folded_modulation(dtype, layout):
    _check(False, None, 2, 16, 3, 4, 0, dtype, layout, with_mod=True, backend=EXT)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_folded_modulation_stage_b(layout):
    _check(True, None, 2, 16, 3, 3, 7, torch.float32, layout, with_mod=True, backend=EXT)


def test_stage_c_skip_is_refused_with_a_reason():
    tensors, _, _ = _inputs(False, 1, 8, 3, 3, 8, torch.float32, "contiguous", False)
    with pytest.raises(BackendUnavailableError, match="3x3 depthwise conv of x alone"):
        resblock(*tensors, backend=EXT)


def test_backend_runs_through_the_extension(monkeypatch):
    # backend=EXT must reach the extension composition (not a silent fallback to the reference).
    import wuerstchen_fast.ops.resblock_ext as ext

    calls, real = [], ext.forward
    monkeypatch.setattr(ext, "forward", lambda *a, **k: calls.append((a[-1], k["keep_h"])) or real(*a, **k))
    tensors, _, _ = _inputs(True, 1, 8, 3, 3, 4, torch.float32, "contiguous", False)
    out = resblock_stage_b(*tensors, backend=EXT)  # nothing needs a gradient: the inference variant
    assert calls == [(True, False)] and out.shape == (1, 8, 3, 3)
    resblock_stage_b(tensors[0].requires_grad_(True), *tensors[1:], backend=EXT)
    assert calls[-1] == (True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage_b", [False, True], ids=["stage_c", "stage_b"])
def test_inference_variant_matches_the_reference(stage_b, dtype):
    # No input needs a gradient: GELU and the GRN scale run in place in the hidden buffer (resblock_ext.forward
    # keep_h=False), with the modulation folded as in sampling; same error bound as the training variant.
    from wuerstchen_fast.ops.reference import modulate
    from wuerstchen_fast.ops.resblock import EXT_NOGRAD, resblock_op
    from wuerstchen_fast.testing.tolerance import assert_close_to_reference

    tensors, mod, _ = _inputs(stage_b, 2, 16, 5, 6, 8 if stage_b else 0, dtype, "contiguous", True)
    fn = resblock_stage_b if stage_b else resblock
    with torch.no_grad():
        out = fn(*tensors, mod=mod, backend=EXT)
        ref = modulate(fn(*tensors, backend="torch"), *mod)
        exact = modulate(fn(*[t.double() if t is not None else None for t in tensors], backend="torch"),
                         *[m.double() for m in mod])
        assert_close_to_reference(out, ref, exact, f"inference variant {'B' if stage_b else 'C'} {dtype}")
        a = list(tensors)
        a[6], a[7] = a[6].reshape(-1), a[7].reshape(-1)
        h = resblock_op(*a, *mod, 1e-6, stage_b, EXT_NOGRAD)[4]
        assert h.numel() == 0  # no pre-activation kept


def test_auto_on_cpu_keeps_the_reference():
    # auto keeps the reference on a CPU so that CPU results stay bit-exact with diffusers; backend="cpu"
    # selects the extension composition (Stage B forward 1.28x diffusers': bench/bench_stages.py).
    tensors, _, _ = _inputs(True, 1, 8, 3, 3, 4, torch.float32, "contiguous", False)
    assert registry.resolve("resblock_stage_b", *tensors) == "torch"
    assert registry.resolve("resblock_stage_b", *tensors, backend="cpu") == "cpu"
    assert registry.get_op("resblock").priority["cpu"][0] == "torch"
