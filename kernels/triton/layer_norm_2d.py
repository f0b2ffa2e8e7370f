"""layer_norm_2d in Triton: LayerNorm over the channels of a (B, C, H, W) tensor, no affine.

Math (per pixel over its C channels):
    mean, var over C (biased), rstd = (var + eps)^-½,  y = (x - mean)·rstd
Statistics: per chunk of BLOCK_C channels a two-pass (mean, M2) in registers, chunks merged with
Chan's formula; a plain float32 running sum over C = 1280 would be ~6x less accurate than torch.
Backward recomputes mean and rstd from x (nothing saved) and also needs Σdy and Σdy·(x - mean):
    dx = rstd·(dy - mean(dy) - xhat·mean(dy·xhat))
Layout: any strides. A program takes BLOCK_P pixels of one batch and walks the channels in chunks
of BLOCK_C twice (statistics, then output), so registers do not grow with C. The launcher picks
tile shapes from the layout: wide along pixels for NCHW (pixels contiguous), wide along channels
for channels-last. Accumulation in float32; inputs float32, bfloat16 or float16.
Limits: offsets are computed in int64 per batch; H*W and C each below 2**31.
Equivalent code: `wuerstchen_fast.ops.reference.layer_norm_2d`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["layer_norm_2d_fwd", "layer_norm_2d_bwd", "COMPILE_SPECS"]


@triton.jit
def _pixel_tile(HW, W, BLOCK_P: tl.constexpr):
    """This program's tile of the (pixel tiles, B) grid: batch b, the mask of its BLOCK_P pixels, and
    their (h, w); b, h, w in int64 for the offsets b·s_b + h·s_h + w·s_w of any strides."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, p < HW, (p // W).to(tl.int64), (p % W).to(tl.int64)


@triton.jit
def _chunk(P, off, sc, c0, C, pmask, BLOCK_C: tl.constexpr):
    """Load channels [c0, c0 + BLOCK_C) of BLOCK_P pixels as float32 (0 outside); its mask and count."""
    c = c0 + tl.arange(0, BLOCK_C)
    m = (c < C)[:, None] & pmask[None, :]
    v = tl.load(P + off[None, :] + c[:, None].to(tl.int64) * sc, mask=m, other=0.0).to(tl.float32)
    return v, m, tl.minimum(C - c0, BLOCK_C).to(tl.float32)


