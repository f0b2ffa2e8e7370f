"""resblock / resblock_stage_b: the fused ConvNeXt ResBlocks of Stage C and Stage B (op family 1).

    resblock(x, skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, *, dropout, training, mod, backend)

Stage C's `ResBlock` concatenates the skip before the depthwise conv; Stage B's `ResBlockStageB`
concatenates it after the norm, and the fused path takes it as a second K-input of the first Linear
(never a materialized concat). In both, `mod=(a, b)` folds the following TimestepBlock: out·(1 + a) + b.

Layers as in layer_norm_2d.py: reference (`reference.resblock{,_stage_b}` then `reference.modulate`,
the `torch` backend) -> Triton kernels (kernels/triton/resblock.py, grn.py, modulation.py) -> front op
`wuerstchen_fast::resblock(..., variant) -> (out, out_pre, xn, rstd, h, stats)` with fake and autograd;
the extra outputs are the activations the backward needs; `wuerstchen_fast::resblock_backward`.

The triton backend has two variants of the forward (the backward is shared: Triton elementwise /
reduction / conv kernels around cuBLAS GEMMs):
    "cublas"       Triton conv+LN (also writes x + b2 into the output), torch.addmm for Linear1, one
                   Triton pass GELU + Σg², one pass GELU·s + β, cuBLAS addmm/baddbmm accumulating onto
                   x + b2 for Linear2, and the standalone modulation kernel when mod is given.
    "triton_gemm"  Triton conv+LN, Triton GEMM1 with bias + GELU-Σg² epilogue, Triton GEMM2 with the
                   GRN prologue and bias + residual (+ modulation) epilogue: h is the only (M, 4C) tensor.
The cpu and cuda backends run variant "ext" (ops/resblock_ext.py): the extension's dwconv_ln, GRN and
modulation kernels around torch GEMMs (MKL / cuBLAS), forward and backward; 3x3 depthwise over x only
(Stage C's skip-before-conv is a grouped conv: reported as a reason). On CPU, auto keeps the reference
first (priority below) unless a measurement says the extension is faster.
`choose_variant` picks per shape: a measured table (`VARIANT_TABLE`, filled from bench/ results on a
GPU via `record_variant`) first, else the rule stated there. Dropout > 0 in training is not fused: the
triton backend reports it as a reason, so auto runs the reference and an explicit request fails loudly.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends as bk
from . import reference, registry, resblock_ext
from .layout import empty_out_like

__all__ = ["resblock", "resblock_stage_b", "choose_variant", "record_variant", "VARIANTS", "VARIANT_TABLE"]

VARIANTS = ("cublas", "triton_gemm")
EXT = "ext"  # the cpu / cuda backends' forward and backward (ops/resblock_ext.py), not a triton variant
# EXT when nothing needs a gradient (inference): the forward reuses its hidden buffer in place and keeps
# no pre-activation (ops/resblock_ext.py says why); its backward is never called.
EXT_NOGRAD = "ext_nograd"
# (device name, dtype, B*H*W, C, 4C) -> variant, from measurements (bench/bench_ops_resblock.py).
VARIANT_TABLE: dict = {}


def record_variant(device_name: str, dtype: torch.dtype, M: int, C: int, N: int, variant: str) -> None:
    """The hook for measurement-based selection: store the faster variant measured at this shape."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    VARIANT_TABLE[(device_name, dtype, M, C, N)] = variant


def choose_variant(x: torch.Tensor, w1: torch.Tensor) -> str:
    """Measured choice if recorded, else the intended rule (to be replaced by measurements): Triton
    GEMMs for C <= 640 (Stage B's memory-bound levels, where keeping GELU/GRN/residual inside the GEMMs
    saves the most traffic), cuBLAS for wider blocks (Stage C's compute-bound 1536 -> 6144 GEMMs).
    On CPU (the interpreter) the cuBLAS variant: torch.matmul there is the faster of the two."""
    B, C, H, W = x.shape
    if VARIANT_TABLE and x.device.type == "cuda":
        hit = VARIANT_TABLE.get((torch.cuda.get_device_name(x.device), x.dtype, B * H * W, C, w1.shape[0]))
        if hit is not None:
            return hit
    if x.device.type != "cuda":
        return "cublas"
    return "triton_gemm" if C <= 640 else "cublas"


def _k():
    from ..kernels.triton import grn, modulation, resblock

    return resblock, grn, modulation


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C) rows (a view for channels-last, a copy otherwise)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


