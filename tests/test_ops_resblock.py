"""resblock / resblock_stage_b (op family 1, with the folded modulation) vs the float64 reference.

Both triton variants (cuBLAS GEMMs with fused Triton kernels around them, and Triton GEMMs with
fused prologue/epilogues); outputs and the gradients of every input and weight; float32, bfloat16,
float16; contiguous, channels-last and non-dense strided inputs; H, W including 1 and odd; channel
counts that are not tile multiples; Stage C skip (concatenated before the conv, 2 inputs per group)
and Stage B skip (second K-input of the first Linear); the folded TimestepBlock modulation
out·(1 + a) + b on both stages, with the gradients of a and b. Error bound: testing/tolerance.py.
Shapes are small: Triton runs under its interpreter on CPU (~1 s per case).
"""
import importlib

import pytest
import torch

from conftest import DEVICE
from wuerstchen_fast.ops import reference, registry, resblock, resblock_stage_b
from wuerstchen_fast.testing.tolerance import assert_close_to_reference

R = importlib.import_module("wuerstchen_fast.ops.resblock")
HAS_TRITON = not registry.get_op("resblock").impls["triton"].available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
VARIANTS = R.VARIANTS


def _inputs(stage_b, B, C, H, W, cs, dtype, layout, with_mod, seed=0):
    g = torch.Generator().manual_seed(seed)
    args = list(R._make_args(g, B, C, H, W, cs, torch.float32, layout == "channels_last", stage_b, "cpu"))
    if layout == "strided":  # non-dense views: every other column
        args[0] = torch.randn(B, C, H, 2 * W, generator=g)[..., ::2]
        if args[1] is not None:
            args[1] = torch.randn(B, cs, H, 2 * W, generator=g)[..., ::2]
    tensors = [a.detach().to(DEVICE, dtype) if a is not None else None for a in args]
    mod = None
    if with_mod:
        mod = list((torch.randn(B, 2 * C, generator=g) * 0.3).to(DEVICE, dtype).chunk(2, dim=1))
    grad = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)
    return tensors, mod, grad


def _run(fn, tensors, mod, grad, **kw):
    ts = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    ms = [t.clone().requires_grad_(True) for t in mod] if mod else None
    out = fn(*ts, mod=ms, **kw) if ms else fn(*ts, **kw)
    leaves = [t for t in ts if t is not None] + (ms or [])
    return out, torch.autograd.grad(out, leaves, grad)


def _check(stage_b, variant, B, C, H, W, cs, dtype, layout="contiguous", with_mod=False, backend="triton"):
    fn = resblock_stage_b if stage_b else resblock
    tensors, mod, grad = _inputs(stage_b, B, C, H, W, cs, dtype, layout, with_mod)
    d64 = lambda ts: [t.double() if t is not None else None for t in ts] if ts else None  # noqa: E731
    ey, eg = _run(fn, d64(tensors), d64(mod), grad.double(), backend="torch")
    ry, rg = _run(fn, tensors, mod, grad, backend="torch")
    oy, og = _run(fn, tensors, mod, grad, backend=backend, variant=variant)
    what = f"{'B' if stage_b else 'C'} {backend} {variant} {(B, C, H, W, cs)} {dtype} {layout}{' mod' if with_mod else ''}"
    assert_close_to_reference(oy, ry, ey, what + " forward")
    names = ["x", "skip", "dw_weight", "dw_bias", "w1", "b1", "gamma", "beta", "w2", "b2"]
    names = [n for n, t in zip(names, tensors) if t is not None] + (["mod_a", "mod_b"] if with_mod else [])
    for n, o, r, e in zip(names, og, rg, eg):
        assert_close_to_reference(o, r, e, f"{what} grad {n}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert oy.is_contiguous(memory_format=fmt), (what, oy.stride())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("stage_b", [False, True], ids=["stage_c", "stage_b"])
def test_dtypes(stage_b, variant, dtype):
    _check(stage_b, variant, 2, 16, 3, 5, 8 if stage_b else 0, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("stage_b", [False, True], ids=["stage_c", "stage_b"])
def test_layouts_with_skip(stage_b, variant, layout):
    # Stage C: a skip as wide as x (2 conv inputs per group); Stage B: an odd-width skip.
    _check(stage_b, variant, 1, 24, 4, 3, 7 if stage_b else 24, torch.float32, layout)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 40, 1, 1), (2, 20, 1, 7), (1, 72, 5, 5)], ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(variant, shape):
    _check(False, variant, *shape, 0, torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stage_b", [False, True], ids=["stage_c", "stage_b"])
def test_folded_modulation(stage_b, variant, dtype, layout):
    _check(stage_b, variant, 2, 16, 3, 3, 7 if stage_b else 0, dtype, layout, with_mod=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 40, 1, 1, 0), (2, 20, 1, 7, 7), (1, 24, 5, 3, 13)],
                         ids=lambda s: "x".join(map(str, s)))
def test_stage_b_folded_modulation_odd_shapes(variant, dtype, shape):
    # Stage B's fold (ResBlockStageB -> TimestepBlock): 1x1 and 1-row images, channels and skip widths
    # that are not tile multiples, non-dense strided inputs; gradients of a and b included.
    _check(True, variant, *shape, dtype, "strided", with_mod=True)


def test_training_dropout_is_never_skipped():
    tensors, _, _ = _inputs(False, 1, 8, 2, 2, 0, torch.float32, "contiguous", False)
    kw = dict(dropout=0.5, training=True)
    # auto runs the reference (which applies dropout), an explicit triton request fails with the reason
    assert registry.resolve("resblock", *tensors, **kw) == "torch"
    with pytest.raises(registry.BackendUnavailableError, match="dropout 0.5 in training is not fused"):
        resblock(*tensors, backend="triton", **kw)
    # eval (or dropout 0) is fused
    assert not registry.get_op("resblock").reasons("triton", *tensors, dropout=0.5, training=False)


def test_variant_choice_rule_and_hook(monkeypatch):
    x = torch.randn(1, 1536, 2, 2)
    assert R.choose_variant(x, torch.empty(6144, 1536)) == "cublas"  # CPU: matmul
    with pytest.raises(ValueError, match="variant must be one of"):
        R.record_variant("gpu", torch.bfloat16, 4, 1536, 6144, "fast")
    monkeypatch.setattr(R, "VARIANT_TABLE", {})
    R.record_variant("gpu", torch.bfloat16, 4, 1536, 6144, "triton_gemm")
    assert R.VARIANT_TABLE[("gpu", torch.bfloat16, 4, 1536, 6144)] == "triton_gemm"


def test_reference_matches_the_unfused_module_math():
    # The torch backend is the reference; fp64 gradcheck on a tiny block validates it as an oracle.
    g = torch.Generator().manual_seed(3)
    args = R._make_args(g, 1, 4, 2, 3, 2, torch.float64, False, True, "cpu")
    leaves = [a for a in args if a is not None]
    assert torch.autograd.gradcheck(lambda *t: reference.resblock_stage_b(*t), leaves, atol=1e-6)