@triton.jit
def _stats(X, xoff, sxc, C, pmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-pixel (mean, M2) over the C channels: Chan's parallel combination of per-chunk (count, mean,
    M2), accurate for any C and offset. Shared by every kernel that normalises over channels."""
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
def _ln2d_fwd_kernel(
    X, Y, C, HW, W,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, pmask, h, w = _pixel_tile(HW, W, BLOCK_P)
    xoff = b * sxb + h * sxh + w * sxw
    yoff = b * syb + h * syh + w * syw
    mean, m2 = _stats(X, xoff, sxc, C, pmask, BLOCK_C, BLOCK_P)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        y = (v - mean[None, :]) * rstd[None, :]
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(Y + yoff[None, :] + c[:, None].to(tl.int64) * syc, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _ln2d_bwd_kernel(
    DY, X, DX, C, HW, W,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, pmask, h, w = _pixel_tile(HW, W, BLOCK_P)
    goff = b * sgb + h * sgh + w * sgw
    xoff = b * sxb + h * sxh + w * sxw
    ooff = b * sob + h * soh + w * sow
    # As the forward, plus gs = Σdy and ga = Σdy·(x - mean), kept relative to the running mean:
    # when the mean moves by δ, ga -= δ·gs.
    n = 0.0
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    gs = tl.zeros([BLOCK_P], dtype=tl.float32)
    ga = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        g, m, cnt = _chunk(DY, goff, sgc, c0, C, pmask, BLOCK_C)
        cmean = tl.sum(v, axis=0) / cnt
        d = tl.where(m, v - cmean[None, :], 0.0)
        cgs = tl.sum(g, axis=0)
        n_new = n + cnt
        delta = cmean - mean
        new_mean = mean + delta * (cnt / n_new)
        m2 += tl.sum(d * d, axis=0) + delta * delta * (n * cnt / n_new)
        ga += tl.sum(g * d, axis=0) - (new_mean - mean) * gs - (new_mean - cmean) * cgs
        gs += cgs
        mean = new_mean
        n = n_new
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    # dx = rstd·(dy - mean(dy) - xhat·mean(dy·xhat)) = a·dy + bc·x + c, per pixel
    mdyx = rstd * ga / C
    a = rstd
    bc = -rstd * rstd * mdyx
    c_ = -rstd * (gs / C) - bc * mean
    for c0 in range(0, C, BLOCK_C):
        v, m, cnt = _chunk(X, xoff, sxc, c0, C, pmask, BLOCK_C)
        g, m, cnt = _chunk(DY, goff, sgc, c0, C, pmask, BLOCK_C)
        dx = a[None, :] * g + bc[None, :] * v + c_[None, :]
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(DX + ooff[None, :] + c[:, None].to(tl.int64) * soc, dx.to(DX.dtype.element_ty), mask=m)


def _tiles(x: torch.Tensor) -> tuple:
    """(BLOCK_C, BLOCK_P, num_warps): wide along whichever axis is contiguous in memory."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    if x.stride(1) == 1 and C > 1:  # channels-last: coalesce along channels
        return min(128, triton.next_power_of_2(C)), min(16, triton.next_power_of_2(HW)), 4
    return min(16, triton.next_power_of_2(C)), min(128, triton.next_power_of_2(HW)), 4


def _out_like(x: torch.Tensor) -> torch.Tensor:
    from wuerstchen_fast.ops.layout import empty_out_like

    return empty_out_like(x)


def layer_norm_2d_fwd(x: torch.Tensor, eps: float) -> torch.Tensor:
    y = _out_like(x)
    B, C, H, W = x.shape
    if x.numel() == 0:
        return y
    bc, bp, nw = _tiles(x)
    grid = (triton.cdiv(H * W, bp), B)
    _ln2d_fwd_kernel[grid](x, y, C, H * W, W, *x.stride(), *y.stride(), eps,
                           BLOCK_C=bc, BLOCK_P=bp, num_warps=nw)
    return y


def layer_norm_2d_bwd(grad: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    dx = _out_like(x)
    B, C, H, W = x.shape
    if x.numel() == 0:
        return dx
    bc, bp, nw = _tiles(x)
    grid = (triton.cdiv(H * W, bp), B)
    _ln2d_bwd_kernel[grid](grad, x, dx, C, H * W, W, *grad.stride(), *x.stride(), *dx.stride(), eps,
                           BLOCK_C=bc, BLOCK_P=bp, num_warps=nw)
    return dx


def _signature(kernel, n_ptrs: int, dtype: str) -> dict:
    names = kernel.arg_names
    sig = {}
    for i, n in enumerate(names):
        if i < n_ptrs:
            sig[n] = f"*{dtype}"
        elif n == "eps":
            sig[n] = "fp32"
        elif n.startswith("BLOCK"):
            sig[n] = "constexpr"
        else:
            sig[n] = "i64" if n.startswith("s") else "i32"
    return sig


# What the compile test builds for sm_80/sm_90: the tile shapes the launcher picks at the released
# shapes (Stage B level 0: C=320, 128x128 NCHW; Stage C: C=1536, 24x24 channels-last), in bf16.
COMPILE_SPECS = [
    dict(name=f"{k.fn.__name__}[{layout}]", kernel=k, signature=_signature(k, n, "bf16"),
         constexprs=dict(BLOCK_C=bc, BLOCK_P=bp), num_warps=4)
    for k, n in ((_ln2d_fwd_kernel, 2), (_ln2d_bwd_kernel, 3))
    for layout, bc, bp in (("nchw", 16, 128), ("nhwc", 128, 16))
]
