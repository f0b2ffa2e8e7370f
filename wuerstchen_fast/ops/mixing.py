"""norm_mod: Stage A's LayerNorm over channels + scalar modulation, LN(x)·(1 + s) + t, fwd and bwd.

    front op   torch.ops.wuerstchen_fast.norm_mod(x, scale, shift, eps, backend)   fake + autograd
    backward   torch.ops.wuerstchen_fast.norm_mod_backward(grad, x, scale, eps, backend) -> (dx, ds, dt)
    function   norm_mod(x, scale, shift, eps=1e-6, *, backend=None)

MixingResidualBlock runs it twice per block (before the depthwise conv and before the MLP); `scale`
and `shift` are 0-d slices of its `gammas`, read by the kernel from device memory. The `torch`
backend is the reference (bit-exact with diffusers' PaellaVQModel); Triton fuses the LayerNorm, the
modulation and, in backward, the two scalar reductions; the `cpu` backend is the compiled extension's
LayerNorm (csrc/cpu/layer_norm_2d.cpp) with the modulation folded in, the `cuda` backend its CUDA
kernels (kernels/cuda/mixing.cu). Double backward: reference path only.

mixing_dwconv(x, xn, weight, bias, gamma) (second half of this file): x + depthwise(xn)·gamma, the
replication-padded 3x3 depthwise conv + bias + gamma scale + residual that follows norm_mod.
The block's other branch, LN + modulation + MLP + gamma + residual, is one op of its own: mixing_mlp.py.
"""
from __future__ import annotations

import torch

from .._extension import extension
from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["norm_mod", "mixing_dwconv"]


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


def _ext_fwd(x, scale, shift, eps):  # the C++ op dispatches on the device: CPU or CUDA kernel
    return torch.ops.wuerstchen_fast_C.norm_mod(x, scale, shift, eps)


def _ext_bwd(grad, x, scale, eps):
    return torch.ops.wuerstchen_fast_C.norm_mod_backward(grad, x, scale, eps)


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"torch": _torch_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


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

if extension() is not None and hasattr(torch.ops.wuerstchen_fast_C, "norm_mod"):
    torch.library.register_fake("wuerstchen_fast_C::norm_mod")(lambda x, s, t, eps: empty_out_like(x))
    torch.library.register_fake("wuerstchen_fast_C::norm_mod_backward")(
        lambda g, x, s, eps: (empty_out_like(x), s.new_empty(()), s.new_empty(())))


# ------------------------------------------------------------------------------ registry entry

def _check_torch(x, scale, shift, eps=1e-6):
    return bk.ndim(4, x) + bk.ndim(0, scale, shift)


def _check_triton(x, scale, shift, eps=1e-6):
    return _check_torch(x, scale, shift) + bk.float_dtype(x, scale, shift) + bk.for_triton(x, scale, shift)


def _check_ext(device):  # the extension's backends, "cpu" and "cuda"
    def check(x, scale, shift, eps=1e-6):
        return _check_torch(x, scale, shift) + bk.float_dtype(x, scale, shift) + bk.on_device(device, x, scale, shift)
    return check


def _has_kernel(op, device):
    """Whether the loaded extension registers a kernel of `op` for the device (read once, at import)."""
    if extension() is None or not hasattr(torch.ops.wuerstchen_fast_C, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"wuerstchen_fast_C::{op}", device.upper())


def _ext_available(device, op="norm_mod"):
    has = _has_kernel(op, device)

    def available():
        r = bk.cpu_ext_available() if device == "cpu" else bk.cuda_ext_available()
        if not r and not has:
            r = [f"wuerstchen_fast._C predates the {device} kernel of {op}; rebuild it "
                 "(pip install --no-build-isolation -e .)"]
        return r
    return available


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
    cases = [(norm_mod_op, (x, s, t, eps, backend), {}),
             (norm_mod_backward_op, (grad, x.detach(), s.detach(), eps, backend), {})]
    if backend in ("cpu", "cuda"):
        cases += [(torch.ops.wuerstchen_fast_C.norm_mod.default, (x.detach(), s.detach(), t.detach(), eps), {}),
                  (torch.ops.wuerstchen_fast_C.norm_mod_backward.default, (grad, x.detach(), s.detach(), eps), {})]
    return cases


SPEC = registry.OpSpec(
    name="norm_mod",
    doc="Stage A: LayerNorm over channels of (B, C, H, W), then x·(1 + s) + t with 0-d s, t",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    triton_modules=("wuerstchen_fast.kernels.triton.mixing",),
    # cpu: the reference first, so that auto on a CPU stays bit-exact with diffusers (tests/test_models_stages.py);
    # the extension is faster at every released shape (bench/bench_ops_ext.py) and runs with backend="cpu".
    # cuda: the CUDA kernels (backend="cuda") are not in auto's order until measured on a GPU.
    priority={"cuda": ("triton", "torch"), "cpu": ("torch", "cpu")},
)
SPEC.add(registry.Impl("torch", reference.mixing.norm_mod, _check_torch, lambda: []))
SPEC.add(registry.Impl("triton", _triton_fwd, _check_triton, bk.triton_available))
for _dev in ("cpu", "cuda"):
    SPEC.add(registry.Impl(_dev, lambda x, s, t, eps=1e-6, _d=_dev: norm_mod_op(x, s, t, eps, _d), _check_ext(_dev),
                           _ext_available(_dev)))
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


