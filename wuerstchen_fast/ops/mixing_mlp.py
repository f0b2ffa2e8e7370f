"""mixing_mlp: Stage A MixingResidualBlock's second branch, x + MLP(LN(x)·(1 + s) + t)·g, fwd and bwd.

    front op   torch.ops.wuerstchen_fast.mixing_mlp(x, w1, b1, w2, b2, scale, shift, gamma, eps, keep,
                   variant) -> (out, xn, h, a, y)                                         fake + autograd
    backward   torch.ops.wuerstchen_fast.mixing_mlp_backward(grad, x, w1, b1, w2, b2, scale, gamma, xn, h,
                   a, y, eps) -> (dx, dw1, db1, dw2, db2, dscale, dshift, dgamma)
    function   mixing_mlp(x, w1, b1, w2, b2, scale, shift, gamma, eps=1e-6, *, backend=None, variant=None)

MLP = [Linear(c, n), GELU, Linear(n, c)] applied channels-last; scale, shift, gamma are the 0-d slices
gammas[3], [4], [5] of the block, read by the kernels from device memory. Every input gets a gradient
(x, both Linears' weights and biases, and the three scalars).

The `torch` backend is the reference (`reference.mixing.mlp_residual`, bit-exact with diffusers'
PaellaVQModel). The `triton` backend (kernels/triton/mixing_mlp.py) runs the norm_mod kernel writing the
normalised rows the first GEMM reads, the two GEMMs on cuBLAS (torch.mm), bias + GELU in one Triton pass
after GEMM1 and bias + gamma + residual in one after GEMM2; backward mirrors it. The extra outputs xn, h
(GEMM1 before its bias), a (the GELU) and y (GEMM2 before its bias) are what the backward reads; the
public function asks for them (`keep`) only when a gradient will be needed, else the GELU runs in place
and they come back empty. Double backward: reference path only.

The triton backend has two forward variants (the backward is shared): "cublas" (above) and "triton_gemm"
(Triton GEMMs with the bias + GELU and the bias + gamma + residual passes in their epilogues, so GEMM1's
and GEMM2's raw outputs never round-trip through memory). `choose_variant` picks: a measured table
(`VARIANT_TABLE`, filled from a GPU run of bench/bench_ops_ddpm_mixing.py via `record_variant`) first,
else "cublas" (no GPU measurement exists yet to justify another default).
"""
from __future__ import annotations

import torch

from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["mixing_mlp", "choose_variant", "record_variant", "VARIANTS", "VARIANT_TABLE"]

VARIANTS = ("cublas", "triton_gemm")
# (device name, dtype, B*H*W, C, N) -> variant, from measurements (bench/bench_ops_ddpm_mixing.py).
VARIANT_TABLE: dict = {}


