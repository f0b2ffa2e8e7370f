"""Stage A mixing block, second branch: LayerNorm + scalar modulation + MLP + gamma scale + residual.

Math (MixingResidualBlock; s, t, g are 0-d tensors, the block's gammas[3], [4], [5]; M = B·H·W rows):
    xn = LN_C(x)·(1 + s) + t                 (the norm_mod kernel of mixing.py, written as channels-last rows)
    h  = xn·W1ᵀ            (M, N)            cuBLAS (torch.mm), no bias
    a  = GELU(h + b1)                        _bias_gelu: exact erf GELU, bias added in float32
    y  = a·W2ᵀ             (M, C)            cuBLAS
    out = x + (y + b2)·g                     _residual: out in x's layout rule, x any strides
Backward (dout in, any strides):
    dz = dout·g (rows), Σ_p dout and Σ_p dout·(y + b2) per channel   _residual_bwd: per-tile partials,
         db2 = g·Σ dout, dg = Σ dout·(y + b2)                        summed by the launcher in float64
    da = dz·W2, dW2 = dzᵀ·a                  cuBLAS
    dh = da·GELU'(h + b1), db1 = Σ_m dh      _gelu_bwd (in place over da; column partials, float64 sum)
    dW1 = dhᵀ·xn, dxn = dh·W1                cuBLAS
    dx = dout + norm_mod_bwd(dxn) (and ds, dt)   the norm_mod backward kernel of mixing.py, residual fused
Variant "triton_gemm" (forward only; the backward is shared): the two GEMMs are Triton kernels with
the elementwise passes in their epilogues, _gemm1 (+ b1, GELU, stores a and, for the backward, h) and
_gemm2 (+ b2, ·g, + x into out, and y for the backward): h and y are never read back (without grad, never
written): at 256²x192 bf16 inference that is ~325 MB of traffic against the cuBLAS variant's ~575 MB
(norm_mod 50, GEMM1 125, bias+GELU 200, GEMM2 125, residual 75). Its GEMMs keep h and y
in float32 up to the epilogue, so its a and out round once where the cuBLAS variant rounds twice.
Saved by the forward for the backward: xn, h (pre-bias), a and y; nothing is recomputed but h + b1.
Without grad the GELU runs in place over h, and nothing is kept.
Layout: the GEMM operands are row-major (M, ·) as eager's Linear sees them after its permute; x, out,
dout any strides (4-d (B, C, H, W) indexing), tiles wide along whichever of x's axes is contiguous.
Accumulation float32, but float64 for the sums over pixels behind db1, db2 and dg (a float32 sum's
error grows with Σ|terms| and the pixel count: measured 3x eager's error on db2 at 60 pixels); inputs
float32, bfloat16 or float16, every tensor one dtype. g, b1, b2 read from device memory: no host
sync, CUDA-graph safe. Limits: M·N below 2**62 (offsets int64), C and N below 2**31.
Equivalent code: `wuerstchen_fast.ops.reference.mixing.mlp_residual`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grn import _gelu, _gelu_grad
from .mixing import norm_mod_bwd, norm_mod_fwd
from .resblock import GEMM_STAGES, GEMM_WARPS, _mma, _upcast, gemm_tiles
from .rounding import rne_flag, to_out

__all__ = ["mlp_fwd", "mlp_bwd", "COMPILE_SPECS"]


@triton.jit
def _bias_gelu_kernel(H, B1, A, total, N, BLOCK: tl.constexpr, RNE: tl.constexpr):
    """A = GELU(H + b1[col]) over a row-major (M, N) tensor, flat; A may alias H."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    u = tl.load(H + i, mask=m, other=0.0).to(tl.float32) + tl.load(B1 + i % N, mask=m, other=0.0).to(tl.float32)
    tl.store(A + i, to_out(_gelu(u), A.dtype.element_ty, RNE), mask=m)


