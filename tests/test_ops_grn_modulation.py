"""grn and modulate (op families 6 and 2) on every backend that can run here, vs the float64 reference.

Outputs and input/weight gradients, float32/bfloat16/float16, released-like (C multiple of 64) and odd
channel counts, H, W including 1 and odd, contiguous, channels-last and non-dense strided inputs.
Error bound: wuerstchen_fast/testing/tolerance.py (at most 2x PyTorch's own error in that dtype).
Shapes stay small: Triton runs under its (slow) interpreter on CPU.
"""
import pytest
import torch

from conftest import DEVICE
from wuerstchen_fast.ops import grn, modulate, reference, registry
from wuerstchen_fast.testing.tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends(op):
    return [b for b in ("triton", "cpu", "cuda") if b in registry.get_op(op).impls
            and not registry.get_op(op).impls[b].available()]


def _grads(fn, inputs, grad):
    """(output, grads of every input) of fn at copies of inputs (float64 if asked)."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    return out, torch.autograd.grad(out, xs, grad)


def _compare(ours_fn, ref_fn, inputs, grad, what):
    exact = [t.detach().double() for t in inputs]
    ey, eg = _grads(ref_fn, exact, grad.double())
    ry, rg = _grads(ref_fn, inputs, grad)
    oy, og = _grads(ours_fn, inputs, grad)
    assert_close_to_reference(oy, ry, ey, what + " forward")
    for i, (o, r, e) in enumerate(zip(og, rg, eg)):
        assert_close_to_reference(o, r, e, f"{what} grad of input {i}")
    return oy


# --------------------------------------------------------------------------------------------- grn

GRN_SHAPES = [(2, 5, 7, 64), (1, 1, 1, 40), (2, 3, 3, 9), (3, 4, 1, 320)]


def _grn_inputs(shape, dtype, layout, pshape):
    g = torch.Generator().manual_seed(0)
    if layout == "strided":
        x = torch.randn(shape[:2] + (2 * shape[2],) + shape[3:], generator=g)[:, :, ::2]
    else:
        x = torch.randn(shape, generator=g)
    if layout == "nchw_permuted":  # the model's view: a contiguous (B, C, H, W) permuted to (B, H, W, C)
        x = torch.randn(shape[0], shape[3], shape[1], shape[2], generator=g).permute(0, 2, 3, 1)
    C = shape[3]
    gamma = torch.randn(pshape(C), generator=g) * 0.5
    beta = torch.randn(pshape(C), generator=g) * 0.5
    grad = torch.randn(shape, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, gamma, beta)], grad.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", _backends("grn"))
@pytest.mark.parametrize("shape", GRN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grn_matches_reference(backend, shape, dtype):
    inputs, grad = _grn_inputs(shape, dtype, "contiguous", lambda c: (1, 1, 1, c))
    _compare(lambda *a: grn(*a, backend=backend), reference.grn, inputs, grad, f"grn {backend} {shape} {dtype}")


@pytest.mark.parametrize("backend", _backends("grn"))
@pytest.mark.parametrize("layout", ["strided", "nchw_permuted"])
def test_grn_strided_inputs_and_flat_params(backend, layout):
    inputs, grad = _grn_inputs((2, 4, 3, 24), torch.float32, layout, lambda c: (c,))
    out = _compare(lambda *a: grn(*a, backend=backend), reference.grn, inputs, grad, f"grn {layout}")
    assert out.shape == inputs[0].shape


@pytest.mark.parametrize("backend", _backends("grn"))
def test_grn_zero_channel_norm_has_finite_grads(backend):
    # A channel that is zero everywhere has G = 0: torch.norm's gradient there is 0, so is ours.
    inputs, grad = _grn_inputs((1, 3, 3, 8), torch.float32, "contiguous", lambda c: (1, 1, 1, c))
    inputs[0][..., 2] = 0
    _compare(lambda *a: grn(*a, backend=backend), reference.grn, inputs, grad, "grn zero channel")


# ---------------------------------------------------------------------------------------- modulate

MOD_SHAPES = [(2, 64, 5, 7), (1, 9, 1, 1), (2, 40, 3, 1), (1, 320, 4, 4)]


def _mod_inputs(shape, dtype, layout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    if layout == "strided":
        x = torch.randn(shape[:3] + (2 * shape[3],), generator=g)[..., ::2]
    ab = torch.randn(shape[0], 2 * shape[1], generator=g) * 0.5
    grad = torch.randn(shape, generator=g)
    x = x.to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = ab.to(DEVICE, dtype).chunk(2, dim=1)
    return [x, a, b], grad.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", _backends("modulate"))
@pytest.mark.parametrize("shape", MOD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_modulate_matches_reference(backend, shape, dtype, layout):
    inputs, grad = _mod_inputs(shape, dtype, layout)
    out = _compare(lambda *a: modulate(*a, backend=backend), reference.modulate, inputs, grad,
                   f"modulate {backend} {shape} {dtype} {layout}")
    fmt = torch.channels_last if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1 \
        else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", _backends("modulate"))
def test_modulate_non_dense_strided(backend):
    inputs, grad = _mod_inputs((2, 9, 5, 6), torch.float32, "strided")
    _compare(lambda *a: modulate(*a, backend=backend), reference.modulate, inputs, grad, "modulate strided")


def test_auto_on_cpu_picks_the_reference():
    # auto must not pick the Triton interpreter, and keeps the reference on a CPU (bit-exact with diffusers).
    x = torch.randn(1, 4, 2, 2)
    a = torch.zeros(1, 4)
    assert registry.resolve("modulate", x, a, a) == "torch"
    assert registry.resolve("grn", x, torch.zeros(2), torch.zeros(2)) == "torch"


def test_bad_inputs_name_the_problem():
    with pytest.raises(registry.BackendUnavailableError, match=r"a and b need shape \(B, C\)"):
        modulate(torch.randn(2, 4, 3, 3), torch.zeros(2, 5), torch.zeros(2, 5), backend="triton")
    with pytest.raises(registry.BackendUnavailableError, match="gamma and beta need 4 elements"):
        grn(torch.randn(2, 3, 3, 4), torch.zeros(5), torch.zeros(5), backend="triton")


def test_fp64_gradcheck_references():
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: grn(*t, backend="torch"), (x, g, g.detach().clone().requires_grad_()))
    a = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    xm = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: modulate(*t, backend="torch"), (xm, a, a.detach().clone().requires_grad_()))


# ------------------------------------------------------------------- the extension's folded GELU
# The ResBlock feeds GRN the pre-activation and lets the extension apply GELU inside its kernels
# (gelu=True; on the CPU vectorised with at::vec erf/exp). Each kernel against GELU-then-kernel math:
# exact in float64, eager = PyTorch's F.gelu and arithmetic in the same dtype.
EXT_BACKENDS = [b for b in ("cpu", "cuda") if b in _backends("grn")]


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 70), (1, 1, 1, 13), (1, 4, 4, 64)], ids=lambda s: "x".join(map(str, s)))
def test_ext_gelu_folded_kernels(backend, dtype, shape):
    C_ = torch.ops.wuerstchen_fast_C
    g = torch.Generator().manual_seed(3)
    B, C = shape[0], shape[3]
    x = (torch.randn(shape, generator=g) * 2).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    sc, t = (torch.randn(B, C, generator=g).to(DEVICE) for _ in range(2))
    beta = torch.randn(C, generator=g).to(DEVICE)
    rows = lambda v: v.reshape(B, 1, 1, C)  # noqa: E731  (per-(b, c) parameters over the pixels)

    def gelu_and_grad(v):
        v = v.detach().requires_grad_(True)
        y = torch.nn.functional.gelu(v)
        return y.detach(), torch.autograd.grad(y, v, torch.ones_like(y))[0]

    (ge, gpe), (gx, gpx) = gelu_and_grad(x), gelu_and_grad(x.double())
    what = f"{backend} {dtype} {shape}"
    assert_close_to_reference(C_.grn_apply(x, sc, beta, True), (ge * rows(sc).to(dtype) + beta.to(dtype)),
                              gx * rows(sc).double() + beta.double(), what + " grn_apply")
    assert_close_to_reference(
        C_.grn_apply_backward(x, dy, sc, t, True), (dy * rows(sc).to(dtype) + ge * rows(t).to(dtype)) * gpe,
        (dy.double() * rows(sc).double() + gx * rows(t).double()) * gpx, what + " grn_apply_backward")
    sumsq, _ = C_.grn_colsum(x, None, True)
    assert_close_to_reference(sumsq.float(), (ge.float() ** 2).sum((1, 2)), (gx ** 2).sum((1, 2)), what + " colsum")
    ps, dsum = C_.grn_colsum(x, dy, True)
    assert_close_to_reference(ps.float(), (dy.float() * ge.float()).sum((1, 2)), (dy.double() * gx).sum((1, 2)),
                              what + " colsum dy")
    torch.testing.assert_close(dsum.cpu(), dy.double().sum((0, 1, 2)).cpu(), rtol=1e-12, atol=1e-12)  # float64 sums