# ============================================================================== mixing_dwconv
# x + depthwise(xn)·g: the replication-padded 3x3 depthwise conv + bias + gamma scale + residual that
# follows norm_mod in MixingResidualBlock. One Triton kernel forward; backward one kernel for dxn (the
# transposed conv with the pad's border fold) that also writes the per-tile sums dweight, dbias and
# dgamma are reduced from; dx is the incoming gradient (the residual). The `cpu` backend is
# csrc/cpu/mixing_dwconv.cpp (per-plane padded tiles, at::vec; dgamma from the dweight/dbias sums),
# the `cuda` backend kernels/cuda/mixing.cu (NCHW planes, the same sums).

def _dw_torch_fwd(x, xn, weight, bias, gamma):
    return empty_out_like(x).copy_(reference.mixing.dwconv_residual(x, xn, weight, bias, gamma))


def _dw_torch_bwd(grad, xn, weight, bias, gamma):
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (xn, weight, bias, gamma)]
        zero = torch.zeros_like(grad)
        dxn, dw, db, dg = torch.autograd.grad(reference.mixing.dwconv_residual(zero, *leaves), leaves, grad)
    return empty_out_like(xn).copy_(dxn), dw, db, dg


def _dw_triton_fwd(x, xn, weight, bias, gamma):
    from ..kernels.triton import mixing as k

    return k.dwconv_fwd(x, xn, weight, bias, gamma)


def _dw_triton_bwd(grad, xn, weight, bias, gamma):
    from ..kernels.triton import mixing as k

    dxn, dw, db, dg = k.dwconv_bwd(grad, xn, weight, bias, gamma)
    return dxn, dw.to(weight.dtype), db.to(bias.dtype), dg.to(gamma.dtype)


def _dw_ext_fwd(x, xn, weight, bias, gamma):
    return torch.ops.wuerstchen_fast_C.mixing_dwconv(x, xn, weight, bias, gamma)


def _dw_ext_bwd(grad, xn, weight, bias, gamma):
    return torch.ops.wuerstchen_fast_C.mixing_dwconv_backward(grad, xn, weight, bias, gamma)


_DW_FWD = {"torch": _dw_torch_fwd, "triton": _dw_triton_fwd, "cpu": _dw_ext_fwd, "cuda": _dw_ext_fwd}
_DW_BWD = {"torch": _dw_torch_bwd, "triton": _dw_triton_bwd, "cpu": _dw_ext_bwd, "cuda": _dw_ext_bwd}


@torch.library.custom_op("wuerstchen_fast::mixing_dwconv", mutates_args=())
def mixing_dwconv_op(x: torch.Tensor, xn: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     gamma: torch.Tensor, backend: str) -> torch.Tensor:
    return _DW_FWD[backend](x, xn, weight, bias, gamma)


@mixing_dwconv_op.register_fake
def _(x, xn, weight, bias, gamma, backend):
    return empty_out_like(x)


