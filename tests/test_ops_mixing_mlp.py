"""ops.mixing_mlp (Stage A: x + MLP(LN(x)·(1 + s) + t)·g) against the float64 reference.

Matrix: float32/bfloat16/float16 x C in (192, 7, 20, 16) x H, W in {1, odd} x contiguous / channels-last /
non-dense, forward and the gradients of all eight inputs (x, w1, b1, w2, b2, scale, shift, gamma). Error
bound: the rule in wuerstchen_fast/testing/tolerance.py. The three scalar gradients are sums over every
element of the block (dscale, dshift over the normalised input, dgamma over the MLP output): a sum's
rounding error scales with Σ|terms|, not with the (possibly cancelling) result, so they are measured in
units of Σ|terms| as the norm_mod and mixing_dwconv tests do.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from wuerstchen_fast.ops import mixing_mlp, reference, registry
from wuerstchen_fast.ops.mixing_mlp import VARIANTS, _make_args
from wuerstchen_fast.testing.tolerance import assert_close_to_reference

BACKENDS = [b for b in ("triton", "cpu", "cuda") if b in registry.get_op("mixing_mlp").impls
            and not registry.get_op("mixing_mlp").impls[b].available()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Released widths (192) and odd ones (7, 20); H = W = 1, odd H and W, a single column; batch 2 crosses the
# per-batch row offsets. Kept small: the Triton kernels run under the interpreter on CPU.
SHAPES = [(1, 192, 3, 5), (2, 7, 1, 1), (1, 20, 9, 7), (2, 16, 5, 1)]
NAMES = ("out", "dx", "dw1", "db1", "dw2", "db2", "dscale", "dshift", "dgamma")


def _inputs(shape, dtype, layout, seed=0):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    ts = list(_make_args(g, B, C, H, W, torch.float32, False, "cpu"))
    if layout == "strided":
        ts[0] = (torch.randn(B, C, H, 2 * W, generator=g) * 2 + 0.5)[..., ::2]
    ts = [t.to(DEVICE, dtype) for t in ts]
    if layout == "channels_last":
        ts[0] = ts[0].contiguous(memory_format=torch.channels_last)
    return ts


def _run(fn, ts, grad):
    ts = [t.detach().clone().requires_grad_(True) for t in ts]
    y = fn(*ts)
    return (y,) + torch.autograd.grad(y, ts, grad)


def _scalar_sizes(ts, grad):
    """Σ|terms| of dscale, dshift and dgamma, in float64."""
    x, w1, b1, w2, b2, s, t, g = (v.detach().double() for v in ts)
    gd = grad.double().permute(0, 2, 3, 1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xhat = reference.mixing.norm_mod(x, zero, zero).permute(0, 2, 3, 1)
    u = F.linear(xhat * (1 + s) + t, w1, b1).requires_grad_(True)
    z = F.linear(F.gelu(u), w2, b2)
    (du,) = torch.autograd.grad(z, u, gd * g)
    dxn = du @ w1
    return {"dscale": (dxn * xhat).abs().sum(), "dshift": dxn.abs().sum(), "dgamma": (gd * z).abs().sum()}


def _check(backend, shape, dtype, layout, variant=None):
    ts = _inputs(shape, dtype, layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ref = reference.mixing.mlp_residual
    exact = _run(ref, [t.double() for t in ts], grad.double())
    eager = _run(ref, ts, grad)
    ours = _run(lambda *a: mixing_mlp(*a, backend=backend, variant=variant), ts, grad)
    size = _scalar_sizes(ts, grad)
    what = f"{backend} {variant} {shape} {dtype} {layout}"
    for name, o, e, ex in zip(NAMES, ours, eager, exact):
        assert o.shape == ex.shape and o.dtype == e.dtype, (what, name, o.shape, o.dtype)
        if name in size:
            o, e, ex = o / size[name].to(o.dtype), e / size[name].to(e.dtype), ex / size[name]
        assert_close_to_reference(o, e, ex, f"{what} {name}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert ours[0].is_contiguous(memory_format=fmt) and ours[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(backend, shape, dtype, layout, variant):
    _check(backend, shape, dtype, layout, variant)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_dense_strided_input(backend, variant):
    _check(backend, (2, 9, 5, 6), torch.float32, "strided", variant)
    _check(backend, (1, 12, 3, 4), torch.bfloat16, "strided", variant)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_grad_keeps_nothing_and_matches(backend, variant):
    """Without grad nothing is kept (cublas: the GELU runs over GEMM1's output); same values as with grad."""
    ts = _inputs((1, 20, 3, 5), torch.float32, "contiguous")
    with torch.no_grad():
        out = mixing_mlp(*ts, backend=backend, variant=variant)
        _, *saved = torch.ops.wuerstchen_fast.mixing_mlp(*ts, 1e-6, False, variant)
    assert all(t.numel() == 0 for t in saved)
    ts = [t.requires_grad_(True) for t in ts]
    torch.testing.assert_close(out, mixing_mlp(*ts, backend=backend, variant=variant).detach(), rtol=0, atol=0)


def test_variant_choice_and_table():
    from wuerstchen_fast.ops.mixing_mlp import choose_variant, record_variant

    x, w1 = _inputs((1, 8, 2, 2), torch.float32, "contiguous")[:2]
    assert choose_variant(x, w1) == "cublas"
    with pytest.raises(ValueError, match="variant"):
        record_variant("gpu", torch.bfloat16, 4, 8, 32, "bogus")
    with pytest.raises(ValueError, match="variant"):
        mixing_mlp(*_inputs((1, 8, 2, 2), torch.float32, "contiguous"), backend="torch", variant="bogus")


def test_fp64_gradcheck_reference_path():
    ts = [t.double().requires_grad_(True) for t in _inputs((1, 3, 2, 3), torch.float32, "contiguous")]
    assert torch.autograd.gradcheck(lambda *a: mixing_mlp(*a, backend="torch"), ts)


def test_reference_is_the_module_arithmetic():
    """The torch backend is exactly MixingResidualBlock's second branch, as diffusers writes it."""
    ts = _inputs((2, 8, 3, 4), torch.float32, "contiguous")
    x, w1, b1, w2, b2, s, t, g = ts
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(DEVICE)
    with torch.no_grad():
        for p, v in zip(mlp.parameters(), (w1, b1, w2, b2)):
            p.copy_(v)
        norm = torch.nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
        h = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + s) + t
        want = x + mlp(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g
        assert torch.equal(mixing_mlp(*ts, backend="torch"), want)


def test_explicit_triton_request_with_mixed_dtypes_fails_with_reasons():
    ts = _inputs((1, 4, 2, 2), torch.float32, "contiguous")
    ts[1] = ts[1].double()
    with pytest.raises(registry.BackendUnavailableError, match="one dtype"):
        mixing_mlp(*ts, backend="triton")
