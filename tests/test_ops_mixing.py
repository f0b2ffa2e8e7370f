"""ops.norm_mod (Stage A: LayerNorm over channels + scalar modulation) against the float64 reference.

Matrix: float32/bfloat16/float16 x C in (192, 384, 7) x odd sizes x contiguous / channels-last /
non-dense, forward and the three gradients (x, scale, shift). Error bound: the rule in
wuerstchen_fast/testing/tolerance.py. Then a tiny Stage A decode, forward and backward, with the
triton backend equals the torch backend, which stays bit-exact with diffusers (tests/test_models_*).
"""
import pytest
import torch

import wuerstchen_fast
from conftest import DEVICE
from wuerstchen_fast.ops import norm_mod, reference, registry
from wuerstchen_fast.testing.tolerance import assert_close_to_reference

BACKENDS = [b for b in ("triton", "cpu", "cuda") if b in registry.get_op("norm_mod").impls
            and not registry.get_op("norm_mod").impls[b].available()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The interpreter is slow: batch 1 and small grids; every tile edge (C not a multiple of 16, pixels not
# of 128, a single pixel) is still crossed.
SHAPES = [(1, 192, 3, 5), (1, 384, 2, 3), (2, 7, 1, 1), (1, 20, 9, 17)]


def _inputs(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    if layout == "strided":
        x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=g)[..., ::2] * 3 + 1
    s, t = torch.randn((), generator=g) * 0.5, torch.randn((), generator=g)
    x, s, t = (v.to(DEVICE, dtype) for v in (x, s, t))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, s, t


def _run(fn, x, s, t, grad):
    x, s, t = (v.detach().clone().requires_grad_(True) for v in (x, s, t))
    y = fn(x, s, t)
    return (y,) + torch.autograd.grad(y, (x, s, t), grad)


def _check(backend, shape, dtype, layout):
    x, s, t = _inputs(shape, dtype, layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    exact = _run(reference.mixing.norm_mod, x.double(), s.double(), t.double(), grad.double())
    eager = _run(reference.mixing.norm_mod, x, s, t, grad)
    ours = _run(lambda *a: norm_mod(*a, backend=backend), x, s, t, grad)
    what = f"{backend} {shape} {dtype} {layout}"
    # dscale, dshift are sums over every element: a float32 sum's error scales with Σ|terms|, not with
    # the (possibly cancelling) result, so both are measured in units of Σ|terms|.
    zero = torch.zeros((), dtype=torch.float64, device=DEVICE)
    xhat = reference.mixing.norm_mod(x.double(), zero, zero)
    size = {"dscale": (grad.double() * xhat).abs().sum(), "dshift": grad.double().abs().sum()}
    for name, o, e, ex in zip(("y", "dx", "dscale", "dshift"), ours, eager, exact):
        if name in size:
            o, e, ex = o / size[name].to(o.dtype), e / size[name].to(e.dtype), ex / size[name]
        assert_close_to_reference(o, e, ex, f"{what} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(backend, shape, dtype, layout):
    _check(backend, shape, dtype, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_dense_strided_input(backend):
    _check(backend, (2, 9, 5, 6), torch.float32, "strided")


def test_fp64_gradcheck_reference_path():
    x = torch.randn(1, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    s, t = (torch.randn((), dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: norm_mod(*a, backend="torch"), (x, s, t))


def test_stage_a_forward_backward_triton_equals_torch():
    from wuerstchen_fast.models.configs import StageAConfig
    from wuerstchen_fast.models.stage_a import StageA
    from wuerstchen_fast.testing.random_models import TINY_VQGAN, randomize_

    m = randomize_(StageA(StageAConfig(**TINY_VQGAN)), seed=4).to(DEVICE)
    lat = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = {}
    for name in ("torch", "triton"):
        m.zero_grad()
        x = lat.clone().requires_grad_(True)
        with wuerstchen_fast.backend(name):
            y = m.decode(x)
            y.square().mean().backward()
        results[name] = (y.detach(), x.grad, m.up_blocks[1].gammas.grad.clone(), m.up_blocks[1].depthwise[1].weight.grad.clone())
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ mixing_dwconv
# x + (replication-padded 3x3 depthwise conv(xn) + bias)·g: forward and the gradients of x, xn, weight,
# bias and g. Sizes 1 and 2 along H or W exercise the pad's border fold in backward (every source
# pixel clamps), odd sizes the tile edges. dweight, dbias, dg are sums over pixels (and channels for dg):
# measured in units of Σ|terms| like dscale above.
from wuerstchen_fast.ops.mixing import mixing_dwconv  # noqa: E402

DW_BACKENDS = [b for b in ("triton", "cpu", "cuda") if b in registry.get_op("mixing_dwconv").impls
               and not registry.get_op("mixing_dwconv").impls[b].available()]
DW_SHAPES = [(1, 192, 3, 5), (2, 7, 1, 1), (1, 9, 2, 7), (1, 20, 9, 17), (2, 16, 5, 1)]


def _dw_inputs(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    if layout == "strided":
        x, xn = (torch.randn(B, C, H, 2 * W, generator=g)[..., ::2] for _ in range(2))
    else:
        x, xn = (torch.randn(shape, generator=g) for _ in range(2))
    w, b, gm = torch.randn(C, 1, 3, 3, generator=g) / 3, torch.randn(C, generator=g) * 0.3, torch.randn((), generator=g)
    ts = [v.to(DEVICE, dtype) for v in (x, xn, w, b, gm)]
    if layout == "channels_last":
        ts[0], ts[1] = (v.contiguous(memory_format=torch.channels_last) for v in ts[:2])
    return ts


def _dw_run(fn, ts, grad):
    ts = [v.detach().clone().requires_grad_(True) for v in ts]
    y = fn(*ts)
    return (y,) + torch.autograd.grad(y, ts, grad)


def _dw_check(backend, shape, dtype, layout):
    ts = _dw_inputs(shape, dtype, layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ref = reference.mixing.dwconv_residual
    exact = _dw_run(ref, [t.double() for t in ts], grad.double())
    eager = _dw_run(ref, ts, grad)
    ours = _dw_run(lambda *a: mixing_dwconv(*a, backend=backend), ts, grad)
    x, xn, w, b, gm = (t.double() for t in ts)
    gd = grad.double()
    xp = torch.nn.functional.pad(xn, (1, 1, 1, 1), mode="replicate")
    conv_abs = torch.nn.functional.conv2d(xp.abs(), w.abs(), b.abs(), groups=shape[1])
    taps = torch.stack([(gd.abs() * xp[:, :, i:i + shape[2], j:j + shape[3]].abs()).sum((0, 2, 3))
                        for i in range(3) for j in range(3)], 1).reshape(w.shape)
    size = {"dweight": taps * gm.abs() + 1e-30, "dbias": gd.abs().sum((0, 2, 3)) * gm.abs() + 1e-30,
            "dgamma": (gd.abs() * conv_abs).sum()}
    what = f"{backend} {shape} {dtype} {layout}"
    for name, o, e, ex in zip(("y", "dx", "dxn", "dweight", "dbias", "dgamma"), ours, eager, exact):
        assert o.shape == ex.shape, (what, name, o.shape)
        if name in size:
            o, e, ex = o / size[name].to(o.dtype), e / size[name].to(e.dtype), ex / size[name]
        assert_close_to_reference(o, e, ex, f"{what} {name}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert ours[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", DW_BACKENDS)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dwconv_matches_reference(backend, shape, dtype):
    _dw_check(backend, shape, dtype, "contiguous")


@pytest.mark.parametrize("backend", DW_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_dwconv_layouts(backend, layout):
    _dw_check(backend, (2, 12, 4, 5), torch.float32, layout)
    _dw_check(backend, (1, 70, 3, 2), torch.bfloat16, layout)


def test_dwconv_fp64_gradcheck_reference_path():
    ts = [t.double().requires_grad_(True) for t in _dw_inputs((1, 3, 2, 3), torch.float32, "contiguous")]
    assert torch.autograd.gradcheck(lambda *a: mixing_dwconv(*a, backend="torch"), ts)


# ------------------------------------------------------------------------------ CUDA kernels
# kernels/cuda/mixing.cu. The matrices above run the cuda backend too wherever it is available; these
# add Stage A's own sizes (C 192 / 384, H·W, W and C multiples of 8: the 16-byte vector paths), odd
# sizes (the one-element paths), every layout, a misaligned view and a side stream.
from wuerstchen_fast._extension import build_info  # noqa: E402

CUDA_SHAPES = [(2, 384, 32, 32), (1, 192, 24, 40), (2, 7, 5, 3), (1, 20, 9, 17), (2, 16, 1, 1), (1, 8, 3, 8)]


def test_cuda_backend_is_declared_and_registered():
    for name in ("norm_mod", "mixing_dwconv"):
        impl = registry.get_op(name).impls["cuda"]
        if not torch.cuda.is_available():
            assert impl.available(), f"{name}: cuda backend claims to run without a GPU"
    info = build_info()
    if not (info and info["with_cuda"]):
        pytest.skip("extension not built with CUDA kernels")
    for op in ("norm_mod", "norm_mod_backward", "mixing_dwconv", "mixing_dwconv_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"wuerstchen_fast_C::{op}", "CUDA"), op


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_norm_mod_matches_reference(shape, dtype, layout):
    assert DEVICE == "cuda"
    _check("cuda", shape, dtype, layout)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES + [(1, 9, 2, 7), (2, 16, 5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_dwconv_matches_reference(shape, dtype, layout):
    assert DEVICE == "cuda"
    _dw_check("cuda", shape, dtype, layout)


def _misaligned(t):
    """t's values in a contiguous tensor whose data starts one element past a 16-byte boundary (no vector loads)."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    out = flat[1:1 + t.numel()].view(t.shape)
    return out.copy_(t)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_misaligned_inputs_take_the_scalar_path(dtype):
    assert DEVICE == "cuda"
    x, s, t = _inputs((2, 16, 4, 8), dtype, "contiguous")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    expect = _run(lambda *a: norm_mod(*a, backend="cuda"), x, s, t, grad)
    got = _run(lambda *a: norm_mod(*a, backend="cuda"), _misaligned(x), s, t, _misaligned(grad))
    for a, b in zip(got, expect):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    ts = _dw_inputs((2, 16, 4, 8), dtype, "contiguous")
    expect = _dw_run(lambda *a: mixing_dwconv(*a, backend="cuda"), ts, grad)
    got = _dw_run(lambda *a: mixing_dwconv(*a, backend="cuda"), [_misaligned(ts[0]), _misaligned(ts[1])] + ts[2:],
                  _misaligned(grad))
    for a, b in zip(got, expect):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.cuda
def test_cuda_kernels_on_a_side_stream():
    assert DEVICE == "cuda"
    x, s, t = _inputs((2, 64, 9, 16), torch.bfloat16, "contiguous")
    ts = _dw_inputs((2, 64, 9, 16), torch.bfloat16, "contiguous")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    expect = (_run(lambda *a: norm_mod(*a, backend="cuda"), x, s, t, grad),
              _dw_run(lambda *a: mixing_dwconv(*a, backend="cuda"), ts, grad))
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        out = (_run(lambda *a: norm_mod(*a, backend="cuda"), x, s, t, grad),
               _dw_run(lambda *a: mixing_dwconv(*a, backend="cuda"), ts, grad))
    torch.cuda.current_stream().wait_stream(st)
    for a, b in zip(out[0] + out[1], expect[0] + expect[1]):
        assert torch.equal(a, b)