# ------------------------------------------------------------------------------ forward / backward

def _forward(x, skip, wd, bd, w1, b1, gamma, beta, w2, b2, mod_a, mod_b, eps, stage_b, variant):
    kr, kg, km = _k()
    B, C, H, W = x.shape
    N, M = w1.shape[0], B * H * W
    conv_skip = None if stage_b else skip
    mlp_skip = skip if stage_b else None
    mod = (mod_a, mod_b) if mod_a is not None else None
    out_pre = empty_out_like(x)
    if variant == "triton_gemm":
        xn, rstd = kr.dwconv_ln(x, conv_skip, wd, bd, eps)
        h, sumsq = kr.gemm1(xn, mlp_skip, w1, b1, B, H, W)
        st = kg.stats(sumsq, gamma)
        if mod is None:
            out = kr.gemm2(h, st[0], beta, w2, b2, x, None, out_pre, None)
            return out, x.new_empty(0), xn, rstd, h, st
        out = kr.gemm2(h, st[0], beta, w2, b2, x, mod, empty_out_like(x), out_pre)
        return out, out_pre, xn, rstd, h, st
    # cuBLAS variant: out_pre starts as x + b2 (written by the conv+LN kernel) and GEMM2 adds onto it.
    xn, rstd = kr.dwconv_ln(x, conv_skip, wd, bd, eps, r=out_pre, bias2=b2)
    h = torch.addmm(b1, xn, w1[:, :C].t())
    if mlp_skip is not None:
        h.addmm_(_rows(mlp_skip), w1[:, C:].t())
    h4 = h.view(B, H * W, 1, N)
    st = kg.stats(kg.colsum(h4, gelu=True), gamma)
    y = kg.apply(h4, st[0], beta, torch.empty_like(h4), gelu=True)  # GELU(h)·s + β
    if out_pre.is_contiguous():  # (B, C, HW) = W2 · yᵀ per batch: the residual layout as it is
        out_pre.view(B, C, H * W).baddbmm_(w2.expand(B, C, N), y.view(B, H * W, N).transpose(1, 2))
    else:  # channels-last: rows
        out_pre.permute(0, 2, 3, 1).view(M, C).addmm_(y.view(M, N), w2.t())
    if mod is None:
        return out_pre, x.new_empty(0), xn, rstd, h, st
    return km.mod_fwd(out_pre, mod_a, mod_b, empty_out_like(x)), out_pre, xn, rstd, h, st


def _backward_impl(grad, x, skip, wd, w1, gamma, beta, w2, mod_a, out_pre, xn, rstd, h, st, stage_b):
    kr, kg, km = _k()
    B, C, H, W = x.shape
    N, M = w1.shape[0], B * H * W
    da, db = x.new_empty(0), x.new_empty(0)  # absent gradients: distinct empty tensors (no aliasing outputs)
    dpre = grad
    if mod_a is not None:
        dpre = empty_out_like(x)
        da, db = km.mod_bwd(grad, out_pre, mod_a, dpre)
        da, db = da.to(mod_a.dtype), db.to(mod_a.dtype)
    dout = _rows(dpre)
    db2 = dout.sum(0)
    dy = dout @ w2
    h4, dy4 = h.view(B, H * W, 1, N), dy.view(B, H * W, 1, N)
    ps, dbeta = kg.colsum(h4, dy4, gelu=True)
    t, dgamma = kg.stats_bwd(ps, st, gamma)
    y = kg.apply(h4, st[0], beta, torch.empty_like(h4), gelu=True).view(M, N)
    dw2 = dout.t() @ y
    dh = kg.apply_bwd(h4, dy4, st[0], t, dy4, gelu=True).view(M, N)  # in place over dy
    db1 = dh.sum(0)
    dxn = dh @ w1[:, :C]
    dw1 = dh.t() @ xn
    dskip = x.new_empty(0)
    if stage_b and skip is not None:
        srows = _rows(skip)
        dw1 = torch.cat([dw1, dh.t() @ srows], dim=1)
        dskip = empty_out_like(skip).copy_((dh @ w1[:, C:]).view(B, H, W, -1).permute(0, 3, 1, 2))
    dd = kr.ln_bwd(dxn, xn, rstd)
    dx = empty_out_like(x)
    conv_skip = None if stage_b else skip
    dskip_conv = empty_out_like(skip) if conv_skip is not None else None
    dwd, dbd = kr.dwconv_bwd(dd, x, conv_skip, wd, dpre, dx, dskip_conv)
    if dskip_conv is not None:
        dskip = dskip_conv
    p = w1.dtype
    return (dx, dskip, dwd.to(wd.dtype), dbd.to(wd.dtype), dw1, db1, dgamma.to(p), dbeta.to(p), dw2, db2, da, db)


