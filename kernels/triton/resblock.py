"""The ConvNeXt ResBlock (Stage C `ResBlock`, Stage B `ResBlockStageB`) in Triton.

Math (per block; u = cat[x, skip] for Stage C, u = x for Stage B; KG = channels of u / C):
    d  = depthwise_conv(u, Wd) + bd               (groups = C, KG inputs per group, KS x KS, zero pad)
    xn = LayerNorm_C(d)                            (no affine, eps)
    h  = xn·W1[:, :C]ᵀ (+ skip·W1[:, C:]ᵀ for Stage B: split K, never a concatenated input) + b1
    g  = GELU(h);  S_bn = Σ_p g²;  s = 1 + γ·G/(mean G + 1e-6), G = √S       (GRN, kernels/grn.py)
    out = (g ⊙ s_b + β)·W2ᵀ + b2 + x               (GRN applied in the second Linear's prologue)
    [folded TimestepBlock (either stage): out = out·(1 + a) + b]
Kernels:
    _dwconv_ln   depthwise conv + bias + LayerNorm in one program per BLOCK_P pixels, channels-last
                 output xn (M = B·H·W rows, C); pass 1 writes the conv result (rounded to the output
                 dtype, as eager) and merges Chan statistics, pass 2 normalises it in place. Saves
                 rstd per pixel; can also write r = x + b2 in the output layout (the cuBLAS variant's
                 GEMM2 accumulates onto it, so the residual add and the bias are free).
    _gemm1       xn (and skip) times W1ᵀ + b1 -> h; epilogue GELU and Σg² per (batch, column) (fp64
                 atomics); M tiles never straddle a batch (grid over batch x tiles of H·W).
    _gemm2       prologue GELU(h)·s_b + β on the A tile (performance.md's fold, with β kept in the
                 prologue rather than folded into the bias: exact, and free there), + b2, + x, optional modulation, any output
                 strides; optionally also stores the pre-modulation output for the backward.
    _ln_bwd      dd = rstd·(dxn − mean(dxn) − xn·mean(dxn·xn)) per row, float32.
    _dwconv_bwd  du (flipped taps over dd), dx = du + dout (residual), dskip, and dWd, dbd partial
                 sums per tile (float32 atomics).
Backward recomputes GELU(h) from the saved pre-activation h and uses the saved xn, rstd and GRN
statistics; the GEMMs of the backward are cuBLAS (torch.matmul) in both variants.
Layout: x, skip, out any strides (4-d, (B, C, H, W) indexing); xn, h, dd are row-major (M, ·).
Accumulation float32 (GEMMs: float32 accumulators, fp32 inputs with input_precision="ieee", not
TF32, as PyTorch's default); inputs float32, bfloat16, float16; bfloat16 stores round to nearest even,
under the interpreter too (rounding.py). Limits: odd KS; M, N·M below 2**31
per tensor offsets in int64 where they can overflow.
Equivalent code: `wuerstchen_fast.ops.reference.resblock` / `resblock_stage_b`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grn import _gelu, sig
from .rounding import rne_flag, to_out

__all__ = ["dwconv_ln", "gemm1", "gemm2", "ln_bwd", "dwconv_bwd", "COMPILE_SPECS"]


@triton.jit
def _conv_tile(X, SKIP, WD, BD, b, y, x, pm, c, cm, C, KG, H, W,
               sxb, sxc, sxh, sxw, skb, skc, skh, skw, KS: tl.constexpr, HAS_SKIP: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise conv + bias for BLOCK_P pixels (y, x) x BLOCK_C output channels c, float32."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for j in range(0, KG):
        ic = c * KG + j
        for t in range(0, KS * KS):  # not unrolled: 9 unrolled taps cost ~250 registers
            yy = y + (t // KS - KS // 2)
            xx = x + (t % KS - KS // 2)
            ok = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            sp = (yy.to(tl.int64) * sxh + xx.to(tl.int64) * sxw)[:, None]
            m = ok[:, None] & (cm & (ic < C))[None, :]
            v = tl.load(X + b * sxb + sp + ic.to(tl.int64)[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
            if HAS_SKIP:
                ks = ic - C
                msk = ok[:, None] & (cm & (ks >= 0))[None, :]
                spk = (yy.to(tl.int64) * skh + xx.to(tl.int64) * skw)[:, None]
                v += tl.load(SKIP + b * skb + spk + ks.to(tl.int64)[None, :] * skc, mask=msk, other=0.0).to(tl.float32)
            wv = tl.load(WD + (c * KG + j) * (KS * KS) + t, mask=cm, other=0.0).to(tl.float32)
            acc += v * wv[None, :]
    return acc + tl.load(BD + c, mask=cm, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _dwconv_ln_kernel(X, SKIP, WD, BD, XN, RSTD, R, BIAS2, C, KG, H, W, HW,
                      sxb, sxc, sxh, sxw, skb, skc, skh, skw, srb, src, srh, srw, eps,
                      KS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_R: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    y = p // W
    x = p % W
    row = (b * HW + p.to(tl.int64)) * C
    n = 0.0
    mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m = pm[:, None] & cm[None, :]
        d = _conv_tile(X, SKIP, WD, BD, b, y, x, pm, c, cm, C, KG, H, W,
                       sxb, sxc, sxh, sxw, skb, skc, skh, skw, KS, HAS_SKIP, BLOCK_P, BLOCK_C)
        d = to_out(d, XN.dtype.element_ty, RNE)
        tl.store(XN + row[:, None] + c[None, :], d, mask=m)
        d = tl.where(m, d.to(tl.float32), 0.0)
        cnt = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
        cmean = tl.sum(d, axis=1) / cnt
        dv = tl.where(m, d - cmean[:, None], 0.0)
        n_new = n + cnt
        delta = cmean - mean
        mean += delta * (cnt / n_new)
        m2 += tl.sum(dv * dv, axis=1) + delta * delta * (n * cnt / n_new)
        n = n_new
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    tl.store(RSTD + b * HW + p, rstd, mask=pm)
    tl.debug_barrier()  # pass 2 reads what pass 1 stored
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m = pm[:, None] & cm[None, :]
        d = tl.load(XN + row[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(XN + row[:, None] + c[None, :], to_out((d - mean[:, None]) * rstd[:, None], XN.dtype.element_ty, RNE),
                 mask=m)
        if HAS_R:
            cc = c.to(tl.int64)[None, :]
            sp = (y.to(tl.int64) * sxh + x.to(tl.int64) * sxw)[:, None]
            xv = tl.load(X + b * sxb + sp + cc * sxc, mask=m, other=0.0).to(tl.float32)
            xv += tl.load(BIAS2 + c, mask=cm, other=0.0).to(tl.float32)[None, :]
            spr = (y.to(tl.int64) * srh + x.to(tl.int64) * srw)[:, None]
            tl.store(R + b * srb + spr + cc * src, to_out(xv, R.dtype.element_ty, RNE), mask=m)


@triton.jit
def _mma(a, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a·w. IEEE: exact float32 products (no TF32). UPCAST: Triton's interpreter computes
    bfloat16 dots wrongly (numpy has no bfloat16), so under it bfloat16 tiles are widened first."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _gemm1_kernel(XN, SKIP, W1, B1, HOUT, SUMSQ, HW, W, C, CS, N, tiles_m,
                  skb, skc, skh, skw,
                  HAS_SKIP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = (tl.program_id(0) // tiles_m).to(tl.int64)
    p = (tl.program_id(0) % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pm = p < HW
    nm = n < N
    row = b * HW + p.to(tl.int64)
    K = C + CS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < C
        a = tl.load(XN + row[:, None] * C + k[None, :], mask=pm[:, None] & km[None, :], other=0.0)
        w = tl.load(W1 + n[None, :].to(tl.int64) * K + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        acc = _mma(a, w, acc, IEEE, UPCAST)
    if HAS_SKIP:  # the second K-input of the first Linear (Stage B): no concatenated tensor
        sp = ((p // W).to(tl.int64) * skh + (p % W).to(tl.int64) * skw)[:, None]
        for k0 in range(0, CS, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < CS
            a = tl.load(SKIP + b * skb + sp + k[None, :].to(tl.int64) * skc, mask=pm[:, None] & km[None, :], other=0.0)
            w = tl.load(W1 + n[None, :].to(tl.int64) * K + C + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)
            acc = _mma(a, w, acc, IEEE, UPCAST)
    h = acc + tl.load(B1 + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    h = to_out(h, HOUT.dtype.element_ty, RNE)
    m = pm[:, None] & nm[None, :]
    tl.store(HOUT + row[:, None] * N + n[None, :], h, mask=m)
    g = tl.where(m, _gelu(h.to(tl.float32)), 0.0).to(tl.float64)  # GRN sees the stored (rounded) h, as eager
    tl.atomic_add(SUMSQ + b * N + n, tl.sum(g * g, axis=0), mask=nm)


@triton.jit
def _gemm2_kernel(HIN, SCALE, BETA, W2, BIAS2, X, MODA, MODB, OUT, OPRE, HW, W, C, N, tiles_m,
                  sxb, sxc, sxh, sxw, sob, soc, soh, sow, spb, spc, sph, spw, sab, sac, smb, smc,
                  HAS_MOD: tl.constexpr, SAVE_PRE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = (tl.program_id(0) // tiles_m).to(tl.int64)
    p = (tl.program_id(0) % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pm = p < HW
    cm = c < C
    row = b * HW + p.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < N
        h = tl.load(HIN + row[:, None] * N + k[None, :], mask=pm[:, None] & km[None, :], other=0.0).to(tl.float32)
        s = tl.load(SCALE + b * N + k, mask=km, other=0.0).to(tl.float32)
        bt = tl.load(BETA + k, mask=km, other=0.0).to(tl.float32)
        a = to_out(_gelu(h) * s[None, :] + bt[None, :], W2.dtype.element_ty, RNE)  # GRN in the prologue
        w = tl.load(W2 + c[None, :].to(tl.int64) * N + k[:, None], mask=km[:, None] & cm[None, :], other=0.0)
        acc = _mma(a, w, acc, IEEE, UPCAST)
    m = pm[:, None] & cm[None, :]
    cc = c.to(tl.int64)[None, :]
    y = (p // W).to(tl.int64)
    x = (p % W).to(tl.int64)
    acc += tl.load(BIAS2 + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(X + b * sxb + (y * sxh + x * sxw)[:, None] + cc * sxc, mask=m, other=0.0).to(tl.float32)
    if HAS_MOD:
        if SAVE_PRE:
            tl.store(OPRE + b * spb + (y * sph + x * spw)[:, None] + cc * spc, to_out(acc, OPRE.dtype.element_ty, RNE),
                     mask=m)
        acc = to_out(acc, OUT.dtype.element_ty, RNE).to(tl.float32)  # the unfused model rounds here too
        ma = tl.load(MODA + b * sab + c * sac, mask=cm, other=0.0).to(tl.float32)
        mb = tl.load(MODB + b * smb + c * smc, mask=cm, other=0.0).to(tl.float32)
        acc = acc * (1.0 + ma[None, :]) + mb[None, :]
    tl.store(OUT + b * sob + (y * soh + x * sow)[:, None] + cc * soc, to_out(acc, OUT.dtype.element_ty, RNE), mask=m)


@triton.jit
def _ln_bwd_kernel(DXN, XN, RSTD, DD, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = r < M
    row = r.to(tl.int64) * C
    sg = tl.zeros([BLOCK_M], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rm[:, None] & (c < C)[None, :]
        g = tl.load(DXN + row[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        xn = tl.load(XN + row[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        sg += tl.sum(g, axis=1)
        sgx += tl.sum(g * xn, axis=1)
    rstd = tl.load(RSTD + r, mask=rm, other=0.0)
    # dd = rstd·g + kx·xn + k0 (kx = -rstd·mean(g·xn), k0 = -rstd·mean(g)): two roundings per value
    kx = -rstd * (sgx / C)
    k0 = -rstd * (sg / C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rm[:, None] & (c < C)[None, :]
        g = tl.load(DXN + row[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        xn = tl.load(XN + row[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        dd = tl.fma(rstd[:, None], g, tl.fma(kx[:, None], xn, k0[:, None]))
        tl.store(DD + row[:, None] + c[None, :], dd, mask=m)


@triton.jit
def _dwconv_bwd_kernel(DD, X, SKIP, WD, DOUT, DX, DSKIP, DWD, DBD, C, KG, H, W, HW,
                       sxb, sxc, sxh, sxw, skb, skc, skh, skw, sgb, sgc, sgh, sgw,
                       sdb, sdc, sdh, sdw, ssb, ssc, ssh, ssw,
                       KS: tl.constexpr, HAS_SKIP: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ic = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    pm = p < HW
    im = ic < C * KG
    oc = ic // KG
    j = ic % KG
    y = p // W
    x = p % W
    ddrow = b * HW
    du = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    is_x = ic < C
    dd_c = tl.load(DD + (ddrow + p.to(tl.int64))[:, None] * C + oc[None, :],
                   mask=pm[:, None] & im[None, :], other=0.0)
    for t in range(0, KS * KS):  # not unrolled: 9 unrolled taps cost ~250 registers
        dy_ = t // KS - KS // 2
        dx_ = t % KS - KS // 2
        wv = tl.load(WD + ic * (KS * KS) + t, mask=im, other=0.0).to(tl.float32)
        # du[y, x] += w[t]·dd[y - dy, x - dx]
        yy = y - dy_
        xx = x - dx_
        ok = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        m = ok[:, None] & im[None, :]
        ddv = tl.load(DD + (ddrow + (yy * W + xx).to(tl.int64))[:, None] * C + oc[None, :], mask=m, other=0.0)
        du += ddv * wv[None, :]
        # dW[t] += Σ_p dd[y, x]·u[y + dy, x + dx]
        yu = y + dy_
        xu = x + dx_
        oku = pm & (yu >= 0) & (yu < H) & (xu >= 0) & (xu < W)
        mu = oku[:, None] & (im & is_x)[None, :]
        u = tl.load(X + b * sxb + (yu.to(tl.int64) * sxh + xu.to(tl.int64) * sxw)[:, None]
                    + ic.to(tl.int64)[None, :] * sxc, mask=mu, other=0.0).to(tl.float32)
        if HAS_SKIP:
            mk = oku[:, None] & (im & (ic >= C))[None, :]
            u += tl.load(SKIP + b * skb + (yu.to(tl.int64) * skh + xu.to(tl.int64) * skw)[:, None]
                         + (ic - C).to(tl.int64)[None, :] * skc, mask=mk, other=0.0).to(tl.float32)
        tl.atomic_add(DWD + ic * (KS * KS) + t, tl.sum(dd_c * u, axis=0), mask=im)
    tl.atomic_add(DBD + oc, tl.sum(dd_c, axis=0), mask=im & (j == 0))
    sp = (y.to(tl.int64) * sgh + x.to(tl.int64) * sgw)[:, None]
    mx = pm[:, None] & (im & is_x)[None, :]
    icl = ic.to(tl.int64)[None, :]
    dres = tl.load(DOUT + b * sgb + sp + icl * sgc, mask=mx, other=0.0).to(tl.float32)
    spx = (y.to(tl.int64) * sdh + x.to(tl.int64) * sdw)[:, None]
    tl.store(DX + b * sdb + spx + icl * sdc, to_out(du + dres, DX.dtype.element_ty, RNE), mask=mx)
    if HAS_SKIP:
        mk = pm[:, None] & (im & (ic >= C))[None, :]
        sps = (y.to(tl.int64) * ssh + x.to(tl.int64) * ssw)[:, None]
        tl.store(DSKIP + b * ssb + sps + (ic - C).to(tl.int64)[None, :] * ssc, to_out(du, DSKIP.dtype.element_ty, RNE), mask=mk)


# ------------------------------------------------------------------------------ launchers

CONV_TILE = dict(BLOCK_P=16, BLOCK_C=64)
GEMM_WARPS = 8  # fp32 accumulators over 256 threads: <= 16 registers each, room for the epilogues
GEMM_STAGES = 2  # the A tiles go through registers (GELU/GRN prologue): deeper pipelines only add registers
CONV_BWD_TILE = dict(BLOCK_P=16, BLOCK_C=32)
LN_BWD_TILE = dict(BLOCK_M=16, BLOCK_C=64)


def gemm_tiles(M_per_batch: int, N: int, K: int, dtype: torch.dtype, which: int = 1) -> dict:
    """Tile shapes of the Triton GEMMs (8 warps): GEMM1 64x64x32, GEMM2 32x64x32 (its GELU·s + β
    prologue and residual/modulation epilogue cost registers: 64-row tiles reach 128-255 registers
    per thread), 32x64x32 for float32, smaller for tiny problems (so the interpreter stays fast)."""
    if dtype == torch.float32 or which == 2:
        bm, bn, bk = 32, 64, 32
    else:
        bm, bn, bk = 64, 64, 32
    bm = max(16, min(bm, triton.next_power_of_2(M_per_batch)))
    bn = max(16, min(bn, triton.next_power_of_2(N)))
    bk = max(16, min(bk, triton.next_power_of_2(K)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def _upcast(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"  # only the interpreter runs CPU tensors


def dwconv_ln(x, skip, wd, bd, eps, r=None, bias2=None):
    """(xn (M, C) row-major in x.dtype, rstd (M,) float32); writes r = x + bias2 when given."""
    B, C, H, W = x.shape
    KG = wd.shape[1]
    xn = torch.empty(B * H * W, C, device=x.device, dtype=x.dtype)
    rstd = torch.empty(B * H * W, device=x.device, dtype=torch.float32)
    if xn.numel():
        sk = skip if skip is not None else x
        rr = r if r is not None else x
        grid = (triton.cdiv(H * W, CONV_TILE["BLOCK_P"]), B)
        _dwconv_ln_kernel[grid](x, sk, wd, bd, xn, rstd, rr, bias2 if bias2 is not None else rstd,
                                C, KG, H, W, H * W, *x.stride(), *sk.stride(), *rr.stride(), eps,
                                KS=wd.shape[-1], HAS_SKIP=skip is not None, HAS_R=r is not None,
                                RNE=rne_flag(xn), num_warps=4, **CONV_TILE)
    return xn, rstd


def gemm1(xn, skip, w1, b1, B, H, W):
    """(h (M, N) in xn.dtype, Σ GELU(h)² (B, N) float64)."""
    M, C = xn.shape
    N = w1.shape[0]
    CS = skip.shape[1] if skip is not None else 0
    h = torch.empty(M, N, device=xn.device, dtype=xn.dtype)
    sumsq = torch.zeros(B, N, device=xn.device, dtype=torch.float64)
    if M and N:
        t = gemm_tiles(H * W, N, C + CS, xn.dtype)
        tiles_m = triton.cdiv(H * W, t["BLOCK_M"])
        sk = skip if skip is not None else xn.view(B, H, W, C)
        skst = sk.stride() if skip is not None else (0, 0, 0, 0)
        _gemm1_kernel[(B * tiles_m, triton.cdiv(N, t["BLOCK_N"]))](
            xn, sk, w1, b1, h, sumsq, H * W, W, C, CS, N, tiles_m, *skst,
            HAS_SKIP=skip is not None, IEEE=xn.dtype == torch.float32, UPCAST=_upcast(xn), RNE=rne_flag(h),
            num_warps=GEMM_WARPS, num_stages=GEMM_STAGES, **t)
    return h, sumsq


def gemm2(h, scale, beta, w2, bias2, x, mod, out, opre):
    """out = (GELU(h)·s_b + β)·W2ᵀ + bias2 + x (then ·(1 + a) + b with mod = (a, b); opre keeps the value before)."""
    B, C, H, W = x.shape
    N = h.shape[1]
    if out.numel():
        t = gemm_tiles(H * W, C, N, h.dtype, which=2)
        tiles_m = triton.cdiv(H * W, t["BLOCK_M"])
        a, bm = mod if mod is not None else (bias2, bias2)
        ma = a.stride() if mod is not None else (0, 0)
        mb = bm.stride() if mod is not None else (0, 0)
        op = opre if opre is not None else out
        _gemm2_kernel[(B * tiles_m, triton.cdiv(C, t["BLOCK_N"]))](
            h, scale, beta, w2, bias2, x, a, bm, out, op, H * W, W, C, N, tiles_m,
            *x.stride(), *out.stride(), *op.stride(), *ma, *mb,
            HAS_MOD=mod is not None, SAVE_PRE=opre is not None, IEEE=h.dtype == torch.float32,
            UPCAST=_upcast(h), RNE=rne_flag(out), num_warps=GEMM_WARPS, num_stages=GEMM_STAGES, **t)
    return out


def ln_bwd(dxn, xn, rstd):
    M, C = xn.shape
    dd = torch.empty(M, C, device=xn.device, dtype=torch.float32)
    if dd.numel():
        _ln_bwd_kernel[(triton.cdiv(M, LN_BWD_TILE["BLOCK_M"]),)](dxn, xn, rstd, dd, M, C, num_warps=4, **LN_BWD_TILE)
    return dd


def dwconv_bwd(dd, x, skip, wd, dout, dx, dskip):
    """Writes dx = conv_input_grad + dout and dskip; returns (dWd, dbd) float32."""
    B, C, H, W = x.shape
    KG = wd.shape[1]
    dwd = torch.zeros(wd.shape, device=x.device, dtype=torch.float32)
    dbd = torch.zeros(C, device=x.device, dtype=torch.float32)
    if x.numel():
        sk = skip if skip is not None else x
        ds = dskip if dskip is not None else dx
        grid = (triton.cdiv(H * W, CONV_BWD_TILE["BLOCK_P"]), triton.cdiv(C * KG, CONV_BWD_TILE["BLOCK_C"]), B)
        _dwconv_bwd_kernel[grid](dd, x, sk, wd, dout, dx, ds, dwd, dbd, C, KG, H, W, H * W,
                                 *x.stride(), *sk.stride(), *dout.stride(), *dx.stride(), *ds.stride(),
                                 KS=wd.shape[-1], HAS_SKIP=skip is not None, RNE=rne_flag(dx), num_warps=4,
                                 **CONV_BWD_TILE)
    return dwd, dbd


# ------------------------------------------------------------------------------ compile specs

_BF16 = ("X", "SKIP", "WD", "BD", "XN", "R", "W1", "B1", "HOUT", "HIN", "W2", "MODA", "MODB", "OUT", "OPRE",
         "DXN", "DOUT", "DX", "DSKIP", "BIAS2", "BETA")
_F32 = ("RSTD", "DD", "DWD", "DBD")
_PTRS = {**{n: "*bf16" for n in _BF16}, **{n: "*fp32" for n in _F32}, "SUMSQ": "*fp64", "SCALE": "*fp64"}
# Stage C 24x24 (the Stage B levels pick the same tiles)
_REL1, _REL2 = gemm_tiles(576, 6144, 1536, torch.bfloat16, 1), gemm_tiles(576, 1536, 6144, torch.bfloat16, 2)
COMPILE_SPECS = [
    dict(name=f"resblock._dwconv_ln_kernel[skip{int(sk)},r{int(r)}]", kernel=_dwconv_ln_kernel,
         signature=sig(_dwconv_ln_kernel, _PTRS), constexprs=dict(KS=3, HAS_SKIP=sk, HAS_R=r, RNE=False, **CONV_TILE),
         num_warps=4)
    for sk, r in ((False, True), (False, False), (True, True))
] + [
    dict(name=f"resblock._gemm1_kernel[skip{int(sk)}]", kernel=_gemm1_kernel, signature=sig(_gemm1_kernel, _PTRS, "i32"),
         constexprs=dict(HAS_SKIP=sk, IEEE=False, UPCAST=False, RNE=False, **_REL1), num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)
    for sk in (False, True)
] + [
    dict(name=f"resblock._gemm2_kernel[mod{int(md)}]", kernel=_gemm2_kernel, signature=sig(_gemm2_kernel, _PTRS, "i32"),
         constexprs=dict(HAS_MOD=md, SAVE_PRE=md, IEEE=False, UPCAST=False, RNE=False, **_REL2), num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)
    for md in (False, True)
] + [
    dict(name="resblock._ln_bwd_kernel", kernel=_ln_bwd_kernel, signature=sig(_ln_bwd_kernel, _PTRS),
         constexprs=dict(LN_BWD_TILE), num_warps=4),
] + [
    dict(name=f"resblock._dwconv_bwd_kernel[skip{int(sk)}]", kernel=_dwconv_bwd_kernel,
         signature=sig(_dwconv_bwd_kernel, _PTRS), constexprs=dict(KS=3, HAS_SKIP=sk, RNE=False, **CONV_BWD_TILE), num_warps=4)
    for sk in (False, True)
]