@triton.jit
def _gelu_bwd_kernel(DA, H, B1, DH, PART, M, N, chunk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     RNE: tl.constexpr):
    """DH = DA·GELU'(H + b1) over rows [pid0·chunk, +chunk) x BLOCK_N columns; PART[pid0, n] = Σ_m DH
    (of the float32 values, before rounding; accumulated in float64). DH may alias DA (each element is
    read before it is written)."""
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    b1 = tl.load(B1 + n, mask=nm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    lo = tl.program_id(0) * chunk
    for m0 in range(lo, tl.minimum(lo + chunk, M), BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M)
        mk = (r < M)[:, None] & nm[None, :]
        off = r.to(tl.int64)[:, None] * N + n[None, :]
        da = tl.load(DA + off, mask=mk, other=0.0).to(tl.float32)
        u = tl.load(H + off, mask=mk, other=0.0).to(tl.float32) + b1[None, :]
        dh = da * _gelu_grad(u)
        acc += tl.sum(dh.to(tl.float64), axis=0)
        tl.store(DH + off, to_out(dh, DH.dtype.element_ty, RNE), mask=mk)
    tl.store(PART + tl.program_id(0).to(tl.int64) * N + n, acc, mask=nm)


@triton.jit
def _residual_kernel(Y, B2, G, X, OUT, C, HW, W,
                     sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    """OUT[b, c, h, w] = X + (Y[row, c] + b2[c])·g, row = b·HW + h·W + w (Y row-major (M, C))."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cm = c < C
    mk = (p < HW)[:, None] & cm[None, :]
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    cc = c.to(tl.int64)[None, :]
    y = tl.load(Y + (b * HW + p.to(tl.int64))[:, None] * C + cc, mask=mk, other=0.0).to(tl.float32)
    x = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + cc * sxc, mask=mk, other=0.0).to(tl.float32)
    b2 = tl.load(B2 + c, mask=cm, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32)
    out = x + (y + b2[None, :]) * g
    tl.store(OUT + b * sob + (h * soh + w * sow)[:, None] + cc * soc, to_out(out, OUT.dtype.element_ty, RNE), mask=mk)


@triton.jit
def _residual_bwd_kernel(GY, Y, B2, G, DZ, PART, C, HW, W,
                         sgb, sgc, sgh, sgw,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    """DZ[row, c] = dout·g (row-major (M, C)); PART[tile, c] = (Σ_p dout, Σ_p dout·(Y + b2)) in float64."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cm = c < C
    mk = (p < HW)[:, None] & cm[None, :]
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    cc = c.to(tl.int64)[None, :]
    rows = (b * HW + p.to(tl.int64))[:, None] * C + cc
    gy = tl.load(GY + b * sgb + (h * sgh + w * sgw)[:, None] + cc * sgc, mask=mk, other=0.0).to(tl.float32)
    y = tl.load(Y + rows, mask=mk, other=0.0).to(tl.float32)
    b2 = tl.load(B2 + c, mask=cm, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32)
    tl.store(DZ + rows, to_out(gy * g, DZ.dtype.element_ty, RNE), mask=mk)
    tile = tl.program_id(0).to(tl.int64) * tl.num_programs(2) + b
    base = PART + (tile * C + c) * 2
    gy = gy.to(tl.float64)
    tl.store(base, tl.sum(gy, axis=0), mask=cm)
    tl.store(base + 1, tl.sum(gy * (y.to(tl.float64) + b2.to(tl.float64)[None, :]), axis=0), mask=cm)


@triton.jit
def _gemm1_kernel(XN, W1, B1, HOUT, A, M, C, N,
                  KEEP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A = GELU(XN·W1ᵀ + b1) (and HOUT = XN·W1ᵀ when KEEP); XN (M, C), W1 (N, C), A, HOUT (M, N) row-major."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = r < M
    nm = n < N
    r64 = r.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < C
        a = tl.load(XN + r64[:, None] * C + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(W1 + n[None, :].to(tl.int64) * C + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        acc = _mma(a, w, acc, IEEE, UPCAST)
    m = rm[:, None] & nm[None, :]
    off = r64[:, None] * N + n[None, :]
    if KEEP:
        tl.store(HOUT + off, to_out(acc, HOUT.dtype.element_ty, RNE), mask=m)
    u = acc + tl.load(B1 + n, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(A + off, to_out(_gelu(u), A.dtype.element_ty, RNE), mask=m)


@triton.jit
def _gemm2_kernel(AIN, W2, B2, G, X, OUT, YOUT, HW, W, C, N, tiles_m,
                  sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                  KEEP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = X + (AIN·W2ᵀ + b2)·g (and YOUT = AIN·W2ᵀ when KEEP); AIN (M, N), W2 (C, N), YOUT (M, C)
    row-major; X, OUT any strides. Row tiles never straddle a batch (grid over batch x tiles of H·W)."""
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
        a = tl.load(AIN + row[:, None] * N + k[None, :], mask=pm[:, None] & km[None, :], other=0.0)
        w = tl.load(W2 + c[None, :].to(tl.int64) * N + k[:, None], mask=km[:, None] & cm[None, :], other=0.0)
        acc = _mma(a, w, acc, IEEE, UPCAST)
    m = pm[:, None] & cm[None, :]
    cc = c.to(tl.int64)[None, :]
    if KEEP:
        tl.store(YOUT + row[:, None] * C + cc, to_out(acc, YOUT.dtype.element_ty, RNE), mask=m)
    h = (p // W).to(tl.int64)
    w_ = (p % W).to(tl.int64)
    x = tl.load(X + b * sxb + (h * sxh + w_ * sxw)[:, None] + cc * sxc, mask=m, other=0.0).to(tl.float32)
    z = acc + tl.load(B2 + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    out = x + z * tl.load(G).to(tl.float32)
    tl.store(OUT + b * sob + (h * soh + w_ * sow)[:, None] + cc * soc, to_out(out, OUT.dtype.element_ty, RNE), mask=m)


# ------------------------------------------------------------------------------ launchers

_FLAT_BLOCK = 1024
_GELU_BWD_M, _GELU_BWD_N = 16, 128


def _res_tiles(x):
    """(BLOCK_P, BLOCK_C, num_warps): wide along channels for channels-last x, along pixels for NCHW.
    NCHW 64 x 32 with 8 warps: at 4 warps the forward needs 150 registers (16 elements of three
    differently laid-out tiles per thread, with 64-bit addresses), at 8 warps 80."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    if x.stride(1) == 1 and C > 1:
        return min(16, triton.next_power_of_2(HW)), min(64, triton.next_power_of_2(C)), 4
    return min(64, triton.next_power_of_2(HW)), min(32, triton.next_power_of_2(C)), 8


def bias_gelu(h, b1, a):
    """a = GELU(h + b1) for row-major (M, N) h and a (a may be h)."""
    total = h.numel()
    if total:
        _bias_gelu_kernel[(triton.cdiv(total, _FLAT_BLOCK),)](h, b1, a, total, h.shape[1], BLOCK=_FLAT_BLOCK,
                                                              RNE=rne_flag(a), num_warps=4)
    return a


def gelu_bwd(da, h, b1):
    """dh = da·GELU'(h + b1) in place over da; -> (dh, db1 = Σ_m dh as float32)."""
    M, N = da.shape
    bm, bn = _GELU_BWD_M, min(_GELU_BWD_N, triton.next_power_of_2(N))
    n_tiles = triton.cdiv(N, bn)
    # Split the rows so that ~1024 programs exist; few enough row chunks that the partials stay small.
    chunks = max(1, min(triton.cdiv(M, bm), 1024 // n_tiles))
    chunk = triton.cdiv(triton.cdiv(M, chunks), bm) * bm
    grid = (triton.cdiv(M, chunk), n_tiles)
    part = torch.empty(grid[0], N, device=da.device, dtype=torch.float64)
    _gelu_bwd_kernel[grid](da, h, b1, da, part, M, N, chunk, BLOCK_M=bm, BLOCK_N=bn, RNE=rne_flag(da),
                           num_warps=4)
    return da, part.sum(0).float()


def _out_like(x):
    from wuerstchen_fast.ops.layout import empty_out_like

    return empty_out_like(x)


def _gemm1(xn, w1, b1, h, a, keep):
    M, C = xn.shape
    N = w1.shape[0]
    t = gemm_tiles(M, N, C, xn.dtype, 1)
    grid = (triton.cdiv(M, t["BLOCK_M"]), triton.cdiv(N, t["BLOCK_N"]))
    _gemm1_kernel[grid](xn, w1, b1, h, a, M, C, N, KEEP=keep, IEEE=xn.dtype == torch.float32, UPCAST=_upcast(xn),
                        RNE=rne_flag(a), num_warps=GEMM_WARPS, num_stages=GEMM_STAGES, **t)


def _gemm2(a, w2, b2, gamma, x, out, y, keep):
    B, C, H, W = x.shape
    N = a.shape[1]
    t = gemm_tiles(H * W, C, N, a.dtype, 2)
    tiles_m = triton.cdiv(H * W, t["BLOCK_M"])
    _gemm2_kernel[(B * tiles_m, triton.cdiv(C, t["BLOCK_N"]))](
        a, w2, b2, gamma, x, out, y, H * W, W, C, N, tiles_m, *x.stride(), *out.stride(),
        KEEP=keep, IEEE=a.dtype == torch.float32, UPCAST=_upcast(a), RNE=rne_flag(out),
        num_warps=GEMM_WARPS, num_stages=GEMM_STAGES, **t)


def mlp_fwd(x, w1, b1, w2, b2, scale, shift, gamma, eps, keep, variant="cublas"):
    """-> (out, xn, h, a, y); the last four are the backward's (M, ·) rows, or empty when not `keep`.
    `variant`: "cublas" (torch.mm + Triton elementwise passes) or "triton_gemm" (Triton GEMMs with the
    passes in their epilogues)."""
    B, C, H, W = x.shape
    N, M = w1.shape[0], B * H * W
    out = _out_like(x)
    none = x.new_empty(0)
    b1, b2 = b1.contiguous(), b2.contiguous()  # the kernels index the biases densely
    if M == 0:
        return (out, x.new_empty(0, C), x.new_empty(0, N), x.new_empty(0, N), x.new_empty(0, C)) if keep else \
            (out, none, none.clone(), none.clone(), none.clone())
    xn4 = torch.empty(B, H, W, C, device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
    norm_mod_fwd(x, scale, shift, eps, out=xn4)
    xn = xn4.permute(0, 2, 3, 1).view(M, C)
    if variant == "triton_gemm":
        w1, w2 = w1.contiguous(), w2.contiguous()
        h = torch.empty(M, N, device=x.device, dtype=x.dtype) if keep else none
        a = torch.empty(M, N, device=x.device, dtype=x.dtype)
        _gemm1(xn, w1, b1, h if keep else a, a, keep)
        y = torch.empty(M, C, device=x.device, dtype=x.dtype) if keep else none
        _gemm2(a, w2, b2, gamma, x, out, y if keep else out, keep)
        if keep:
            return out, xn, h, a, y
        return out, none, none.clone(), none.clone(), none.clone()
    h = torch.mm(xn, w1.t())
    a = bias_gelu(h, b1, torch.empty_like(h) if keep else h)
    y = torch.mm(a, w2.t())
    bp, bc, nw = _res_tiles(x)
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B)
    _residual_kernel[grid](y, b2, gamma, x, out, C, H * W, W, *x.stride(), *out.stride(),
                           BLOCK_P=bp, BLOCK_C=bc, RNE=rne_flag(out), num_warps=nw)
    if keep:
        return out, xn, h, a, y
    return out, none, none.clone(), none.clone(), none.clone()


def mlp_bwd(grad, x, w1, b1, w2, b2, scale, gamma, xn, h, a, y, eps):
    """-> (dx, dw1, db1, dw2, db2, dscale, dshift, dgamma); weights' gradients in their dtype, the bias
    and 0-d gradients float32 (cast by the caller)."""
    B, C, H, W = x.shape
    N, M = w1.shape[0], B * H * W
    if M == 0:
        z = torch.zeros((), device=x.device)
        return (_out_like(x), torch.zeros_like(w1), torch.zeros(N, device=x.device), torch.zeros_like(w2),
                torch.zeros(C, device=x.device), z, z.clone(), z.clone())
    b1, b2 = b1.contiguous(), b2.contiguous()
    dz = torch.empty(M, C, device=x.device, dtype=x.dtype)
    bp, bc, nw = _res_tiles(grad)
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B)
    part = torch.empty(grid[0] * B, C, 2, device=x.device, dtype=torch.float64)
    _residual_bwd_kernel[grid](grad, y, b2, gamma, dz, part, C, H * W, W, *grad.stride(),
                               BLOCK_P=bp, BLOCK_C=bc, RNE=rne_flag(dz), num_warps=nw)
    s = part.sum(0)  # (C, 2) float64
    db2 = (s[:, 0] * gamma.double()).float()
    dg = s[:, 1].sum().float()
    da = torch.mm(dz, w2)
    dw2 = torch.mm(dz.t(), a)
    dh, db1 = gelu_bwd(da, h, b1)
    dw1 = torch.mm(dh.t(), xn)
    dxn = torch.mm(dh, w1)
    dx, ds, dt = norm_mod_bwd(dxn.view(B, H, W, C).permute(0, 3, 1, 2), x, scale, eps, residual=grad)
    return dx, dw1, db1, dw2, db2, ds, dt, dg


def _signature(kernel, dtype: str) -> dict:
    sig = {}
    for n in kernel.arg_names:
        if n == "PART":
            sig[n] = "*fp64"
        elif n in ("BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C", "RNE", "KEEP", "IEEE", "UPCAST"):
            sig[n] = "constexpr"
        elif n.isupper() and n not in ("C", "HW", "W", "M", "N"):
            sig[n] = f"*{dtype}"
        elif n in ("total",) or n.startswith("s"):
            sig[n] = "i64"
        else:
            sig[n] = "i32"
    return sig


# Released Stage A: bf16, c = 192 (hidden 768) at 256x256 and c = 384 (hidden 1536) at 128x128: the
# launchers' tiles (flat GELU; GELU backward 16 x 128; residual NCHW 64 x 32 at 8 warps, channels-last 16 x 64).
COMPILE_SPECS = [
    dict(name="mixing_mlp._bias_gelu_kernel", kernel=_bias_gelu_kernel, signature=_signature(_bias_gelu_kernel, "bf16"),
         constexprs=dict(BLOCK=_FLAT_BLOCK, RNE=False), num_warps=4),
    dict(name="mixing_mlp._gelu_bwd_kernel", kernel=_gelu_bwd_kernel, signature=_signature(_gelu_bwd_kernel, "bf16"),
         constexprs=dict(BLOCK_M=_GELU_BWD_M, BLOCK_N=_GELU_BWD_N, RNE=False), num_warps=4),
] + [
    dict(name=f"mixing_mlp.{k.fn.__name__}[{lay}]", kernel=k, signature=_signature(k, "bf16"),
         constexprs=dict(BLOCK_P=bp, BLOCK_C=bc, RNE=False), num_warps=nw)
    for k in (_residual_kernel, _residual_bwd_kernel)
    for lay, bp, bc, nw in (("nchw", 64, 32, 8), ("channels_last", 16, 64, 4))
]

# Triton GEMMs at the released Stage A widths, bf16, with and without the saved activations.
_T1, _T2 = gemm_tiles(65536, 768, 192, torch.bfloat16, 1), gemm_tiles(65536, 192, 768, torch.bfloat16, 2)
COMPILE_SPECS += [
    dict(name=f"mixing_mlp.{k.fn.__name__}[keep{int(keep)}]", kernel=k, signature=_signature(k, "bf16"),
         constexprs=dict(KEEP=keep, IEEE=False, UPCAST=False, RNE=False, **t), num_warps=GEMM_WARPS,
         num_stages=GEMM_STAGES)
    for k, t in ((_gemm1_kernel, _T1), (_gemm2_kernel, _T2)) for keep in (False, True)
]
