"""layer_norm_2d: LayerNorm over the channels of a (B, C, H, W) tensor, no affine (Würstchen's LayerNorm2d).

Layers, bottom up (the pattern every op of the library follows):
    kernels      kernels/triton/layer_norm_2d.py, csrc/cpu/layer_norm_2d.cpp, kernels/cuda/layer_norm_2d.cu
    C++ ops      torch.ops.wuerstchen_fast_C.layer_norm_2d{,_backward}   (fake impls registered here)
    front op     torch.ops.wuerstchen_fast.layer_norm_2d(x, eps, backend)  custom op: fake + autograd
    function     layer_norm_2d(x, eps=1e-6, *, backend=None)               resolves the backend, calls
The `torch` backend calls the reference directly (plain PyTorch: autograd and Inductor see through
it); every other backend goes through the front op, whose backward is the matching backward kernel.
Backward recomputes the statistics from x; double backward is not supported by the fused backends.
"""
from __future__ import annotations

import torch

from .._extension import extension
from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["layer_norm_2d"]


# ------------------------------------------------------------------------------ backend kernels

def _torch_fwd(x, eps):  # the reference, with the output layout every backend follows
    return empty_out_like(x).copy_(reference.layer_norm_2d(x, eps))


def _torch_bwd(grad, x, eps):
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (dx,) = torch.autograd.grad(reference.layer_norm_2d(xr, eps), xr, grad)
    return empty_out_like(x).copy_(dx)


def _triton_fwd(x, eps):
    from ..kernels.triton import layer_norm_2d as k

    return k.layer_norm_2d_fwd(x, eps)


def _triton_bwd(grad, x, eps):
    from ..kernels.triton import layer_norm_2d as k

    return k.layer_norm_2d_bwd(grad, x, eps)


def _ext_fwd(x, eps):  # the C++ op dispatches on the device: CPU or CUDA kernel
    return torch.ops.wuerstchen_fast_C.layer_norm_2d(x, eps)


def _ext_bwd(grad, x, eps):
    return torch.ops.wuerstchen_fast_C.layer_norm_2d_backward(grad, x, eps)


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ------------------------------------------------------------------------------ front ops

@torch.library.custom_op("wuerstchen_fast::layer_norm_2d", mutates_args=())
def layer_norm_2d_op(x: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _FWD[backend](x, eps)


@layer_norm_2d_op.register_fake
def _(x, eps, backend):
    return empty_out_like(x)


@torch.library.custom_op("wuerstchen_fast::layer_norm_2d_backward", mutates_args=())
def layer_norm_2d_backward_op(grad: torch.Tensor, x: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _BWD[backend](grad, x, eps)


@layer_norm_2d_backward_op.register_fake
def _(grad, x, eps, backend):
    return empty_out_like(x)


def _setup_context(ctx, inputs, output):
    x, eps, backend = inputs
    ctx.save_for_backward(x)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return layer_norm_2d_backward_op(grad, x, ctx.eps, ctx.backend), None, None


layer_norm_2d_op.register_autograd(_backward, setup_context=_setup_context)

if extension() is not None:
    torch.library.register_fake("wuerstchen_fast_C::layer_norm_2d")(lambda x, eps: empty_out_like(x))
    torch.library.register_fake("wuerstchen_fast_C::layer_norm_2d_backward")(lambda g, x, eps: empty_out_like(x))


# ------------------------------------------------------------------------------ registry entry

def _check(x, eps=1e-6):
    return bk.ndim(4, x) + bk.float_dtype(x)


def _samples(device="cpu"):
    """Inputs for opcheck and compile tests: layouts, odd sizes, each dtype."""
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, cl, dtype in [((2, 7, 5, 3), False, torch.float32), ((1, 32, 4, 4), True, torch.float32),
                             ((2, 16, 1, 5), False, torch.bfloat16), ((1, 8, 3, 3), True, torch.float16)]:
        x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(((x.to(device).requires_grad_(True), 1e-6), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    x, eps = args
    grad = torch.randn_like(x).detach()
    cases = [(layer_norm_2d_op, (x, eps, backend), {}),
             (layer_norm_2d_backward_op, (grad, x.detach(), eps, backend), {})]
    if backend in ("cpu", "cuda"):
        cases += [(torch.ops.wuerstchen_fast_C.layer_norm_2d.default, (x.detach(), eps), {}),
                  (torch.ops.wuerstchen_fast_C.layer_norm_2d_backward.default, (grad, x.detach(), eps), {})]
    return cases


SPEC = registry.OpSpec(
    name="layer_norm_2d",
    doc="LayerNorm over channels of (B, C, H, W), no affine",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    triton_modules=("wuerstchen_fast.kernels.triton.layer_norm_2d",),
)
SPEC.add(registry.Impl("torch", reference.layer_norm_2d, lambda x, eps=1e-6: bk.ndim(4, x), lambda: []))
SPEC.add(registry.Impl("triton", _triton_fwd, lambda x, eps=1e-6: _check(x) + bk.for_triton(x), bk.triton_available))
SPEC.add(registry.Impl("cpu", _ext_fwd, lambda x, eps=1e-6: _check(x) + bk.on_device("cpu", x), bk.cpu_ext_available))
SPEC.add(registry.Impl("cuda", _ext_fwd, lambda x, eps=1e-6: _check(x) + bk.on_device("cuda", x), bk.cuda_ext_available))
registry.register_op(SPEC)


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the channels of a (B, C, H, W) tensor, no affine.

    Equivalent code: `wuerstchen_fast.ops.reference.layer_norm_2d`. `backend` overrides the
    registry's choice for this call ("torch", "triton", "cpu", "cuda", a list, or "auto").
    """
    name = registry.resolve(SPEC, x, eps, backend=backend)
    if name == "torch":
        return reference.layer_norm_2d(x, eps)
    return layer_norm_2d_op(x, eps, name)