# ------------------------------------------------------------------------------ front ops

@torch.library.custom_op("wuerstchen_fast::resblock", mutates_args=())
def resblock_op(x: torch.Tensor, skip: Optional[torch.Tensor], dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                w1: torch.Tensor, b1: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, mod_a: Optional[torch.Tensor], mod_b: Optional[torch.Tensor], eps: float,
                stage_b: bool, variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]:
    if variant in (EXT, EXT_NOGRAD):
        return resblock_ext.forward(x, skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, mod_a, mod_b, eps,
                                    stage_b, keep_h=variant == EXT)
    return _forward(x, skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, mod_a, mod_b, eps, stage_b, variant)


@resblock_op.register_fake
def _(x, skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, mod_a, mod_b, eps, stage_b, variant):
    B, C, H, W = x.shape
    M, N = B * H * W, w1.shape[0]
    pre = empty_out_like(x) if mod_a is not None else x.new_empty(0)
    ext = variant in (EXT, EXT_NOGRAD)
    rstd = x.new_empty(0 if ext else M, dtype=torch.float32)  # ext: its backward recomputes the norm
    h = x.new_empty(0 if variant == EXT_NOGRAD else M, N)
    return (empty_out_like(x), pre, x.new_empty(M, C), rstd, h, x.new_empty(3, B, N, dtype=torch.float64))


@torch.library.custom_op("wuerstchen_fast::resblock_backward", mutates_args=())
def resblock_backward_op(grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], dw_weight: torch.Tensor,
                         dw_bias: torch.Tensor, w1: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         w2: torch.Tensor, mod_a: Optional[torch.Tensor], out_pre: torch.Tensor, xn: torch.Tensor,
                         rstd: torch.Tensor, h: torch.Tensor, stats: torch.Tensor, eps: float, stage_b: bool,
                         variant: str) -> list[torch.Tensor]:
    if variant == EXT:
        return list(resblock_ext.backward(grad, x, skip, dw_weight, dw_bias, w1, gamma, beta, w2, mod_a, out_pre, xn,
                                          h, stats, eps, stage_b))
    return list(_backward_impl(grad, x, skip, dw_weight, w1, gamma, beta, w2, mod_a, out_pre, xn, rstd, h, stats,
                               stage_b))


@resblock_backward_op.register_fake
def _(grad, x, skip, dw_weight, dw_bias, w1, gamma, beta, w2, mod_a, out_pre, xn, rstd, h, stats, eps, stage_b, variant):
    dskip = empty_out_like(skip) if skip is not None else x.new_empty(0)
    dm = mod_a.new_empty(mod_a.shape) if mod_a is not None else x.new_empty(0)
    return [empty_out_like(x), dskip, torch.empty_like(dw_weight), dw_weight.new_empty(dw_weight.shape[0]),
            torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(gamma), torch.empty_like(beta),
            torch.empty_like(w2), w2.new_empty(w2.shape[0]), dm, dm.new_empty(dm.shape)]


def _setup_context(ctx, inputs, output):
    x, skip, wd, bd, w1, b1, gamma, beta, w2, b2, mod_a, mod_b, eps, stage_b, variant = inputs
    out, out_pre, xn, rstd, h, st = output
    ctx.save_for_backward(x, skip, wd, bd, w1, gamma, beta, w2, mod_a, out_pre, xn, rstd, h, st)
    ctx.mark_non_differentiable(out_pre, xn, rstd, h, st)
    ctx.stage_b, ctx.eps, ctx.variant = stage_b, eps, variant
    ctx.has_skip, ctx.has_mod = skip is not None, mod_a is not None


