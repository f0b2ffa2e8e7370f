"""dwconv_ln: depthwise conv + bias + LayerNorm2d, the first half of the ConvNeXt ResBlocks (op family 1).

    dwconv_ln(x, weight, bias, eps=1e-6, *, backend=None) -> (B, C, H, W), channels-last strided

Layers as in layer_norm_2d.py: reference (`reference.dwconv_ln`, the `torch` backend; the ResBlock
references call it) -> kernels (csrc/cpu/dwconv_ln.cpp, kernels/cuda/dwconv_ln.cu: 3x3, one input per
group; kernels/triton/resblock.py's `_dwconv_ln` / `_ln_bwd` / `_dwconv_bwd`: any odd k and grouped
inputs) -> front op `wuerstchen_fast::dwconv_ln(x, weight, bias, eps, backend)` with fake and autograd;
its backward `wuerstchen_fast::dwconv_ln_backward -> (dx, dweight, dbias)` recomputes the conv and the
statistics from x (cheap: 9 taps per value) rather than saving them. Output and dx are channels-last,
as the reference's LayerNorm2d permutes make them. Double backward is not supported by fused backends.
"""
from __future__ import annotations

import torch

from .._extension import extension
from . import backends as bk
from . import reference, registry

__all__ = ["dwconv_ln"]

_EXT = ("cpu", "cuda")


