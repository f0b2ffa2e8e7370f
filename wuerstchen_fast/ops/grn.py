"""grn: ConvNeXt-V2 GlobalResponseNorm of a channels-last (B, H, W, C) tensor (op family 6).

Layers as in layer_norm_2d.py: reference (`reference.grn`, the `torch` backend) -> Triton kernels
(kernels/triton/grn.py) -> front op `wuerstchen_fast::grn(x, gamma, beta, backend) -> (out, stats)`
with fake and autograd; its backward is `wuerstchen_fast::grn_backward`. `stats` (3, B, C) float64
holds s = 1 + gamma*N, G and N for the backward (non-differentiable). The ResBlock op does not call
this op: it fuses the same kernels around its GEMMs (ops/resblock.py).
"""
from __future__ import annotations

import torch

from .._extension import extension
from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["grn"]


_EXT = ("cpu", "cuda")
_GRN_EPS = 1e-6


def ext_stats(sumsq, gamma):
    """(3, B, C) float64: s = 1 + γN, G, N from Σv² (a few thousand values: plain float64 ATen)."""
    g = sumsq.sqrt()
    n = g / (g.mean(dim=1, keepdim=True) + _GRN_EPS)
    return torch.stack([1.0 + gamma.reshape(1, -1).double() * n, g, n])


def ext_stats_bwd(ps, st, gamma):
    """(t = dG/G (B, C), dγ (C,)) float64 from P = Σ dy·v and the forward statistics (as grn.py's Triton)."""
    g, n = st[1], st[2]
    C = g.shape[1]
    gam = gamma.reshape(1, -1).double()
    denom = g.mean(dim=1, keepdim=True) + _GRN_EPS
    corr = (gam * ps * g).sum(dim=1, keepdim=True) / (denom * denom * C)
    dg = gam * ps / denom - corr
    t = torch.where(g > 0, dg / torch.where(g > 0, g, torch.ones_like(g)), torch.zeros_like(g))
    return t, (n * ps).sum(0)


def _rows_out(out, x):
    """The C++ kernels write row-major (B, H, W, C); follow the layout rule of empty_out_like."""
    want = empty_out_like(x)
    return out if want.stride() == out.stride() else want.copy_(out)


def ext_grn_fwd(x, gamma, beta):
    C_ = torch.ops.wuerstchen_fast_C
    sumsq, _ = C_.grn_colsum(x, None, False)
    st = ext_stats(sumsq, gamma)
    return _rows_out(C_.grn_apply(x, st[0], beta, False), x), st


def ext_grn_bwd(dy, x, gamma, st):
    C_ = torch.ops.wuerstchen_fast_C
    ps, dbeta = C_.grn_colsum(x, dy, False)
    t, dgamma = ext_stats_bwd(ps, st, gamma)
    return _rows_out(C_.grn_apply_backward(x, dy, st[0], t, False), x), dgamma, dbeta


def _k():
    from ..kernels.triton import grn as k

    return k


@torch.library.custom_op("wuerstchen_fast::grn", mutates_args=())
def grn_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend in _EXT:
        return ext_grn_fwd(x, gamma, beta)
    return _k().grn_fwd(x, gamma, beta)


@grn_op.register_fake
def _(x, gamma, beta, backend):
    return empty_out_like(x), x.new_empty((3, x.shape[0], x.shape[3]), dtype=torch.float64)


@torch.library.custom_op("wuerstchen_fast::grn_backward", mutates_args=())
def grn_backward_op(grad: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, stats: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend in _EXT:
        dx, dgamma, dbeta = ext_grn_bwd(grad, x, gamma, stats)
    else:
        dx, dgamma, dbeta = _k().grn_bwd(grad, x, gamma, stats)
    return dx, dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)


@grn_backward_op.register_fake
def _(grad, x, gamma, stats, backend):
    return empty_out_like(x), torch.empty_like(gamma), torch.empty_like(gamma)