def _backward(ctx, grad, *_unused):
    if ctx.variant == EXT_NOGRAD:  # _call picks it only when no input needs a gradient
        raise RuntimeError("resblock: the inference variant keeps no pre-activation and has no backward")
    x, skip, wd, bd, w1, gamma, beta, w2, mod_a, out_pre, xn, rstd, h, st = ctx.saved_tensors
    g = resblock_backward_op(grad, x, skip, wd, bd, w1, gamma, beta, w2, mod_a, out_pre, xn, rstd, h, st, ctx.eps,
                             ctx.stage_b, ctx.variant)
    dx, dskip, dwd, dbd, dw1, db1, dgamma, dbeta, dw2, db2, da, db = g
    return (dx, dskip if ctx.has_skip else None, dwd, dbd, dw1, db1, dgamma, dbeta, dw2, db2,
            da if ctx.has_mod else None, db if ctx.has_mod else None, None, None, None)


resblock_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ registry entries

def _check_common(stage_b, x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout=0.0, training=False,
                  mod=None, eps=1e-6):
    tensors = [t for t in (x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2) if t is not None]
    reasons = bk.ndim(4, x) + bk.float_dtype(*tensors)
    if training and dropout > 0:
        reasons.append(f"dropout {dropout} in training is not fused: the reference (torch backend) runs it")
    if len({t.dtype for t in tensors}) > 1:
        reasons.append("needs every tensor in one dtype (cast the module with .to(dtype))")
    if x.dim() == 4 and dw_weight.shape[-1] % 2 == 0:
        reasons.append(f"needs an odd depthwise kernel size, got {dw_weight.shape[-1]}")
    return reasons, tensors


def _check(stage_b, *args, **kwargs):
    reasons, tensors = _check_common(stage_b, *args, **kwargs)
    return reasons + bk.for_triton(*tensors)


def _check_ext(device):
    def check(stage_b, x, x_skip, dw_weight, *args, **kwargs):
        reasons, tensors = _check_common(stage_b, x, x_skip, dw_weight, *args, **kwargs)
        if tuple(dw_weight.shape[1:]) != (1, 3, 3):
            why = " (Stage C's skip is concatenated before the conv)" if x_skip is not None and not stage_b else ""
            reasons.append("the extension's dwconv_ln kernel is a 3x3 depthwise conv of x alone (weight (C, 1, 3, 3)), "
                           f"got weight {tuple(dw_weight.shape)}{why}")
        return reasons + bk.on_device(device, *tensors)
    return check


def _samples_for(stage_b):
    def samples(device="cpu"):
        g = torch.Generator().manual_seed(0)
        out = []
        for (B, C, H, W, cs, dtype, cl, with_mod) in [(2, 16, 3, 5, 0, torch.float32, False, False),
                                                      (1, 24, 4, 4, 8 if stage_b else 24, torch.float32, True, False),
                                                      (2, 16, 2, 3, 5 if stage_b else 0, torch.bfloat16, False, True)]:
            args = _make_args(g, B, C, H, W, cs, dtype, cl, stage_b, device)
            kw = {}
            if with_mod:
                ab = (torch.randn(B, 2 * C, generator=g) * 0.3).to(device, dtype).requires_grad_(True)
                kw["mod"] = ab.chunk(2, dim=1)
            out.append((args, kw))
        return out
    return samples


def _make_args(g, B, C, H, W, cs, dtype, channels_last, stage_b, device, k=3):
    """Random (x, skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2) for tests and benchmarks."""
    kg = 1 if stage_b else (C + cs) // C
    k_in = C + cs if stage_b else C

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = r(B, C, H, W)
    skip = r(B, cs, H, W) if cs else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        skip = skip.contiguous(memory_format=torch.channels_last) if skip is not None else None
    params = [r(C, kg, k, k, scale=1 / k), r(C, scale=0.3), r(4 * C, k_in, scale=k_in ** -0.5), r(4 * C, scale=0.3),
              r(1, 1, 1, 4 * C, scale=0.5), r(1, 1, 1, 4 * C, scale=0.3), r(C, 4 * C, scale=(4 * C) ** -0.5),
              r(C, scale=0.3)]
    return tuple(t.requires_grad_(True) if t is not None else None for t in [x, skip] + params)