def _empty_cl(x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    B, C, H, W = x.shape
    return torch.empty(B, channels or C, H, W, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ backend kernels

def _torch_fwd(x, weight, bias, eps):
    return _empty_cl(x, weight.shape[0]).copy_(reference.dwconv_ln(x, weight, bias, eps))


def _torch_bwd(grad, x, weight, bias, eps):
    with torch.enable_grad():
        xr, wr, br = (t.detach().requires_grad_(True) for t in (x, weight, bias))
        dx, dw, db = torch.autograd.grad(reference.dwconv_ln(xr, wr, br, eps), (xr, wr, br), grad)
    return _empty_cl(x).copy_(dx), dw.contiguous(), db.contiguous()


def _triton_split(x, weight):
    """x (B, C·KG, H, W) as the Triton kernels take it: the first C channels and the rest as `skip`."""
    C = weight.shape[0]
    return (x, None) if weight.shape[1] == 1 else (x[:, :C], x[:, C:])


def _triton_fwd(x, weight, bias, eps):
    from ..kernels.triton import resblock as k

    B, _, H, W = x.shape
    xx, skip = _triton_split(x, weight)
    xn, _ = k.dwconv_ln(xx, skip, weight, bias, eps)
    return xn.view(B, H, W, -1).permute(0, 3, 1, 2)


def _triton_bwd(grad, x, weight, bias, eps):
    from ..kernels.triton import resblock as k

    B, _, H, W = x.shape
    C = weight.shape[0]
    xx, skip = _triton_split(x, weight)
    # xn recomputed (as the extension's backward does) in float32: a bfloat16 xn costs the gradients accuracy
    f32 = [t.float() if t is not None else None for t in (xx, skip, weight, bias)]
    xn, rstd = k.dwconv_ln(*f32, eps)
    dd = k.ln_bwd(grad.permute(0, 2, 3, 1).reshape(-1, C).contiguous(), xn, rstd)  # row-major (M, C) rows
    dx = _empty_cl(x)
    zero = x.new_zeros(()).expand(xx.shape)  # no residual gradient to add
    dwd, dbd = k.dwconv_bwd(dd, xx, skip, weight, zero, dx[:, :C], dx[:, C:] if skip is not None else None)
    return dx, dwd.to(weight.dtype), dbd.to(bias.dtype)  # contiguous, like every backend's


def _ext_fwd(x, weight, bias, eps):  # the C++ op dispatches on the device: CPU or CUDA kernel
    return torch.ops.wuerstchen_fast_C.dwconv_ln(x, weight, bias, eps)


def _ext_bwd(grad, x, weight, bias, eps):
    return torch.ops.wuerstchen_fast_C.dwconv_ln_backward(grad, x, weight, bias, eps)


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ------------------------------------------------------------------------------ front ops

@torch.library.custom_op("wuerstchen_fast::dwconv_ln", mutates_args=())
def dwconv_ln_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _FWD[backend](x, weight, bias, eps)


@dwconv_ln_op.register_fake
def _(x, weight, bias, eps, backend):
    return _empty_cl(x, weight.shape[0])


@torch.library.custom_op("wuerstchen_fast::dwconv_ln_backward", mutates_args=())
def dwconv_ln_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BWD[backend](grad, x, weight, bias, eps)


@dwconv_ln_backward_op.register_fake
def _(grad, x, weight, bias, eps, backend):
    return _empty_cl(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = dwconv_ln_backward_op(grad, x, weight, bias, ctx.eps, ctx.backend)
    return dx, dw, db, None, None


dwconv_ln_op.register_autograd(_backward, setup_context=_setup_context)

if extension() is not None:
    torch.library.register_fake("wuerstchen_fast_C::dwconv_ln")(lambda x, w, b, eps: _empty_cl(x, w.shape[0]))
    torch.library.register_fake("wuerstchen_fast_C::dwconv_ln_backward")(
        lambda g, x, w, b, eps: (_empty_cl(x), w.new_empty(w.shape), b.new_empty(b.shape)))


# ------------------------------------------------------------------------------ registry entry

def _check_common(x, weight, bias):
    reasons = bk.ndim(4, x, weight) + bk.ndim(1, bias) + bk.float_dtype(x, weight, bias)
    if reasons:
        return reasons
    C, kg = weight.shape[0], weight.shape[1]
    if x.shape[1] != C * kg or bias.shape[0] != C:
        reasons.append(f"x with {x.shape[1]} channels needs weight (C, {x.shape[1]} / C, k, k) and bias (C,), got "
                       f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    return reasons


def _check_ext(device):
    def check(x, weight, bias, eps=1e-6):
        reasons = _check_common(x, weight, bias)
        if not reasons and tuple(weight.shape[1:]) != (1, 3, 3):
            reasons.append(f"the extension kernels are 3x3 depthwise (weight (C, 1, 3, 3)), got {tuple(weight.shape)}")
        return reasons + bk.on_device(device, x, weight, bias)
    return check


def _check_triton(x, weight, bias, eps=1e-6):
    reasons = _check_common(x, weight, bias)
    if not reasons and weight.shape[-1] % 2 == 0:
        reasons.append(f"needs an odd kernel size, got {weight.shape[-1]}")
    return reasons + bk.for_triton(x, weight, bias)


def _samples(device="cpu"):
    """Inputs for opcheck and compile tests: odd channels, 1-pixel rows, both layouts, each dtype."""
    g = torch.Generator().manual_seed(0)
    out = []
    for (B, C, H, W), cl, dtype in [((2, 7, 5, 3), False, torch.float32), ((1, 16, 4, 4), True, torch.float32),
                                    ((2, 8, 1, 5), False, torch.bfloat16), ((1, 8, 3, 3), True, torch.float16)]:
        x = (torch.randn(B, C, H, W, generator=g) + 0.5).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(C, 1, 3, 3, generator=g) / 3).to(dtype)
        b = (torch.randn(C, generator=g) * 0.3).to(dtype)
        out.append(((x.to(device).requires_grad_(True), w.to(device).requires_grad_(True),
                     b.to(device).requires_grad_(True), 1e-6), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    x, w, b, eps = args
    grad = torch.randn(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last)
    d = [t.detach() for t in (x, w, b)]
    cases = [(dwconv_ln_op, (x, w, b, eps, backend), {}), (dwconv_ln_backward_op, (grad, *d, eps, backend), {})]
    if backend in _EXT:
        C_ = torch.ops.wuerstchen_fast_C
        cases += [(C_.dwconv_ln.default, (*d, eps), {}), (C_.dwconv_ln_backward.default, (grad, *d, eps), {})]
    return cases


SPEC = registry.OpSpec(
    name="dwconv_ln",
    doc="depthwise conv (zero pad) + bias + LayerNorm2d, the ConvNeXt ResBlocks' first half",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    # cpu: the reference first, so that auto on a CPU stays bit-exact with diffusers (tests/test_models_stages.py);
    # the extension is faster at every released shape (bench/bench_ops_ext.py) and runs with backend="cpu".
    priority={"cuda": ("cuda", "triton", "torch"), "cpu": ("torch", "cpu")},
    triton_modules=("wuerstchen_fast.kernels.triton.resblock",),
)
SPEC.add(registry.Impl("torch", reference.dwconv_ln, lambda x, *a, **k: bk.ndim(4, x), lambda: []))
SPEC.add(registry.Impl("triton", lambda x, w, b, eps=1e-6: dwconv_ln_op(x, w, b, eps, "triton"), _check_triton,
                       bk.triton_available))
for _dev, _avail in (("cpu", bk.cpu_ext_available), ("cuda", bk.cuda_ext_available)):
    SPEC.add(registry.Impl(_dev, lambda x, w, b, eps=1e-6, _d=_dev: dwconv_ln_op(x, w, b, eps, _d), _check_ext(_dev),
                           _avail))
registry.register_op(SPEC)


def dwconv_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, *,
              backend: str | None = None) -> torch.Tensor:
    """Depthwise conv (groups = weight.shape[0], zero padding k // 2) + bias, then LayerNorm over channels.

    Equivalent code: `wuerstchen_fast.ops.reference.dwconv_ln`. `backend` overrides the registry's choice.
    """
    name = registry.resolve(SPEC, x, weight, bias, eps, backend=backend)
    if name == "torch":
        return reference.dwconv_ln(x, weight, bias, eps)
    return dwconv_ln_op(x, weight, bias, eps, name)
