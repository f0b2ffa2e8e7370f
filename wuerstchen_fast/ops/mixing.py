"""norm_mod: Stage A's LayerNorm over channels + scalar modulation, LN(x)·(1 + s) + t, fwd and bwd.

    front op   torch.ops.wuerstchen_fast.norm_mod(x, scale, shift, eps, backend)   fake + autograd
    backward   torch.ops.wuerstchen_fast.norm_mod_backward(grad, x, scale, eps, backend) -> (dx, ds, dt)
    function   norm_mod(x, scale, shift, eps=1e-6, *, backend=None)

MixingResidualBlock runs it twice per block (before the depthwise conv and before the MLP); `scale`
and `shift` are 0-d slices of its `gammas`, read by the kernel from device memory. The `torch`
backend is the reference (bit-exact with diffusers' PaellaVQModel); Triton fuses the LayerNorm, the
modulation and, in backward, the two scalar reductions. Double backward: reference path only.
"""
from __future__ import annotations

import torch

from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["norm_mod"]


def _torch_fwd(x, scale, shift, eps):
    return empty_out_like(x).copy_(reference.mixing.norm_mod(x, scale, shift, eps))


def _torch_bwd(grad, x, scale, eps):
    with torch.enable_grad():
        xr, sr = x.detach().requires_grad_(True), scale.detach().requires_grad_(True)
        tr = torch.zeros_like(scale).requires_grad_(True)
        dx, ds, dt = torch.autograd.grad(reference.mixing.norm_mod(xr, sr, tr, eps), (xr, sr, tr), grad)
    return empty_out_like(x).copy_(dx), ds, dt


def _triton_fwd(x, scale, shift, eps):
    from ..kernels.triton import mixing as k

    return k.norm_mod_fwd(x, scale, shift, eps)


def _triton_bwd(grad, x, scale, eps):
    from ..kernels.triton import mixing as k

    dx, ds, dt = k.norm_mod_bwd(grad, x, scale, eps)
    return dx, ds.to(scale.dtype), dt.to(scale.dtype)


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd}


@torch.library.custom_op("wuerstchen_fast::norm_mod", mutates_args=())
def norm_mod_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _FWD[backend](x, scale, shift, eps)


@norm_mod_op.register_fake
def _(x, scale, shift, eps, backend):
    return empty_out_like(x)


@torch.library.custom_op("wuerstchen_fast::norm_mod_backward", mutates_args=())
def norm_mod_backward_op(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BWD[backend](grad, x, scale, eps)


@norm_mod_backward_op.register_fake
def _(grad, x, scale, eps, backend):
    return empty_out_like(x), scale.new_empty(()), scale.new_empty(())


def _setup_context(ctx, inputs, output):
    x, scale, shift, eps, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, ds, dt = norm_mod_backward_op(grad, x, scale, ctx.eps, ctx.backend)
    return dx, ds.reshape(scale.shape), dt.reshape(scale.shape), None, None


norm_mod_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ registry entry

def _check_torch(x, scale, shift, eps=1e-6):
    return bk.ndim(4, x) + bk.ndim(0, scale, shift)


def _check_triton(x, scale, shift, eps=1e-6):
    return _check_torch(x, scale, shift) + bk.float_dtype(x, scale, shift) + bk.for_triton(x, scale, shift)


def _samples(device="cpu"):
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, cl, dtype in [((2, 7, 5, 3), False, torch.float32), ((1, 32, 4, 4), True, torch.float32),
                             ((2, 16, 1, 5), False, torch.bfloat16), ((1, 8, 3, 3), False, torch.float16)]:
        x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        s, t = (torch.randn((), generator=g).to(dtype) for _ in range(2))
        out.append(((x.to(device).requires_grad_(True), s.to(device).requires_grad_(True),
                     t.to(device).requires_grad_(True), 1e-6), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    x, s, t, eps = args
    grad = torch.randn_like(x).detach()
    return [(norm_mod_op, (x, s, t, eps, backend), {}),
            (norm_mod_backward_op, (grad, x.detach(), s.detach(), eps, backend), {})]


SPEC = registry.OpSpec(
    name="norm_mod",
    doc="Stage A: LayerNorm over channels of (B, C, H, W), then x·(1 + s) + t with 0-d s, t",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    triton_modules=("wuerstchen_fast.kernels.triton.mixing",),
    priority={"cuda": ("triton", "torch"), "cpu": ("torch",)},
)
SPEC.add(registry.Impl("torch", reference.mixing.norm_mod, _check_torch, lambda: []))
SPEC.add(registry.Impl("triton", _triton_fwd, _check_triton, bk.triton_available))
registry.register_op(SPEC)


def norm_mod(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, *,
             backend: str | None = None) -> torch.Tensor:
    """LN over the channels of (B, C, H, W), no affine, then ·(1 + scale) + shift (0-d tensors).

    Equivalent code: `wuerstchen_fast.ops.reference.mixing.norm_mod`.
    """
    name = registry.resolve(SPEC, x, scale, shift, eps, backend=backend)
    if name == "torch":
        return reference.mixing.norm_mod(x, scale, shift, eps)
    return norm_mod_op(x, scale, shift, eps, name)
