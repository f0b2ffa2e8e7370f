"""Two-source flash attention in Triton: queries over keys/values read from two tensors, no concat.

Math (per batch b, head h; Q: Nq rows, K/V: source 1 (N1 rows, the image tokens) then source 2
(N2 rows, the mapped text tokens), scale = D^-½):
    S = Q·[K1; K2]ᵀ·scale,  P = softmax_rows(S),  O = P·[V1; V2]
Forward (`_attn_fwd_kernel`): one program per (BLOCK_M query rows, b·h); it streams BLOCK_N key
blocks of source 1, then of source 2, with the online softmax (running max m, running sum l, both
float32, in base 2: exp2 with log2(e) folded into the scale), O accumulated in float32 and divided
by l at the end. It saves LSE = m + log2(l) per row (float32, base 2) for the backward.
Backward recomputes P = exp2(S·scale·log2e − LSE) from the saved LSE (nothing of size N² is stored):
    Δ = rowsum(dO ∘ O)      (the launcher, in float32)
    `_attn_bwd_dkdv_kernel`  one program per BLOCK_N key rows of either source (grid over the blocks
                             of source 1, then source 2), looping over all query blocks:
                             dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − Δ), dK += dSᵀ·Q·scale; it writes
                             dK/dV back to that source's own gradient tensors (dK1/dV1 or dK2/dV2).
    `_attn_bwd_dq_kernel`    one program per BLOCK_M query rows, looping over both sources' keys:
                             dQ = Σ dS·K·scale. Two kernels instead of atomics: deterministic.
Layout: Q, K1, V1, K2, V2, O, dO and the gradients are (B, N, heads·D) with the head dimension
contiguous (stride 1) and any batch / row strides, head h at columns [h·D, (h+1)·D) — exactly the
rows the projection GEMMs write, so no transposes or reshapes. K1/V1 share strides, as K2/V2.
Accumulation float32; P and dS are rounded to the input dtype before their GEMMs (as FlashAttention
does, the tensor-core path); float32 inputs use exact IEEE dots (no TF32), as PyTorch's default.
Under Triton's CPU interpreter (UPCAST), non-float32 tiles are widened to float32 before tl.dot (the
interpreter computes bfloat16 dots wrongly and float16 dots in float16) and the bfloat16 rounding of
P/dS is done explicitly (rounding.py), so the interpreter computes what the GPU does.
Limits: head dim D any size up to 256 (tiles are padded to BLOCK_D = max(16, next power of 2) with
masks; powers of two >= 16 waste nothing; released models use 64); N1 >= 0, N2 >= 0, N1 + N2 >= 1;
no attention mask and no dropout on P (Würstchen's AttnBlock has neither). Offsets int64 per batch.
Equivalent code: `wuerstchen_fast.ops.reference.attention.multihead_attention` on concatenated K/V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import rne_flag, to_out

__all__ = ["attn_fwd", "attn_bwd", "block_d", "COMPILE_SPECS", "FWD_TILE", "BWD_TILE"]

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a·b in float32 (see the header for IEEE and UPCAST)."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _head(H, D, BLOCK_D: tl.constexpr):
    """This program's (batch, head) from the grid's axis 1: bh, batch b (int64) and the head's first
    column; the head-dim lanes d and their mask."""
    bh = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    return bh, (bh // H).to(tl.int64), (bh % H) * D, d, d < D


@triton.jit
def _q_rows(Q, DO, LSE, DELTA, b, bh, hcol, m, Nq, d, dm, sqb, sqn, sdb, sdn):
    """What both backward kernels read for query rows m of one head: the q and dO tiles, LSE and Δ
    (0 outside), and the rows' masks (rows; rows x head dim)."""
    mm = m < Nq
    qmask = mm[:, None] & dm[None, :]
    mrow = m.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + hcol + mrow * sqn + d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + hcol + mrow * sdn + d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + m, mask=mm, other=0.0)
    dlt = tl.load(DELTA + bh.to(tl.int64) * Nq + m, mask=mm, other=0.0)
    return q, do, lse, dlt, mm, qmask


