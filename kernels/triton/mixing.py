"""Stage A mixing block's norm: LayerNorm over channels + scalar modulation, forward and backward.

Math (per pixel over its C channels; s, t are 0-d tensors, MixingResidualBlock's gammas):
    xhat = (x − mean)·rstd,  rstd = (var + eps)^−½ (biased var),   y = xhat·(1 + s) + t
Backward (dy in): g = dy·(1 + s);  dx = rstd·(g − mean_C(g) − xhat·mean_C(g·xhat))
    ds = Σ dy·xhat,  dt = Σ dy  over every element: one partial per program, summed by the launcher
    (deterministic, no atomics). Backward recomputes mean and rstd from x; nothing is saved.
Statistics: per chunk of BLOCK_C channels a two-pass (mean, M2), chunks merged with Chan's
formula, as kernels/triton/layer_norm_2d.py does (whose `_chunk` loader this reuses).
Layout: any strides; tile shapes follow the contiguous axis (NCHW: wide along pixels).
s and t are read from device memory: no host sync, CUDA-graph safe. Accumulation float32;
inputs float32, bfloat16 or float16. Limits: H*W and C each below 2**31.
Equivalent code: `wuerstchen_fast.ops.reference.mixing.norm_mod`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layer_norm_2d import _chunk, _tiles
from .rounding import rne_flag, to_out

__all__ = ["norm_mod_fwd", "norm_mod_bwd", "COMPILE_SPECS"]


@triton.jit
def _stats(X, xoff, sxc, C, pmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = 0.0
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        cmean = tl.sum(v, axis=0) / cnt
        d = tl.where(m, v - cmean[None, :], 0.0)
        n_new = n + cnt
        delta = cmean - mean
        mean += delta * (cnt / n_new)
        m2 += tl.sum(d * d, axis=0) + delta * delta * (n * cnt / n_new)
        n = n_new
    return mean, m2


@triton.jit
def _norm_mod_fwd_kernel(
    X, S, T, Y, C, HW, W,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, RNE: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    xoff = b * sxb + h * sxh + w * sxw
    yoff = b * syb + h * syh + w * syw
    mean, m2 = _stats(X, xoff, sxc, C, pmask, BLOCK_C, BLOCK_P)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    scale = 1.0 + tl.load(S).to(tl.float32)
    shift = tl.load(T).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        y = (v - mean[None, :]) * rstd[None, :] * scale + shift
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(Y + yoff[None, :] + c[:, None].to(tl.int64) * syc, to_out(y, Y.dtype.element_ty, RNE), mask=m)


@triton.jit
def _norm_mod_bwd_kernel(
    DY, X, S, DX, PART, C, HW, W,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, RNE: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    goff = b * sgb + h * sgh + w * sgw
    xoff = b * sxb + h * sxh + w * sxw
    ooff = b * sob + h * soh + w * sow
    mean, m2 = _stats(X, xoff, sxc, C, pmask, BLOCK_C, BLOCK_P)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    # pass 2: Σdy and Σdy·xhat per pixel (xhat from the final statistics: no running correction)
    gs = tl.zeros([BLOCK_P], dtype=tl.float32)
    gx = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        g, m, cnt = _chunk(DY, goff, sgc, c0, C, pmask, BLOCK_C)
        xhat = tl.where(m, (v - mean[None, :]) * rstd[None, :], 0.0)
        gs += tl.sum(g, axis=0)
        gx += tl.sum(g * xhat, axis=0)
    scale = 1.0 + tl.load(S).to(tl.float32)
    # dx = rstd·scale·(dy − mean(dy) − xhat·mean(dy·xhat))
    mg = gs / C
    mgx = gx / C
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        g, m, cnt = _chunk(DY, goff, sgc, c0, C, pmask, BLOCK_C)
        xhat = (v - mean[None, :]) * rstd[None, :]
        dx = (rstd * scale)[None, :] * (g - mg[None, :] - xhat * mgx[None, :])
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(DX + ooff[None, :] + c[:, None].to(tl.int64) * soc, to_out(dx, DX.dtype.element_ty, RNE), mask=m)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(PART + pid * 2, tl.sum(tl.where(pmask, gx, 0.0), axis=0))
    tl.store(PART + pid * 2 + 1, tl.sum(tl.where(pmask, gs, 0.0), axis=0))


def _out_like(x):
    from wuerstchen_fast.ops.layout import empty_out_like

    return empty_out_like(x)


def norm_mod_fwd(x, scale, shift, eps):
    y = _out_like(x)
    B, C, H, W = x.shape
    if x.numel() == 0:
        return y
    bc, bp, nw = _tiles(x)
    grid = (triton.cdiv(H * W, bp), B)
    _norm_mod_fwd_kernel[grid](x, scale, shift, y, C, H * W, W, *x.stride(), *y.stride(), eps,
                               BLOCK_C=bc, BLOCK_P=bp, RNE=rne_flag(y), num_warps=nw)
    return y


def norm_mod_bwd(grad, x, scale, eps):
    """-> (dx, dscale, dshift); dscale/dshift are 0-d float32 sums (cast by the caller)."""
    dx = _out_like(x)
    B, C, H, W = x.shape
    if x.numel() == 0:
        z = torch.zeros((), device=x.device)
        return dx, z, z.clone()
    bc, bp, nw = _tiles(x)
    grid = (triton.cdiv(H * W, bp), B)
    part = torch.empty(grid[0] * grid[1], 2, device=x.device, dtype=torch.float32)
    _norm_mod_bwd_kernel[grid](grad, x, scale, dx, part, C, H * W, W, *grad.stride(), *x.stride(), *dx.stride(),
                               eps, BLOCK_C=bc, BLOCK_P=bp, RNE=rne_flag(dx), num_warps=nw)
    return dx, part[:, 0].sum(), part[:, 1].sum()  # two tensors: custom op outputs must not alias


def _signature(kernel, dtype: str) -> dict:
    sig = {}
    for n in kernel.arg_names:
        if n in ("X", "Y", "DY", "DX"):
            sig[n] = f"*{dtype}"
        elif n in ("S", "T"):
            sig[n] = f"*{dtype}"
        elif n == "PART":
            sig[n] = "*fp32"
        elif n == "eps":
            sig[n] = "fp32"
        elif n.isupper() and n not in ("C", "HW", "W"):
            sig[n] = "constexpr"
        else:
            sig[n] = "i64" if n.startswith("s") else "i32"
    return sig


# Released Stage A: c = 192 at 256x256 and c = 384 at 128x128 (the 12 bottleneck blocks), NCHW, bf16:
# the launcher's NCHW tiles (BLOCK_C=16, BLOCK_P=128).
COMPILE_SPECS = [
    dict(name=f"mixing.{k.fn.__name__}[nchw]", kernel=k, signature=_signature(k, "bf16"),
         constexprs=dict(BLOCK_C=16, BLOCK_P=128, RNE=False), num_warps=4)
    for k in (_norm_mod_fwd_kernel, _norm_mod_bwd_kernel)
]