def record_variant(device_name: str, dtype: torch.dtype, M: int, C: int, N: int, variant: str) -> None:
    """Store the faster variant measured at this shape (the hook for measurement-based selection)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    VARIANT_TABLE[(device_name, dtype, M, C, N)] = variant


def choose_variant(x: torch.Tensor, w1: torch.Tensor) -> str:
    """The measured choice if recorded for this device and shape, else "cublas"."""
    if VARIANT_TABLE and x.device.type == "cuda":
        B, C, H, W = x.shape
        hit = VARIANT_TABLE.get((torch.cuda.get_device_name(x.device), x.dtype, B * H * W, C, w1.shape[0]))
        if hit is not None:
            return hit
    return "cublas"


def _k():
    from ..kernels.triton import mixing_mlp

    return mixing_mlp


@torch.library.custom_op("wuerstchen_fast::mixing_mlp", mutates_args=())
def mixing_mlp_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                  scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor, eps: float, keep: bool,
                  variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k().mlp_fwd(x, w1, b1, w2, b2, scale, shift, gamma, eps, keep, variant)


@mixing_mlp_op.register_fake
def _(x, w1, b1, w2, b2, scale, shift, gamma, eps, keep, variant):
    B, C, H, W = x.shape
    M, N = B * H * W, w1.shape[0]
    if keep:
        return empty_out_like(x), x.new_empty(M, C), x.new_empty(M, N), x.new_empty(M, N), x.new_empty(M, C)
    return empty_out_like(x), x.new_empty(0), x.new_empty(0), x.new_empty(0), x.new_empty(0)


@torch.library.custom_op("wuerstchen_fast::mixing_mlp_backward", mutates_args=())
def mixing_mlp_backward_op(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                           w2: torch.Tensor, b2: torch.Tensor, scale: torch.Tensor, gamma: torch.Tensor,
                           xn: torch.Tensor, h: torch.Tensor, a: torch.Tensor, y: torch.Tensor,
                           eps: float) -> list[torch.Tensor]:
    dx, dw1, db1, dw2, db2, ds, dt, dg = _k().mlp_bwd(grad, x, w1, b1, w2, b2, scale, gamma, xn, h, a, y, eps)
    return [dx, dw1, db1.to(b1.dtype), dw2, db2.to(b2.dtype), ds.to(scale.dtype), dt.to(scale.dtype),
            dg.to(gamma.dtype)]


@mixing_mlp_backward_op.register_fake
def _(grad, x, w1, b1, w2, b2, scale, gamma, xn, h, a, y, eps):
    return [empty_out_like(x), torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2),
            scale.new_empty(()), scale.new_empty(()), gamma.new_empty(())]


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, scale, shift, gamma, eps, keep, variant = inputs
    out, xn, h, a, y = output
    ctx.save_for_backward(x, w1, b1, w2, b2, scale, gamma, xn, h, a, y)
    ctx.mark_non_differentiable(xn, h, a, y)
    ctx.eps, ctx.keep = eps, keep


def _backward(ctx, grad, *_unused):
    if not ctx.keep:
        raise RuntimeError("mixing_mlp ran with keep=False (no activations saved) but a gradient was asked for; "
                           "call the public ops.mixing_mlp, which keeps them whenever an input requires grad")
    x, w1, b1, w2, b2, scale, gamma, xn, h, a, y = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, ds, dt, dg = mixing_mlp_backward_op(grad, x, w1, b1, w2, b2, scale, gamma, xn, h, a, y,
                                                                ctx.eps)
    return (dx, dw1, db1, dw2, db2, ds.reshape(scale.shape), dt.reshape(scale.shape), dg.reshape(gamma.shape),
            None, None, None)


mixing_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ registry entry

def _check_torch(x, w1, b1, w2, b2, scale, shift, gamma, eps=1e-6):
    r = bk.ndim(4, x) + bk.ndim(0, scale, shift, gamma)
    if not r:
        C, N = x.shape[1], w1.shape[0]
        if (tuple(w1.shape) != (N, C) or tuple(b1.shape) != (N,) or tuple(w2.shape) != (C, N)
                or tuple(b2.shape) != (C,)):
            r.append(f"needs w1 (N, C), b1 (N,), w2 (C, N), b2 (C,) for x with C = {C} channels; got w1 "
                     f"{tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    return r


def _check_triton(x, w1, b1, w2, b2, scale, shift, gamma, eps=1e-6):
    tensors = (x, w1, b1, w2, b2, scale, shift, gamma)
    r = _check_torch(*tensors) + bk.float_dtype(*tensors) + bk.for_triton(*tensors)
    if len({t.dtype for t in tensors}) > 1:
        r.append("needs every tensor in one dtype (cast the module with .to(dtype))")
    return r


def _make_args(g, B, C, H, W, dtype, channels_last, device, hidden=None):
    """Random (x, w1, b1, w2, b2, scale, shift, gamma), parameters at nn.Linear-like scales."""
    N = hidden or 4 * C

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device, dtype)

    x = r(B, C, H, W, scale=2.0, shift=0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, r(N, C, scale=C ** -0.5), r(N, scale=0.3), r(C, N, scale=N ** -0.5), r(C, scale=0.3),
            r((), scale=0.5), r((), scale=0.5), r((), scale=0.7, shift=0.3))


def _samples(device="cpu"):
    g = torch.Generator().manual_seed(2)
    out = []
    for (B, C, H, W), cl, dtype in [((2, 5, 3, 2), False, torch.float32), ((1, 16, 3, 3), True, torch.float32),
                                    ((2, 8, 1, 5), False, torch.bfloat16), ((1, 6, 2, 2), True, torch.float16)]:
        out.append((tuple(t.requires_grad_(True) for t in _make_args(g, B, C, H, W, dtype, cl, device)), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    x, w1, b1, w2, b2, s, t, gm = args
    det = [v.detach() for v in args]
    res = mixing_mlp_op(*det, 1e-6, True, "cublas")
    grad = torch.randn_like(res[0])
    fwd = [(mixing_mlp_op, (*(args if keep else det), 1e-6, keep, v), {}) for v in VARIANTS for keep in (True, False)]
    bwd_args = (grad, det[0], det[1], det[2], det[3], det[4], det[5], det[7], *res[1:], 1e-6)
    return fwd + [(mixing_mlp_backward_op, bwd_args, {})]


SPEC = registry.OpSpec(
    name="mixing_mlp",
    doc="Stage A: x + (GELU(xn·W1ᵀ + b1)·W2ᵀ + b2)·g, xn = LN_C(x)·(1 + s) + t, 0-d s, t, g",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    triton_modules=("wuerstchen_fast.kernels.triton.mixing_mlp",),
    priority={"cuda": ("triton", "torch"), "cpu": ("torch",)},
)
SPEC.add(registry.Impl("torch", reference.mixing.mlp_residual, _check_torch, lambda: []))
SPEC.add(registry.Impl("triton", lambda *a, **k: mixing_mlp(*a, backend="triton", **k), _check_triton,
                       bk.triton_available))
registry.register_op(SPEC)


def mixing_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6, *,
               backend: str | None = None, variant: str | None = None) -> torch.Tensor:
    """x + (GELU(xn·W1ᵀ + b1)·W2ᵀ + b2)·gamma with xn = LN over channels of (B, C, H, W) x, ·(1 + scale) + shift.

    w1 (N, C), b1 (N,), w2 (C, N), b2 (C,); scale, shift, gamma 0-d. `variant` ("cublas" / "triton_gemm")
    overrides the triton backend's GEMM choice (`choose_variant`).
    Equivalent code: `wuerstchen_fast.ops.reference.mixing.mlp_residual`.
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    name = registry.resolve(SPEC, x, w1, b1, w2, b2, scale, shift, gamma, eps, backend=backend)
    if name == "torch":
        return reference.mixing.mlp_residual(x, w1, b1, w2, b2, scale, shift, gamma, eps)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2, scale, shift, gamma))
    variant = variant or choose_variant(x, w1)
    return mixing_mlp_op(x, w1, b1, w2, b2, scale, shift, gamma, eps, keep, variant)[0]
