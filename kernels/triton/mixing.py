"""Stage A mixing block: LayerNorm over channels + scalar modulation (norm_mod), and the replication-padded
3x3 depthwise conv + gamma scale + residual that follows it (dwconv, the second half of this file),
forward and backward.

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

from .layer_norm_2d import _chunk, _pixel_tile, _stats, _tiles
from .rounding import rne_flag, to_out

__all__ = ["norm_mod_fwd", "norm_mod_bwd", "dwconv_fwd", "dwconv_bwd", "COMPILE_SPECS"]


@triton.jit
def _norm_mod_fwd_kernel(
    X, S, T, Y, C, HW, W,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, RNE: tl.constexpr,
):
    b, pmask, h, w = _pixel_tile(HW, W, BLOCK_P)
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
    DY, X, S, R, DX, PART, C, HW, W,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    srb, src, srh, srw,
    sob, soc, soh, sow,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, RNE: tl.constexpr, HAS_R: tl.constexpr,
):
    b, pmask, h, w = _pixel_tile(HW, W, BLOCK_P)
    goff = b * sgb + h * sgh + w * sgw
    xoff = b * sxb + h * sxh + w * sxw
    ooff = b * sob + h * soh + w * sow
    roff = b * srb + h * srh + w * srw
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
        if HAS_R:  # a residual gradient added to dx (mixing_mlp's x + ...): rounded once, as x's own add
            dx = dx.to(DX.dtype.element_ty).to(tl.float32)
            dx += tl.load(R + roff[None, :] + c[:, None].to(tl.int64) * src, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + ooff[None, :] + c[:, None].to(tl.int64) * soc, to_out(dx, DX.dtype.element_ty, RNE), mask=m)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(PART + pid * 2, tl.sum(tl.where(pmask, gx, 0.0), axis=0))
    tl.store(PART + pid * 2 + 1, tl.sum(tl.where(pmask, gs, 0.0), axis=0))


def _out_like(x):
    from wuerstchen_fast.ops.layout import empty_out_like

    return empty_out_like(x)


def norm_mod_fwd(x, scale, shift, eps, out=None):
    """LN(x)·(1 + scale) + shift into `out` (any strides; e.g. the channels-last rows the MLP's GEMM reads,
    kernels/triton/mixing_mlp.py), else into a new tensor in x's layout rule."""
    y = _out_like(x) if out is None else out
    B, C, H, W = x.shape
    if x.numel() == 0:
        return y
    bc, bp, nw = _tiles(x)
    grid = (triton.cdiv(H * W, bp), B)
    _norm_mod_fwd_kernel[grid](x, scale, shift, y, C, H * W, W, *x.stride(), *y.stride(), eps,
                               BLOCK_C=bc, BLOCK_P=bp, RNE=rne_flag(y), num_warps=nw)
    return y


def norm_mod_bwd(grad, x, scale, eps, residual=None):
    """-> (dx, dscale, dshift); dscale/dshift are 0-d float32 sums (cast by the caller). With `residual`
    (any strides), dx = residual + the norm's input gradient, in one pass."""
    dx = _out_like(x)
    B, C, H, W = x.shape
    if x.numel() == 0:
        z = torch.zeros((), device=x.device)
        return dx, z, z.clone()
    bc, bp, nw = _tiles(x)
    grid = (triton.cdiv(H * W, bp), B)
    part = torch.empty(grid[0] * grid[1], 2, device=x.device, dtype=torch.float32)
    r = residual if residual is not None else grad
    _norm_mod_bwd_kernel[grid](grad, x, scale, r, dx, part, C, H * W, W, *grad.stride(), *x.stride(), *r.stride(),
                               *dx.stride(), eps, BLOCK_C=bc, BLOCK_P=bp, RNE=rne_flag(dx),
                               HAS_R=residual is not None, num_warps=nw)
    # The cross-program sums run over every element of the tensor: float64, then back to float32.
    total = part.sum(0, dtype=torch.float64).float()
    return dx, total[0], total[1].clone()  # two tensors: custom op outputs must not alias


def _signature(kernel, dtype: str) -> dict:
    sig = {}
    for n in kernel.arg_names:
        if n in ("X", "Y", "DY", "DX", "R"):
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
    dict(name="mixing._norm_mod_fwd_kernel[nchw]", kernel=_norm_mod_fwd_kernel,
         signature=_signature(_norm_mod_fwd_kernel, "bf16"), constexprs=dict(BLOCK_C=16, BLOCK_P=128, RNE=False),
         num_warps=4),
] + [
    dict(name="mixing._norm_mod_bwd_kernel[nchw]" + ("[residual]" if r else ""), kernel=_norm_mod_bwd_kernel,
         signature=_signature(_norm_mod_bwd_kernel, "bf16"),
         constexprs=dict(BLOCK_C=16, BLOCK_P=128, RNE=False, HAS_R=r), num_warps=4)
    for r in (False, True)
]