@torch.library.custom_op("wuerstchen_fast::mixing_dwconv_backward", mutates_args=())
def mixing_dwconv_backward_op(grad: torch.Tensor, xn: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              gamma: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    return _DW_BWD[backend](grad, xn, weight, bias, gamma)


@mixing_dwconv_backward_op.register_fake
def _(grad, xn, weight, bias, gamma, backend):
    return empty_out_like(xn), torch.empty_like(weight), torch.empty_like(bias), gamma.new_empty(())


def _dw_setup_context(ctx, inputs, output):
    x, xn, weight, bias, gamma, backend = inputs
    ctx.save_for_backward(xn, weight, bias, gamma)
    ctx.backend = backend


def _dw_backward(ctx, grad):
    xn, weight, bias, gamma = ctx.saved_tensors
    dxn, dw, db, dg = mixing_dwconv_backward_op(grad, xn, weight, bias, gamma, ctx.backend)
    return grad, dxn, dw, db, dg.reshape(gamma.shape), None


mixing_dwconv_op.register_autograd(_dw_backward, setup_context=_dw_setup_context)

if extension() is not None and hasattr(torch.ops.wuerstchen_fast_C, "mixing_dwconv"):
    torch.library.register_fake("wuerstchen_fast_C::mixing_dwconv")(lambda x, xn, w, b, g: empty_out_like(x))
    torch.library.register_fake("wuerstchen_fast_C::mixing_dwconv_backward")(
        lambda grad, xn, w, b, g: (empty_out_like(xn), torch.empty_like(w), torch.empty_like(b), g.new_empty(())))


def _dw_check_torch(x, xn, weight, bias, gamma):
    r = bk.ndim(4, x, xn) + bk.ndim(0, gamma)
    if not r and (x.shape != xn.shape or tuple(weight.shape) != (x.shape[1], 1, 3, 3)):
        r.append(f"needs x and xn of one shape (B, C, H, W) and a (C, 1, 3, 3) weight; got x {tuple(x.shape)}, "
                 f"xn {tuple(xn.shape)}, weight {tuple(weight.shape)}")
    return r


def _dw_check_triton(x, xn, weight, bias, gamma):
    tensors = (x, xn, weight, bias, gamma)
    r = _dw_check_torch(*tensors) + bk.float_dtype(*tensors) + bk.for_triton(*tensors)
    if len({t.dtype for t in tensors}) > 1:
        r.append("needs every tensor in one dtype (cast the module with .to(dtype))")
    return r


def _dw_check_ext(device):
    def check(x, xn, weight, bias, gamma):
        tensors = (x, xn, weight, bias, gamma)
        return _dw_check_torch(*tensors) + bk.float_dtype(*tensors) + bk.on_device(device, *tensors)
    return check


def _dw_samples(device="cpu"):
    g = torch.Generator().manual_seed(1)
    out = []
    for (B, C, H, W), cl, dtype in [((2, 5, 4, 3), False, torch.float32), ((1, 16, 3, 3), True, torch.float32),
                                    ((2, 8, 1, 5), False, torch.bfloat16), ((1, 6, 2, 2), False, torch.float16)]:
        x, xn = (torch.randn(B, C, H, W, generator=g).to(dtype) for _ in range(2))
        if cl:
            x, xn = (t.contiguous(memory_format=torch.channels_last) for t in (x, xn))
        w = (torch.randn(C, 1, 3, 3, generator=g) / 3).to(dtype)
        b, gm = (torch.randn(C, generator=g) * 0.3).to(dtype), torch.randn((), generator=g).to(dtype)
        out.append((tuple(t.to(device).requires_grad_(True) for t in (x, xn, w, b, gm)), {}))
    return out


def _dw_opcheck_cases(args, kwargs, backend):
    x, xn, w, b, g = args
    grad = torch.randn_like(x).detach()
    cases = [(mixing_dwconv_op, (x, xn, w, b, g, backend), {}),
             (mixing_dwconv_backward_op, (grad, xn.detach(), w.detach(), b.detach(), g.detach(), backend), {})]
    if backend in ("cpu", "cuda"):
        plain = tuple(t.detach() for t in (x, xn, w, b, g))
        cases += [(torch.ops.wuerstchen_fast_C.mixing_dwconv.default, plain, {}),
                  (torch.ops.wuerstchen_fast_C.mixing_dwconv_backward.default, (grad,) + plain[1:], {})]
    return cases


DW_SPEC = registry.OpSpec(
    name="mixing_dwconv",
    doc="Stage A: x + depthwise(xn)·g, depthwise = replication pad 1 + 3x3 depthwise conv + bias, 0-d g",
    samples=_dw_samples,
    opcheck_cases=_dw_opcheck_cases,
    triton_modules=("wuerstchen_fast.kernels.triton.mixing",),
    # cpu: the reference first, so that auto on a CPU stays bit-exact with diffusers (tests/test_models_stages.py);
    # the extension is faster at every released shape (bench/bench_ops_ext.py) and runs with backend="cpu".
    # cuda: the CUDA kernels (backend="cuda") are not in auto's order until measured on a GPU.
    priority={"cuda": ("triton", "torch"), "cpu": ("torch", "cpu")},
)
DW_SPEC.add(registry.Impl("torch", reference.mixing.dwconv_residual, _dw_check_torch, lambda: []))
DW_SPEC.add(registry.Impl("triton", lambda x, xn, w, b, g: mixing_dwconv_op(x, xn, w, b, g, "triton"), _dw_check_triton,
                           bk.triton_available))
for _dev in ("cpu", "cuda"):
    DW_SPEC.add(registry.Impl(_dev, lambda x, xn, w, b, g, _d=_dev: mixing_dwconv_op(x, xn, w, b, g, _d),
                               _dw_check_ext(_dev), _ext_available(_dev, "mixing_dwconv")))
registry.register_op(DW_SPEC)


def mixing_dwconv(x: torch.Tensor, xn: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """x + (conv3x3_depthwise(replication_pad(xn, 1)) + bias)·gamma; weight (C, 1, 3, 3), gamma 0-d.

    Equivalent code: `wuerstchen_fast.ops.reference.mixing.dwconv_residual`.
    """
    name = registry.resolve(DW_SPEC, x, xn, weight, bias, gamma, backend=backend)
    if name == "torch":
        return reference.mixing.dwconv_residual(x, xn, weight, bias, gamma)
    return mixing_dwconv_op(x, xn, weight, bias, gamma, name)
