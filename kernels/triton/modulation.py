"""Timestep modulation in Triton: out = x·(1 + a) + b, a and b per (batch, channel), x (B, C, H, W).

Math: forward out = x·(1 + a[b, c]) + b[b, c]. Backward (dy = ∂L/∂out):
    dx = dy·(1 + a),  da[b, c] = Σ_hw dy·x,  db[b, c] = Σ_hw dy
Nothing is saved but x (and a); the backward reads x and dy once, writes dx, and reduces da, db
over pixel splits in float64 (tile sums and atomics into (B, C) buffers: PyTorch's cascade sums are
more accurate than a float32 running sum over H*W, and these are few values).
Layout: any strides of x, dy, out; the launcher orients the (pixels x channels) tile along the
contiguous axis (pixels for NCHW, channels for channels-last). a, b: (B, C), any strides.
Accumulation float32; inputs float32, bfloat16, float16 (bfloat16 stores round to nearest even, under
the interpreter too: rounding.py). Limits: C, H*W below 2**31.
Fused use: the ResBlock ops (Stage C and Stage B) apply the same modulation in their output epilogue
(ops/resblock.py) and reuse `mod_bwd` for their backward.
Equivalent code: `wuerstchen_fast.ops.reference.modulate`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grn import sig
from .rounding import rne_flag, to_out

__all__ = ["mod_fwd", "mod_bwd", "COMPILE_SPECS"]


@triton.jit
def _mod_fwd_kernel(X, A, Bm, Y, C, P, W,
                    sxb, sxc, sxh, sxw, syb, syc, syh, syw, sab, sac, sbb, sbc,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cm = c < C
    m = (p < P)[:, None] & cm[None, :]
    h = (p // W).to(tl.int64)
    w = (p % W).to(tl.int64)
    cc = c.to(tl.int64)
    x = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + (cc * sxc)[None, :], mask=m, other=0.0).to(tl.float32)
    a = tl.load(A + b * sab + cc * sac, mask=cm, other=0.0).to(tl.float32)
    bb = tl.load(Bm + b * sbb + cc * sbc, mask=cm, other=0.0).to(tl.float32)
    y = x * (1.0 + a[None, :]) + bb[None, :]
    tl.store(Y + b * syb + (h * syh + w * syw)[:, None] + (cc * syc)[None, :], to_out(y, Y.dtype.element_ty, RNE), mask=m)


@triton.jit
def _mod_bwd_kernel(DY, X, A, DX, DA, DB, C, P, W, chunk,
                    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, sob, soc, soh, sow, sab, sac,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cm = c < C
    cc = c.to(tl.int64)
    a1 = 1.0 + tl.load(A + b * sab + cc * sac, mask=cm, other=0.0).to(tl.float32)
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float64)
    p_lo = tl.program_id(1) * chunk
    for p0 in range(p_lo, tl.minimum(p_lo + chunk, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cm[None, :]
        h = (p // W).to(tl.int64)
        w = (p % W).to(tl.int64)
        g = tl.load(DY + b * sgb + (h * sgh + w * sgw)[:, None] + (cc * sgc)[None, :], mask=m, other=0.0)
        g = g.to(tl.float32)
        x = tl.load(X + b * sxb + (h * sxh + w * sxw)[:, None] + (cc * sxc)[None, :], mask=m, other=0.0)
        g64 = g.to(tl.float64)
        acc_a += tl.sum(g64 * x.to(tl.float64), axis=0)
        acc_b += tl.sum(g64, axis=0)
        tl.store(DX + b * sob + (h * soh + w * sow)[:, None] + (cc * soc)[None, :],
                 to_out(g * a1[None, :], DX.dtype.element_ty, RNE), mask=m)
    tl.atomic_add(DA + b * C + c, acc_a, mask=cm)
    tl.atomic_add(DB + b * C + c, acc_b, mask=cm)


def _tiles(x: torch.Tensor) -> tuple:
    """(BLOCK_P, BLOCK_C): wide along the contiguous axis."""
    if x.stride(1) == 1 and x.shape[1] > 1:
        return 16, 64
    return 64, 16


def mod_fwd(x, a, b, out):
    """out = x·(1 + a) + b; x, out (B, C, H, W) any strides; a, b (B, C)."""
    B, C, H, W = x.shape
    if x.numel():
        bp, bc = _tiles(x)
        grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B)
        _mod_fwd_kernel[grid](x, a, b, out, C, H * W, W, *x.stride(), *out.stride(), *a.stride(), *b.stride(),
                              BLOCK_P=bp, BLOCK_C=bc, RNE=rne_flag(out), num_warps=4)
    return out


def mod_bwd(dy, x, a, dx):
    """Writes dx = dy·(1 + a); returns (da, db) as float64 (B, C)."""
    B, C, H, W = x.shape
    da = torch.zeros(B, C, device=x.device, dtype=torch.float64)
    db = torch.zeros(B, C, device=x.device, dtype=torch.float64)
    if x.numel():
        bp, bc = _tiles(x)
        P = H * W
        splits = max(1, min(triton.cdiv(P, bp * 4), triton.cdiv(1024, B * triton.cdiv(C, bc))))
        chunk = triton.cdiv(triton.cdiv(P, splits), bp) * bp
        grid = (triton.cdiv(C, bc), triton.cdiv(P, chunk), B)
        _mod_bwd_kernel[grid](dy, x, a, dx, da, db, C, P, W, chunk, *dy.stride(), *x.stride(), *dx.stride(),
                              *a.stride(), BLOCK_P=bp, BLOCK_C=bc, RNE=rne_flag(dx), num_warps=4)
    return da, db


_BF16 = {n: "*bf16" for n in ("X", "A", "Bm", "Y", "DY", "DX")}
# Stage C (C=1536, 24x24) runs channels-last inside the fused blocks, Stage B levels NCHW: both tiles.
COMPILE_SPECS = [
    dict(name=f"modulation.{k.fn.__name__}[{lay}]", kernel=k,
         signature=sig(k, {**_BF16, "DA": "*fp64", "DB": "*fp64"}),
         constexprs=dict(BLOCK_P=bp, BLOCK_C=bc, RNE=False), num_warps=4)
    for k in (_mod_fwd_kernel, _mod_bwd_kernel)
    for lay, bp, bc in (("nchw", 64, 16), ("nhwc", 16, 64))
]