# ------------------------------------------------------------------------------ depthwise conv block
# Stage A's first residual branch after norm_mod:  y = x + (conv3x3_dw(replpad1(xn)) + bias)·g
#   forward   y[b,c,h,w] = x + g·(bias[c] + Σ_ij w[c,i,j]·xn[b, c, clamp(h+i−1), clamp(w+j−1)])
#   backward  dxn[h,w] = g·Σ_ij w[i,j]·Σ_{h'∈A_i(h), w'∈A_j(w)} dy[h',w'],  A_i(h) = {h' : clamp(h'+i−1) = h}
#             = {h−i+1 (in range)} ∪ {0 if i = 0 and h = 0} ∪ {H−1 if i = 2 and h = H−1}   (the pad's fold)
#             S[c,ij] = Σ dy·xn[shift_ij], Sg[c] = Σ dy: per-tile partials (no atomics), summed by the
#             launcher into dw = g·S, dbias = g·Sg, dg = Σ w·S + bias·Sg;  dx = dy (the residual).
# Tiles (BLOCK_C channels x BLOCK_P pixels, wide along the contiguous axis), any strides, accumulation
# float32, bias / gamma read from device memory (no host sync). Weight (C, 1, 3, 3) contiguous.

@triton.jit
def _clamp(v, n):
    return tl.minimum(tl.maximum(v, 0), n - 1)


@triton.jit
def _src(h, H, I: tl.constexpr, O: tl.constexpr):
    """Option O of A_I(h) (see above): the source row and whether it exists."""
    if O == 0:
        r = h - I + 1
        ok = (r >= 0) & (r < H)
    elif I == 0:
        r = h * 0
        ok = h == 0
    elif I == 2:
        r = h * 0 + H - 1
        ok = h == H - 1
    else:
        r = h * 0
        ok = h < 0
    return r, ok


@triton.jit
def _dw_fwd_kernel(
    X, XN, WT, BS, G, Y, C, H, W,
    sxb, sxc, sxh, sxw,
    snb, snc, snh, snw,
    syb, syc, syh, syw,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, RNE: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    h = p // W
    w = p % W
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = cmask[:, None] & pmask[None, :]
    c64 = c.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for i in tl.static_range(3):
        hh = _clamp(h + i - 1, H).to(tl.int64)
        for j in tl.static_range(3):
            ww = _clamp(w + j - 1, W).to(tl.int64)
            v = tl.load(XN + b * snb + c64 * snc + (hh * snh + ww * snw)[None, :], mask=m, other=0.0)
            wt = tl.load(WT + c * 9 + (i * 3 + j), mask=cmask, other=0.0).to(tl.float32)
            acc += wt[:, None] * v.to(tl.float32)
    bias = tl.load(BS + c, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32)
    h64, w64 = h.to(tl.int64), w.to(tl.int64)
    x = tl.load(X + b * sxb + c64 * sxc + (h64 * sxh + w64 * sxw)[None, :], mask=m, other=0.0).to(tl.float32)
    y = x + (acc + bias[:, None]) * g
    tl.store(Y + b * syb + c64 * syc + (h64 * syh + w64 * syw)[None, :], to_out(y, Y.dtype.element_ty, RNE), mask=m)


@triton.jit
def _dw_bwd_kernel(
    GY, XN, WT, G, DXN, PART, C, H, W,
    sgb, sgc, sgh, sgw,
    snb, snc, snh, snw,
    sob, soc, soh, sow,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, RNE: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    h = p // W
    w = p % W
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = cmask[:, None] & pmask[None, :]
    c64 = c.to(tl.int64)[:, None]
    h64, w64 = h.to(tl.int64), w.to(tl.int64)
    gy = tl.load(GY + b * sgb + c64 * sgc + (h64 * sgh + w64 * sgw)[None, :], mask=m, other=0.0).to(tl.float32)
    # partial sums for dw, dbias, dg: S[c, ij] = Σ_p dy·xn[shift_ij(p)], Sg[c] = Σ_p dy
    base = PART + ((tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)) * C + c) * 10
    for i in tl.static_range(3):
        hh = _clamp(h + i - 1, H).to(tl.int64)
        for j in tl.static_range(3):
            ww = _clamp(w + j - 1, W).to(tl.int64)
            v = tl.load(XN + b * snb + c64 * snc + (hh * snh + ww * snw)[None, :], mask=m, other=0.0)
            tl.store(base + (i * 3 + j), tl.sum(gy * v.to(tl.float32), axis=1), mask=cmask)
    tl.store(base + 9, tl.sum(gy, axis=1), mask=cmask)
    # dxn: the transposed conv, with the replication pad's border fold
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for i in tl.static_range(3):
        for oi in tl.static_range(2):
            r, rok = _src(h, H, i, oi)
            r64 = r.to(tl.int64)
            for j in tl.static_range(3):
                wt = tl.load(WT + c * 9 + (i * 3 + j), mask=cmask, other=0.0).to(tl.float32)
                for oj in tl.static_range(2):
                    q, qok = _src(w, W, j, oj)
                    mk = m & (rok & qok)[None, :]
                    v = tl.load(GY + b * sgb + c64 * sgc + (r64 * sgh + q.to(tl.int64) * sgw)[None, :], mask=mk,
                                other=0.0)
                    acc += wt[:, None] * v.to(tl.float32)
    g = tl.load(G).to(tl.float32)
    tl.store(DXN + b * sob + c64 * soc + (h64 * soh + w64 * sow)[None, :], to_out(acc * g, DXN.dtype.element_ty, RNE),
             mask=m)


def _dw_tiles(x):
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels-last
        return min(32, triton.next_power_of_2(x.shape[1])), min(8, triton.next_power_of_2(x.shape[2] * x.shape[3])), 4
    # 4 x 128 (not 8 x 128): the forward's nine tap loads in flight need 255 registers at 8 rows, 96 at 4
    return min(4, triton.next_power_of_2(x.shape[1])), min(128, triton.next_power_of_2(x.shape[2] * x.shape[3])), 4


def dwconv_fwd(x, xn, weight, bias, gamma):
    """x + (conv3x3_dw(replication_pad1(xn)) + bias)·gamma, in x's dtype and layout rule."""
    y = _out_like(x)
    B, C, H, W = x.shape
    if x.numel() == 0:
        return y
    bc, bp, nw = _dw_tiles(xn)
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B)
    _dw_fwd_kernel[grid](x, xn, weight.contiguous(), bias, gamma, y, C, H, W, *x.stride(), *xn.stride(), *y.stride(),
                         BLOCK_C=bc, BLOCK_P=bp, RNE=rne_flag(y), num_warps=nw)
    return y