@triton.jit
def _kt_tile(K, kv_base, skn, n0, N, d, dm, BLOCK_N: tl.constexpr):
    """Kᵀ tile of one source (head dim x the BLOCK_N keys from n0, 0 outside), the keys' mask and row
    offsets (for the V tile of the same keys)."""
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < N
    roff = n.to(tl.int64) * skn
    kt = tl.load(K + kv_base + d[:, None] + roff[None, :], mask=dm[:, None] & nm[None, :], other=0.0)
    return kt, nm, roff


@triton.jit
def _fwd_source(acc, m_i, l_i, q, K, V, kv_base, skn, N, d, dm, qk_scale,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax pass over the N keys/values of one source."""
    for n0 in range(0, N, BLOCK_N):
        kt, nm, roff = _kt_tile(K, kv_base, skn, n0, N, d, dm, BLOCK_N)
        s = _dot(q, kt, IEEE, UPCAST) * qk_scale
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_base + roff[:, None] + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(to_out(p, V.dtype.element_ty, RNE), v, IEEE, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K1, V1, K2, V2, O, LSE, Nq, N1, N2, H, D,
                     sqb, sqn, s1b, s1n, s2b, s2n, sob, son, qk_scale,
                     IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, hcol, d, dm = _head(H, D, BLOCK_D)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = m < Nq
    qmask = mm[:, None] & dm[None, :]
    q = tl.load(Q + b * sqb + hcol + m.to(tl.int64)[:, None] * sqn + d[None, :], mask=qmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, K1, V1, b * s1b + hcol, s1n, N1, d, dm, qk_scale,
                                IEEE, UPCAST, RNE, BLOCK_N)
    acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, K2, V2, b * s2b + hcol, s2n, N2, d, dm, qk_scale,
                                IEEE, UPCAST, RNE, BLOCK_N)
    o = acc / l_i[:, None]
    tl.store(O + b * sob + hcol + m.to(tl.int64)[:, None] * son + d[None, :], to_out(o, O.dtype.element_ty, RNE),
             mask=qmask)
    tl.store(LSE + bh.to(tl.int64) * Nq + m, m_i + tl.log2(l_i), mask=mm)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K1, V1, K2, V2, DO, LSE, DELTA, DK1, DV1, DK2, DV2, Nq, N1, N2, H, D, T1,
                          sqb, sqn, s1b, s1n, s2b, s2n, sdb, sdn, sg1b, sg1n, sg2b, sg2n, qk_scale, sm_scale,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, hcol, d, dm = _head(H, D, BLOCK_D)
    j = tl.program_id(0)
    # which source this key block belongs to: blocks [0, T1) of source 1, then source 2
    if j < T1:
        K, V, DK, DV, N, n0 = K1, V1, DK1, DV1, N1, j * BLOCK_N
        kvb, skn, gb, sgn = b * s1b + hcol, s1n, b * sg1b + hcol, sg1n
    else:
        K, V, DK, DV, N, n0 = K2, V2, DK2, DV2, N2, (j - T1) * BLOCK_N
        kvb, skn, gb, sgn = b * s2b + hcol, s2n, b * sg2b + hcol, sg2n
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < N
    kvmask = nm[:, None] & dm[None, :]
    roff = n.to(tl.int64)[:, None] * skn + d[None, :]
    k = tl.load(K + kvb + roff, mask=kvmask, other=0.0)
    v = tl.load(V + kvb + roff, mask=kvmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, Nq, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        q, do, lse, dlt, mm, _ = _q_rows(Q, DO, LSE, DELTA, b, bh, hcol, m, Nq, d, dm, sqb, sqn, sdb, sdn)
        st = _dot(k, tl.trans(q), IEEE, UPCAST) * qk_scale  # Sᵀ: (BLOCK_N, BLOCK_M)
        pt = tl.where(nm[:, None] & mm[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += _dot(to_out(pt, DO.dtype.element_ty, RNE), do, IEEE, UPCAST)
        dpt = _dot(v, tl.trans(do), IEEE, UPCAST)
        dst = pt * (dpt - dlt[None, :])
        dk += _dot(to_out(dst, Q.dtype.element_ty, RNE), q, IEEE, UPCAST)
    goff = gb + n.to(tl.int64)[:, None] * sgn + d[None, :]
    tl.store(DK + goff, to_out(dk * sm_scale, DK.dtype.element_ty, RNE), mask=kvmask)
    tl.store(DV + goff, to_out(dv, DV.dtype.element_ty, RNE), mask=kvmask)


@triton.jit
def _dq_source(dq, q, do, lse, dlt, K, V, kv_base, skn, N, d, dm, qk_scale,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(0, N, BLOCK_N):
        kt, nm, roff = _kt_tile(K, kv_base, skn, n0, N, d, dm, BLOCK_N)
        vt = tl.load(V + kv_base + d[:, None] + roff[None, :], mask=dm[:, None] & nm[None, :], other=0.0)
        s = _dot(q, kt, IEEE, UPCAST) * qk_scale
        p = tl.where(nm[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vt, IEEE, UPCAST)
        ds = p * (dp - dlt[:, None])
        dq += _dot(to_out(ds, K.dtype.element_ty, RNE), tl.trans(kt), IEEE, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K1, V1, K2, V2, DO, LSE, DELTA, DQ, Nq, N1, N2, H, D,
                        sqb, sqn, s1b, s1n, s2b, s2n, sdb, sdn, sgb, sgn, qk_scale, sm_scale,
                        IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, hcol, d, dm = _head(H, D, BLOCK_D)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q, do, lse, dlt, _, qmask = _q_rows(Q, DO, LSE, DELTA, b, bh, hcol, m, Nq, d, dm, sqb, sqn, sdb, sdn)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_source(dq, q, do, lse, dlt, K1, V1, b * s1b + hcol, s1n, N1, d, dm, qk_scale, IEEE, UPCAST, RNE, BLOCK_N)
    dq = _dq_source(dq, q, do, lse, dlt, K2, V2, b * s2b + hcol, s2n, N2, d, dm, qk_scale, IEEE, UPCAST, RNE, BLOCK_N)
    tl.store(DQ + b * sgb + hcol + m.to(tl.int64)[:, None] * sgn + d[None, :], to_out(dq * sm_scale, DQ.dtype.element_ty, RNE),
             mask=qmask)


# ------------------------------------------------------------------------------ launchers

# Tiles for head dim 64 (bf16/fp16), 8 warps: no spills on sm_80/sm_90, but registers per thread are
# above the 128 budget of tests/test_triton_build.py (sm_90: fwd 122, dkdv 140, dq 128; sm_80: fwd 165,
# dkdv 255, dq 128): the per-element int64 offsets and head-dim masks still cost too much (open work).
# Smaller problems shrink the tiles.
FWD_TILE = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8)
BWD_TILE = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8)
MAX_HEAD_DIM = 256


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _tile(t: dict, Nq: int, Nk: int, D: int) -> dict:
    bd = block_d(D)
    shrink = 2 if bd > 64 else 1  # wider heads: halve the row tiles to keep the register budget
    bm = max(16, min(t["BLOCK_M"] // shrink, triton.next_power_of_2(max(Nq, 1))))
    bn = max(16, min(t["BLOCK_N"] // shrink, triton.next_power_of_2(max(Nk, 1))))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=t["num_warps"])


def _flags(q: torch.Tensor) -> dict:
    interp = q.device.type == "cpu"  # only the interpreter runs CPU tensors
    return dict(IEEE=q.dtype == torch.float32, UPCAST=interp and q.dtype != torch.float32, RNE=rne_flag(q))


def _rows_ok(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attn_fwd(q, k1, v1, k2, v2, nhead: int):
    """q (B, Nq, H·D); k1/v1 (B, N1, H·D); k2/v2 (B, N2, H·D) -> (o (B, Nq, H·D), lse (B, H, Nq) float32, base 2)."""
    q, k1, v1, k2, v2 = map(_rows_ok, (q, k1, v1, k2, v2))
    if k1.stride() != v1.stride():
        k1, v1 = k1.contiguous(), v1.contiguous()
    if k2.stride() != v2.stride():
        k2, v2 = k2.contiguous(), v2.contiguous()
    B, Nq, inner = q.shape
    D = inner // nhead
    N1, N2 = k1.shape[1], k2.shape[1]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, nhead, Nq, device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    t = _tile(FWD_TILE, Nq, max(N1, N2), D)
    grid = (triton.cdiv(Nq, t["BLOCK_M"]), B * nhead)
    _attn_fwd_kernel[grid](q, k1, v1, k2, v2, o, lse, Nq, N1, N2, nhead, D,
                           q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k2.stride(0), k2.stride(1),
                           o.stride(0), o.stride(1), D ** -0.5 * LOG2E, **_flags(q), **t)
    return o, lse


def attn_bwd(do, q, k1, v1, k2, v2, o, lse, nhead: int, out=None):
    """Gradients (dq, dk1, dv1, dk2, dv2) of attn_fwd, written into `out` when given (tensors shaped
    like the inputs, head dim contiguous, dk1/dv1 and dk2/dv2 sharing strides), else new ones."""
    do = _rows_ok(do)
    B, Nq, inner = q.shape
    D = inner // nhead
    N1, N2 = k1.shape[1], k2.shape[1]
    if out is None:
        out = tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k1, v1, k2, v2))
    dq, dk1, dv1, dk2, dv2 = out
    assert dk1.stride() == dv1.stride() and dk2.stride() == dv2.stride() and dq.stride(-1) == 1
    if q.numel() == 0:
        return dq, dk1.zero_(), dv1.zero_(), dk2.zero_(), dv2.zero_()
    delta = (do.float() * o.float()).view(B, Nq, nhead, D).sum(-1).transpose(1, 2).contiguous()
    fl = _flags(q)
    scale = D ** -0.5
    t = _tile(BWD_TILE, Nq, max(N1, N2), D)
    T1 = triton.cdiv(N1, t["BLOCK_N"])
    common = (q.stride(0), q.stride(1), k1.stride(0), k1.stride(1), k2.stride(0), k2.stride(1),
              do.stride(0), do.stride(1))
    grid = (T1 + triton.cdiv(N2, t["BLOCK_N"]), B * nhead)
    _attn_bwd_dkdv_kernel[grid](q, k1, v1, k2, v2, do, lse, delta, dk1, dv1, dk2, dv2, Nq, N1, N2, nhead, D, T1,
                                *common, dk1.stride(0), dk1.stride(1), dk2.stride(0), dk2.stride(1),
                                scale * LOG2E, scale, **fl, **t)
    grid = (triton.cdiv(Nq, t["BLOCK_M"]), B * nhead)
    _attn_bwd_dq_kernel[grid](q, k1, v1, k2, v2, do, lse, delta, dq, Nq, N1, N2, nhead, D,
                              *common, dq.stride(0), dq.stride(1), scale * LOG2E, scale, **fl, **t)
    return dq, dk1, dv1, dk2, dv2


# ------------------------------------------------------------------------------ compile specs

_DATA_PTRS = ("Q", "K1", "V1", "K2", "V2", "O", "DO", "DK1", "DV1", "DK2", "DV2", "DQ")


def _sig(kernel, dtype: str = "bf16") -> dict:
    out = {}
    for n in kernel.arg_names:
        if n in ("LSE", "DELTA"):
            out[n] = "*fp32"
        elif n in _DATA_PTRS:
            out[n] = f"*{dtype}"
        elif n in ("IEEE", "UPCAST", "RNE") or n.startswith("BLOCK"):
            out[n] = "constexpr"
        elif n in ("qk_scale", "sm_scale"):
            out[n] = "fp32"
        else:
            out[n] = "i32"
    return out


def _spec(name, kernel, tile, dtype="bf16"):
    t = dict(tile)
    nw = t.pop("num_warps")
    return dict(name=f"attention.{name}[{dtype},d64]", kernel=kernel, signature=_sig(kernel, dtype),
                constexprs=dict(IEEE=False, UPCAST=False, RNE=False, BLOCK_D=64, **t), num_warps=nw, num_stages=2,
                # Flash-style tiles keep Q (or K and V), the fp32 accumulator and the softmax statistics in
                # registers for the whole key loop: 120-255 registers and few programs per SM are the
                # design point, as in FlashAttention-2. Spills are still refused.
                max_registers=255)


# Head dim 64 at the released shapes (Stage C 576 queries over 576 + 77 keys; Stage B 256..4096).
COMPILE_SPECS = [
    _spec("_attn_fwd_kernel", _attn_fwd_kernel, FWD_TILE),
    _spec("_attn_bwd_dkdv_kernel", _attn_bwd_dkdv_kernel, BWD_TILE),
    _spec("_attn_bwd_dq_kernel", _attn_bwd_dq_kernel, BWD_TILE),
    _spec("_attn_fwd_kernel", _attn_fwd_kernel, FWD_TILE, "fp16"),
]