def _opcheck_cases_for(stage_b):
    def cases(args, kwargs, backend):
        mod = kwargs.get("mod")
        a = list(args)
        a[6], a[7] = a[6].reshape(-1), a[7].reshape(-1)
        mod_a, mod_b = (mod[0].detach().requires_grad_(True), mod[1].detach().requires_grad_(True)) if mod else (None, None)
        out = []
        # EXT last: the backward case below runs on its outputs
        for variant in ((EXT_NOGRAD, EXT) if backend in ("cpu", "cuda") else VARIANTS):
            fwd_args = (*a, mod_a, mod_b, 1e-6, stage_b, variant)
            if variant == EXT_NOGRAD:  # chosen only when nothing needs a gradient: no backward to check
                nograd = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in fwd_args)
                out.append((resblock_op, nograd, {}))
                continue
            out.append((resblock_op, fwd_args, {}))
        det = [t.detach() if isinstance(t, torch.Tensor) else t for t in fwd_args]
        res = resblock_op(*det)
        x, skip, wd, bd, w1, _, gamma, beta, w2 = det[:9]
        grad = torch.randn_like(res[0])
        out.append((resblock_backward_op, (grad, x, skip, wd, bd, w1, gamma, beta, w2, det[10], *res[1:], 1e-6, stage_b,
                                           det[-1]), {}))
        return out
    return cases


def _spec(name, stage_b, doc):
    # cpu: the reference first, so that auto on a CPU stays bit-exact with diffusers (tests/test_models_stages.py);
    # the extension is faster at every released shape (bench/bench_ops_ext.py) and runs with backend="cpu".
    spec = registry.OpSpec(name=name, doc=doc, samples=_samples_for(stage_b), opcheck_cases=_opcheck_cases_for(stage_b),
                           priority={"cuda": ("cuda", "triton", "torch"), "cpu": ("torch", "cpu")},
                           triton_modules=("wuerstchen_fast.kernels.triton.resblock",))
    ref = reference.resblock_stage_b if stage_b else reference.resblock
    spec.add(registry.Impl("torch", ref, lambda x, *a, **k: bk.ndim(4, x), lambda: []))
    spec.add(registry.Impl("triton", lambda *a, **k: _call(stage_b, "triton", *a, **k),
                           lambda *a, **k: _check(stage_b, *a, **k), bk.triton_available))
    for dev, avail in (("cpu", bk.cpu_ext_available), ("cuda", bk.cuda_ext_available)):
        check = _check_ext(dev)
        spec.add(registry.Impl(dev, lambda *a, _d=dev, **k: _call(stage_b, _d, *a, **k),
                               lambda *a, _c=check, **k: _c(stage_b, *a, **k), avail))
    return registry.register_op(spec)


SPEC_C = _spec("resblock", False, "Stage C ConvNeXt ResBlock (skip before the depthwise conv), optional modulation")
SPEC_B = _spec("resblock_stage_b", True,
               "Stage B ConvNeXt ResBlock (skip as a second input of the first Linear), optional modulation")


def _call(stage_b, name, x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout=0.0, training=False,
          mod=None, eps=1e-6, variant=None):
    if name == "torch":
        ref = reference.resblock_stage_b if stage_b else reference.resblock
        out = ref(x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout, training, eps)
        return out if mod is None else reference.modulate(out, *mod)
    mod_a, mod_b = mod if mod is not None else (None, None)
    if name in ("cpu", "cuda"):
        tensors = (x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, mod_a, mod_b)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        variant = EXT if needs_grad else EXT_NOGRAD
    else:
        variant = variant or choose_variant(x, w1)
    return resblock_op(x, x_skip, dw_weight, dw_bias, w1, b1, gamma.reshape(-1), beta.reshape(-1), w2, b2,
                       mod_a, mod_b, eps, stage_b, variant)[0]


def resblock(x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, *, dropout=0.0, training=False, mod=None,
             eps=1e-6, backend=None, variant=None):
    """Stage C ResBlock (+ the next TimestepBlock's modulation when `mod=(a, b)`).

    Equivalent code: `reference.resblock(...)`, then `reference.modulate(out, *mod)`. `backend` overrides
    the registry's choice; `variant` ("cublas" / "triton_gemm") the triton backend's GEMM choice.
    """
    name = registry.resolve(SPEC_C, x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout=dropout,
                            training=training, mod=mod, eps=eps, backend=backend)
    return _call(False, name, x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout, training, mod,
                 eps, variant)


def resblock_stage_b(x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, *, dropout=0.0, training=False,
                     mod=None, eps=1e-6, backend=None, variant=None):
    """Stage B ResBlock (+ the next TimestepBlock's modulation when `mod=(a, b)`).

    Equivalent code: `reference.resblock_stage_b(...)`, then `reference.modulate(out, *mod)`.
    """
    name = registry.resolve(SPEC_B, x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout=dropout,
                            training=training, mod=mod, eps=eps, backend=backend)
    return _call(True, name, x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout, training, mod,
                 eps, variant)