def _setup_context(ctx, inputs, output):
    x, gamma, beta, backend = inputs
    ctx.save_for_backward(x, gamma, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.backend = backend


def _backward(ctx, grad, _grad_stats):
    x, gamma, st = ctx.saved_tensors
    dx, dgamma, dbeta = grn_backward_op(grad, x, gamma, st, ctx.backend)
    return dx, dgamma, dbeta, None


grn_op.register_autograd(_backward, setup_context=_setup_context)

if extension() is not None:
    def _rows_fake(x, *rest):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    torch.library.register_fake("wuerstchen_fast_C::grn_colsum")(
        lambda x, dy, gelu: (x.new_empty((x.shape[0], x.shape[3]), dtype=torch.float64),
                             x.new_empty((x.shape[3] if dy is not None else 1,), dtype=torch.float64)))
    torch.library.register_fake("wuerstchen_fast_C::grn_apply")(_rows_fake)
    torch.library.register_fake("wuerstchen_fast_C::grn_apply_backward")(_rows_fake)


# ------------------------------------------------------------------------------ registry entry

def _check(x, gamma, beta):
    reasons = bk.ndim(4, x) + bk.float_dtype(x, gamma, beta)
    if x.dim() == 4 and (gamma.numel() != x.shape[3] or beta.numel() != x.shape[3]):
        reasons.append(f"gamma and beta need {x.shape[3]} elements (the channels of a (B, H, W, C) input)")
    return reasons


def _samples(device="cpu"):
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype, pshape in [((2, 3, 5, 7), torch.float32, (1, 1, 1, 7)), ((1, 1, 1, 16), torch.float32, (16,)),
                                 ((2, 4, 3, 12), torch.bfloat16, (1, 1, 1, 12)), ((1, 2, 3, 8), torch.float16, (8,))]:
        x = torch.randn(shape, generator=g).to(dtype)
        gamma = (torch.randn(pshape, generator=g) * 0.5).to(dtype)
        beta = (torch.randn(pshape, generator=g) * 0.5).to(dtype)
        out.append(((x.to(device).requires_grad_(True), gamma.to(device).requires_grad_(True),
                     beta.to(device).requires_grad_(True)), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    x = args[0]
    gamma, beta = args[1].reshape(-1).detach().requires_grad_(True), args[2].reshape(-1).detach().requires_grad_(True)
    _, st = grn_op(x.detach(), gamma.detach(), beta.detach(), backend)
    grad = torch.randn_like(x).detach()
    cases = [(grn_op, (x, gamma, beta, backend), {}),
             (grn_backward_op, (grad, x.detach(), gamma.detach(), st, backend), {})]
    if backend in _EXT:
        C_ = torch.ops.wuerstchen_fast_C
        xd = x.detach()
        for gelu in (False, True):
            cases += [(C_.grn_colsum.default, (xd, None, gelu), {}), (C_.grn_colsum.default, (xd, grad, gelu), {}),
                      (C_.grn_apply.default, (xd, st[0], beta.detach(), gelu), {}),
                      (C_.grn_apply.default, (xd, st[0], None, gelu), {}),
                      (C_.grn_apply_backward.default, (xd, grad, st[0], st[1], gelu), {})]
    return cases


SPEC = registry.OpSpec(
    name="grn",
    doc="GlobalResponseNorm (ConvNeXt-V2) of channels-last (B, H, W, C)",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    # cpu: the reference first, so that auto on a CPU stays bit-exact with diffusers (tests/test_models_stages.py);
    # the extension is faster at every released shape (bench/bench_ops_ext.py) and runs with backend="cpu".
    priority={"cuda": ("cuda", "triton", "torch"), "cpu": ("torch", "cpu")},
    triton_modules=("wuerstchen_fast.kernels.triton.grn",),
)
SPEC.add(registry.Impl("torch", reference.grn, lambda x, gamma, beta: bk.ndim(4, x), lambda: []))
SPEC.add(registry.Impl("triton", lambda x, gamma, beta: grn_op(x, gamma.reshape(-1), beta.reshape(-1), "triton")[0],
                       lambda x, gamma, beta: _check(x, gamma, beta) + bk.for_triton(x, gamma, beta),
                       bk.triton_available))
for _dev, _avail in (("cpu", bk.cpu_ext_available), ("cuda", bk.cuda_ext_available)):
    SPEC.add(registry.Impl(_dev, lambda x, gamma, beta, _d=_dev: grn_op(x, gamma.reshape(-1), beta.reshape(-1), _d)[0],
                           lambda x, gamma, beta, _d=_dev: _check(x, gamma, beta) + bk.on_device(_d, x, gamma, beta),
                           _avail))
registry.register_op(SPEC)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """GlobalResponseNorm of channels-last x (B, H, W, C); gamma, beta with C elements.

    Equivalent code: `wuerstchen_fast.ops.reference.grn`. `backend` overrides the registry's choice.
    """
    name = registry.resolve(SPEC, x, gamma, beta, backend=backend)
    if name == "torch":
        return reference.grn(x, gamma, beta)
    out, _ = grn_op(x, gamma.reshape(-1), beta.reshape(-1), name)
    return out
