"""GRN (ConvNeXt-V2 GlobalResponseNorm) in Triton, standalone and as building blocks of the ResBlock.

Math, per batch b and channel c over the P = H*W pixels (x channels-last, (B, H, W, C)):
    S_bc = Σ_p v²,  G = √S,  N = G / (mean_c G + 1e-6),  s = 1 + γ·N,  out = v·s + β
where v = x, or v = GELU(x) (exact erf GELU) when the ResBlock feeds the pre-activation h straight in
(GELU=True), so the activation is never stored.
Backward (dy = ∂L/∂out), with P_bc = Σ_p dy·v:
    dβ = Σ_{b,p} dy,  dγ = Σ_b N·P,  dN = γ·P,  D = mean_c G + 1e-6,
    dG = dN/D − (Σ_c dN·G)/(D²·C),  t = dG/G (0 where G = 0, as torch.norm),  dv = dy·s + v·t
    dx = dv (or dv·GELU'(x) when GELU=True)
Kernels: `_colsum` (the per-(b, c) reductions Σv² or Σdy·v and Σdy, fp64 atomics over pixel
splits), `_stats` / `_stats_bwd` (one program per batch over C: s, G, N / t and dγ), `_apply` /
`_apply_bwd` (elementwise). Nothing is saved but the (B, C) statistics; v is recomputed. Per-(b, c) sums are accumulated and
the (B, C) statistics kept in float64 (a few thousand values, fp64 atomics): dG = dN/D − ... cancels
and G = √S is sensitive to S, and float32 there cost ~2x PyTorch's gradient error at H = W = 1.
Layout: any strides (b, h, w, c); tiles are wide along c, the contiguous axis of channels-last.
Accumulation float32 (float64 for the per-(b, c) sums); inputs float32, bfloat16, float16 (bfloat16
stores round to nearest even, under the interpreter too: rounding.py). Limits: B, C, H*W each below 2**31.
Equivalent code: `wuerstchen_fast.ops.reference.grn`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import rne_flag, to_out

__all__ = ["colsum", "stats", "stats_bwd", "apply", "apply_bwd", "grn_fwd", "grn_bwd", "COMPILE_SPECS"]

GRN_EPS = 1e-6
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _colsum_kernel(X, DY, OUT, OUT_DY, P, W, C, chunk,
                   sxb, sxh, sxw, sxc, sgb, sgh, sgw, sgc,
                   MODE: tl.constexpr, GELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """MODE 0: OUT[b, c] += Σ v².  MODE 1: OUT[b, c] += Σ dy·v and OUT_DY[c] += Σ dy."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cm = c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_dy = tl.zeros([BLOCK_C], dtype=tl.float64)
    p_lo = tl.program_id(1) * chunk
    for p0 in range(p_lo, tl.minimum(p_lo + chunk, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cm[None, :]
        h = (p // W).to(tl.int64)
        w = (p % W).to(tl.int64)
        v = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + c[None, :].to(tl.int64) * sxc,
                    mask=m, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu(v)
        v = v.to(tl.float64)
        if MODE == 0:
            acc += tl.sum(v * v, axis=0)
        else:
            g = tl.load(DY + b * sgb + (h * sgh + w * sgw)[:, None] + c[None, :].to(tl.int64) * sgc,
                        mask=m, other=0.0).to(tl.float64)
            acc += tl.sum(g * v, axis=0)
            acc_dy += tl.sum(g, axis=0)
    tl.atomic_add(OUT + b * C + c, acc, mask=cm)
    if MODE == 1:
        tl.atomic_add(OUT_DY + c, acc_dy, mask=cm)


@triton.jit
def _stats_kernel(S, GAMMA, STATS, B, C, eps, BLOCK_C: tl.constexpr):
    """STATS[0] = s = 1 + γN, STATS[1] = G, STATS[2] = N, each (B, C) float64; one program per batch."""
    b = tl.program_id(0).to(tl.int64)
    tot = tl.zeros([BLOCK_C], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tot += tl.sqrt(tl.load(S + b * C + c, mask=c < C, other=0.0).to(tl.float64))
    denom = tl.sum(tot, axis=0) / C + eps
    plane = B * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = c < C
        g = tl.sqrt(tl.load(S + b * C + c, mask=m, other=0.0).to(tl.float64))
        n = g / denom
        gam = tl.load(GAMMA + c, mask=m, other=0.0).to(tl.float64)
        tl.store(STATS + b * C + c, 1.0 + gam * n, mask=m)
        tl.store(STATS + plane + b * C + c, g, mask=m)
        tl.store(STATS + 2 * plane + b * C + c, n, mask=m)


@triton.jit
def _stats_bwd_kernel(PS, STATS, GAMMA, T, DGAMMA, B, C, eps, BLOCK_C: tl.constexpr):
    """T[b, c] = dG/G from P = Σ dy·v; DGAMMA[c] += N·P (float64 atomics over batches)."""
    b = tl.program_id(0).to(tl.int64)
    plane = B * C
    tot = tl.zeros([BLOCK_C], dtype=tl.float64)
    dot = tl.zeros([BLOCK_C], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = c < C
        g = tl.load(STATS + plane + b * C + c, mask=m, other=0.0).to(tl.float64)
        ps = tl.load(PS + b * C + c, mask=m, other=0.0).to(tl.float64)
        gam = tl.load(GAMMA + c, mask=m, other=0.0).to(tl.float64)
        tot += g
        dot += gam * ps * g
    denom = tl.sum(tot, axis=0) / C + eps
    corr = tl.sum(dot, axis=0) / (denom * denom * C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = c < C
        g = tl.load(STATS + plane + b * C + c, mask=m, other=1.0).to(tl.float64)
        n = tl.load(STATS + 2 * plane + b * C + c, mask=m, other=0.0).to(tl.float64)
        ps = tl.load(PS + b * C + c, mask=m, other=0.0).to(tl.float64)
        gam = tl.load(GAMMA + c, mask=m, other=0.0).to(tl.float64)
        dg = gam * ps / denom - corr
        t = tl.where(g > 0, dg / tl.where(g > 0, g, 1.0), 0.0)
        tl.store(T + b * C + c, t, mask=m)
        tl.atomic_add(DGAMMA + c, n * ps, mask=m)


@triton.jit
def _apply_kernel(X, SCALE, BETA, Y, P, W, C,
                  sxb, sxh, sxw, sxc, syb, syh, syw, syc,
                  HAS_BETA: tl.constexpr, GELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                  RNE: tl.constexpr):
    """Y = v·s[b, c] (+ β[c])."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    m = (p < P)[:, None] & (c < C)[None, :]
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    cc = c[None, :].to(tl.int64)
    v = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + cc * sxc, mask=m, other=0.0).to(tl.float32)
    if GELU:
        v = _gelu(v)
    y = v * tl.load(SCALE + b * C + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    if HAS_BETA:
        y += tl.load(BETA + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + b * syb + (h * syh + w * syw)[:, None] + cc * syc, to_out(y, Y.dtype.element_ty, RNE), mask=m)


@triton.jit
def _apply_bwd_kernel(X, DY, SCALE, T, DX, P, W, C,
                      sxb, sxh, sxw, sxc, sgb, sgh, sgw, sgc, sob, soh, sow, soc,
                      GELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    """DX = (dy·s + v·t) (· GELU'(x)); DX may alias DY (each element is read before it is written)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    m = (p < P)[:, None] & (c < C)[None, :]
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    cc = c[None, :].to(tl.int64)
    x = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + cc * sxc, mask=m, other=0.0).to(tl.float32)
    g = tl.load(DY + b * sgb + (h * sgh + w * sgw)[:, None] + cc * sgc, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SCALE + b * C + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    t = tl.load(T + b * C + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    if GELU:
        dx = (g * s + _gelu(x) * t) * _gelu_grad(x)
    else:
        dx = g * s + x * t
    tl.store(DX + b * sob + (h * soh + w * sow)[:, None] + cc * soc, to_out(dx, DX.dtype.element_ty, RNE), mask=m)


# ------------------------------------------------------------------------------ launchers
# Tensors are passed as 4-d (B, H, W, C) views (any strides); the ResBlock passes (B, H*W, 1, C).

BLOCK_C, BLOCK_P, STATS_BLOCK = 64, 16, 256


def _grid_pc(x4):
    B, H, W, C = x4.shape
    return (triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C), B)


def colsum(x4, dy4=None, gelu=False):
    """Σ_p v² per (b, c) (dy4 None), or (Σ_p dy·v per (b, c), Σ_{b,p} dy per c); float64."""
    B, H, W, C = x4.shape
    out = torch.zeros(B, C, device=x4.device, dtype=torch.float64)
    out_dy = torch.zeros(C if dy4 is not None else 1, device=x4.device, dtype=torch.float64)
    P = H * W
    if x4.numel() == 0:
        return out if dy4 is None else (out, out_dy)
    # Split the pixels so that ~4 programs per channel tile and batch exist even at small B * C.
    splits = max(1, min(triton.cdiv(P, BLOCK_P * 4), triton.cdiv(1024, B * triton.cdiv(C, BLOCK_C))))
    chunk = triton.cdiv(triton.cdiv(P, splits), BLOCK_P) * BLOCK_P
    grid = (triton.cdiv(C, BLOCK_C), triton.cdiv(P, chunk), B)
    g4 = dy4 if dy4 is not None else x4
    _colsum_kernel[grid](x4, g4, out, out_dy, P, W, C, chunk, *x4.stride(), *g4.stride(),
                         MODE=0 if dy4 is None else 1, GELU=gelu, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
    return out if dy4 is None else (out, out_dy)


def stats(sumsq, gamma):
    """(3, B, C) float64: s = 1 + γN, G, N from Σv²."""
    B, C = sumsq.shape
    st = torch.empty(3, B, C, device=sumsq.device, dtype=torch.float64)
    if B and C:
        _stats_kernel[(B,)](sumsq, gamma, st, B, C, GRN_EPS, BLOCK_C=STATS_BLOCK, num_warps=4)
    return st


def stats_bwd(ps, st, gamma):
    """(t (B, C), dγ (C,)) float64 from P = Σ dy·v and the forward statistics."""
    B, C = ps.shape
    t = torch.empty(B, C, device=ps.device, dtype=torch.float64)
    dgamma = torch.zeros(C, device=ps.device, dtype=torch.float64)
    if B and C:
        _stats_bwd_kernel[(B,)](ps, st, gamma, t, dgamma, B, C, GRN_EPS, BLOCK_C=STATS_BLOCK, num_warps=4)
    return t, dgamma


def apply(x4, scale, beta, out4, gelu=False):
    if x4.numel():
        B, H, W, C = x4.shape
        _apply_kernel[_grid_pc(x4)](x4, scale, beta if beta is not None else scale, out4, H * W, W, C,
                                    *x4.stride(), *out4.stride(), HAS_BETA=beta is not None, GELU=gelu,
                                    BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, RNE=rne_flag(out4), num_warps=4)
    return out4


def apply_bwd(x4, dy4, scale, t, out4, gelu=False):
    if x4.numel():
        B, H, W, C = x4.shape
        _apply_bwd_kernel[_grid_pc(x4)](x4, dy4, scale, t, out4, H * W, W, C, *x4.stride(), *dy4.stride(),
                                        *out4.stride(), GELU=gelu, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
                                        RNE=rne_flag(out4), num_warps=4)
    return out4


def _out_like(x):
    from wuerstchen_fast.ops.layout import empty_out_like

    return empty_out_like(x)


def grn_fwd(x, gamma, beta):
    """GRN of channels-last (B, H, W, C) x; gamma, beta (C,). Returns (out, stats (3, B, C))."""
    st = stats(colsum(x), gamma)
    out = _out_like(x)
    return apply(x, st[0], beta, out), st


def grn_bwd(dy, x, gamma, st):
    """(dx, dγ float64, dβ float64)."""
    ps, dbeta = colsum(x, dy)
    t, dgamma = stats_bwd(ps, st, gamma)
    dx = _out_like(x)
    return apply_bwd(x, dy, st[0], t, dx), dgamma, dbeta


# ------------------------------------------------------------------------------ compile specs

CONSTEXPR_PREFIXES = ("BLOCK", "MODE", "GELU", "HAS", "KS", "IEEE", "UPCAST", "SAVE_PRE", "RNE")


def sig(kernel, ptrs: dict, stride_type: str = "i64") -> dict:
    """Triton signature: pointers as given ({name: "*bf16"}), BLOCK*/flags constexpr, strides
    `stride_type` (the JIT types an int argument i32 when it fits, as every stride of the released
    shapes does), other ints i32."""
    out = {}
    for n in kernel.arg_names:
        if n in ptrs:
            out[n] = ptrs[n]
        elif n.startswith(CONSTEXPR_PREFIXES):
            out[n] = "constexpr"
        elif n in ("eps",):
            out[n] = "fp32"
        else:
            out[n] = stride_type if n.startswith("s") else "i32"
    return out


def _sig(kernel, f32=(), bf16=()):
    return sig(kernel, {**{n: "*fp64" for n in f32}, **{n: "*bf16" for n in bf16}})


COMPILE_SPECS = [
    dict(name=f"grn._colsum_kernel[mode{mode},gelu{int(gelu)}]", kernel=_colsum_kernel,
         signature=_sig(_colsum_kernel, ("OUT", "OUT_DY"), ("X", "DY")),
         constexprs=dict(MODE=mode, GELU=gelu, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C), num_warps=4)
    for mode in (0, 1) for gelu in (False, True)
] + [
    dict(name="grn._stats_kernel", kernel=_stats_kernel,
         signature=_sig(_stats_kernel, ("S", "STATS"), ("GAMMA",)), constexprs=dict(BLOCK_C=STATS_BLOCK), num_warps=4),
    dict(name="grn._stats_bwd_kernel", kernel=_stats_bwd_kernel,
         signature=_sig(_stats_bwd_kernel, ("PS", "STATS", "T", "DGAMMA"), ("GAMMA",)),
         constexprs=dict(BLOCK_C=STATS_BLOCK), num_warps=4),
] + [
    dict(name=f"grn._apply_kernel[gelu{int(gelu)}]", kernel=_apply_kernel,
         signature=_sig(_apply_kernel, ("SCALE",), ("X", "BETA", "Y")),
         constexprs=dict(HAS_BETA=not gelu, GELU=gelu, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, RNE=False), num_warps=4)
    for gelu in (False, True)
] + [
    dict(name=f"grn._apply_bwd_kernel[gelu{int(gelu)}]", kernel=_apply_bwd_kernel,
         signature=_sig(_apply_bwd_kernel, ("SCALE", "T"), ("X", "DY", "DX")),
         constexprs=dict(GELU=gelu, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, RNE=False), num_warps=4)
    for gelu in (False, True)
]
