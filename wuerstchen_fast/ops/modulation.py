"""modulate: TimestepBlock's `x * (1 + a) + b`, a, b per (batch, channel) (op family 2, standalone).

Layers as in layer_norm_2d.py: reference (`reference.modulate`, the `torch` backend) -> Triton
kernels (kernels/triton/modulation.py) -> front op `wuerstchen_fast::modulate(x, a, b, backend)` with
fake and autograd; backward `wuerstchen_fast::modulate_backward` -> (dx, da, db). The folded form
lives in the Stage C ResBlock op (`ops.resblock(..., mod=(a, b))`), which applies the modulation in
its output epilogue: Stage C runs ResBlock -> TimestepBlock -> AttnBlock.
"""
from __future__ import annotations

import torch

from .._extension import extension
from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["modulate"]


_EXT = ("cpu", "cuda")


def _k():
    from ..kernels.triton import modulation as k

    return k


@torch.library.custom_op("wuerstchen_fast::modulate", mutates_args=())
def modulate_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    if backend in _EXT:  # the C++ op dispatches on the device: CPU or CUDA kernel
        return torch.ops.wuerstchen_fast_C.modulate(x, a, b)
    return _k().mod_fwd(x, a, b, empty_out_like(x))


@modulate_op.register_fake
def _(x, a, b, backend):
    return empty_out_like(x)


@torch.library.custom_op("wuerstchen_fast::modulate_backward", mutates_args=())
def modulate_backward_op(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend in _EXT:
        dx, da, db = torch.ops.wuerstchen_fast_C.modulate_backward(grad, x, a)
        return dx, da, db
    dx = empty_out_like(x)
    da, db = _k().mod_bwd(grad, x, a, dx)
    return dx, da.to(a.dtype), db.to(a.dtype)


@modulate_backward_op.register_fake
def _(grad, x, a, backend):
    return empty_out_like(x), a.new_empty(a.shape), a.new_empty(a.shape)


def _setup_context(ctx, inputs, output):
    x, a, b, backend = inputs
    ctx.save_for_backward(x, a)
    ctx.backend = backend


def _backward(ctx, grad):
    x, a = ctx.saved_tensors
    dx, da, db = modulate_backward_op(grad, x, a, ctx.backend)
    return dx, da, db, None


modulate_op.register_autograd(_backward, setup_context=_setup_context)

if extension() is not None:
    torch.library.register_fake("wuerstchen_fast_C::modulate")(lambda x, a, b: empty_out_like(x))
    torch.library.register_fake("wuerstchen_fast_C::modulate_backward")(
        lambda g, x, a: (empty_out_like(x), a.new_empty(a.shape), a.new_empty(a.shape)))


# ------------------------------------------------------------------------------ registry entry

def _check(x, a, b):
    reasons = bk.ndim(4, x) + bk.float_dtype(x, a, b)
    if x.dim() == 4 and (a.shape != x.shape[:2] or b.shape != x.shape[:2]):
        reasons.append(f"a and b need shape (B, C) = {tuple(x.shape[:2])}, got {tuple(a.shape)} and {tuple(b.shape)}")
    return reasons


def _samples(device="cpu"):
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, cl, dtype in [((2, 7, 5, 3), False, torch.float32), ((1, 32, 4, 4), True, torch.float32),
                             ((2, 16, 1, 5), False, torch.bfloat16), ((1, 8, 3, 3), True, torch.float16)]:
        x = torch.randn(shape, generator=g).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        ab = (torch.randn(shape[0], 2 * shape[1], generator=g) * 0.5).to(dtype).to(device)
        a, b = ab.requires_grad_(True).chunk(2, dim=1)  # the model's strided (B, 2C) chunks
        out.append(((x.to(device).requires_grad_(True), a, b), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    x, a, b = args
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    grad = torch.randn_like(x).detach()
    cases = [(modulate_op, (x, a, b, backend), {}),
             (modulate_backward_op, (grad, x.detach(), a.detach(), backend), {})]
    if backend in _EXT:
        cases += [(torch.ops.wuerstchen_fast_C.modulate.default, (x.detach(), a.detach(), b.detach()), {}),
                  (torch.ops.wuerstchen_fast_C.modulate_backward.default, (grad, x.detach(), a.detach()), {})]
    return cases


SPEC = registry.OpSpec(
    name="modulate",
    doc="timestep modulation x * (1 + a) + b, a and b per (batch, channel)",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    # cpu: the reference first, so that auto on a CPU stays bit-exact with diffusers (tests/test_models_stages.py);
    # the extension is faster at every released shape (bench/bench_ops_ext.py) and runs with backend="cpu".
    priority={"cuda": ("cuda", "triton", "torch"), "cpu": ("torch", "cpu")},
    triton_modules=("wuerstchen_fast.kernels.triton.modulation",),
)
SPEC.add(registry.Impl("torch", reference.modulate, lambda x, a, b: bk.ndim(4, x), lambda: []))
SPEC.add(registry.Impl("triton", lambda x, a, b: modulate_op(x, a, b, "triton"),
                       lambda x, a, b: _check(x, a, b) + bk.for_triton(x, a, b), bk.triton_available))
SPEC.add(registry.Impl("cpu", lambda x, a, b: modulate_op(x, a, b, "cpu"),
                       lambda x, a, b: _check(x, a, b) + bk.on_device("cpu", x, a, b), bk.cpu_ext_available))
SPEC.add(registry.Impl("cuda", lambda x, a, b: modulate_op(x, a, b, "cuda"),
                       lambda x, a, b: _check(x, a, b) + bk.on_device("cuda", x, a, b), bk.cuda_ext_available))
registry.register_op(SPEC)


def modulate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`x * (1 + a) + b` for x (B, C, H, W) and a, b (B, C).

    Equivalent code: `wuerstchen_fast.ops.reference.modulate`. `backend` overrides the registry's choice.
    """
    name = registry.resolve(SPEC, x, a, b, backend=backend)
    if name == "torch":
        return reference.modulate(x, a, b)
    return modulate_op(x, a, b, name)