def dwconv_bwd(grad, xn, weight, bias, gamma):
    """-> (dxn, dweight, dbias, dgamma); the last three float32 (cast by the caller)."""
    B, C, H, W = xn.shape
    dxn = _out_like(xn)
    if xn.numel() == 0:
        z = torch.zeros((), device=xn.device)
        return dxn, torch.zeros(weight.shape, device=xn.device), torch.zeros(C, device=xn.device), z
    bc, bp, nw = _dw_tiles(xn)
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B)
    part = torch.empty(grid[0] * B, C, 10, device=xn.device, dtype=torch.float32)
    _dw_bwd_kernel[grid](grad, xn, weight.contiguous(), gamma, dxn, part, C, H, W, *grad.stride(), *xn.stride(),
                         *dxn.stride(), BLOCK_C=bc, BLOCK_P=bp, RNE=rne_flag(dxn), num_warps=nw)
    s = part.sum(0, dtype=torch.float64)  # (C, 10); sums over every pixel of every tile, so float64
    g = gamma.double()
    taps, sg = s[:, :9], s[:, 9]
    dg = (weight.double().reshape(C, 9) * taps).sum() + (bias.double() * sg).sum()
    return dxn, (taps * g).reshape(weight.shape).float(), (sg * g).float(), dg.float()


def _dw_signature(kernel, dtype):
    sig = {}
    for n in kernel.arg_names:
        if n == "PART":
            sig[n] = "*fp32"
        elif n in ("C", "H", "W"):
            sig[n] = "i32"
        elif n in ("BLOCK_C", "BLOCK_P", "RNE"):
            sig[n] = "constexpr"
        elif n.isupper():
            sig[n] = f"*{dtype}"
        else:
            sig[n] = "i64"
    return sig


# Released Stage A: bf16, c = 192 at 256x256 and 384 at 128x128: the launcher's NCHW and channels-last tiles.
COMPILE_SPECS += [
    dict(name=f"mixing.{k.fn.__name__}[{lay}]", kernel=k, signature=_dw_signature(k, "bf16"),
         constexprs=dict(BLOCK_C=bc, BLOCK_P=bp, RNE=False), num_warps=4)
    for k in (_dw_fwd_kernel, _dw_bwd_kernel) for lay, bc, bp in (("nchw", 4, 128), ("channels_last", 32, 8))
]
