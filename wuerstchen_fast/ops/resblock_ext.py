"""The ResBlock ops' "ext" variant: the cpu and cuda backends, composed from the compiled extension.

    xn  = dwconv_ln(x, Wd, bd)                       extension kernel (conv + bias + LayerNorm2d, channels-last)
    h   = xn·W1[:, :C]ᵀ (+ skip·W1[:, C:]ᵀ) + b1     torch.addmm (MKL / cuBLAS), split K for Stage B's skip
    g   = GELU(h);  s = 1 + γ·N from Σg²             extension grn_colsum (GELU folded on CUDA) + float64 statistics
    y   = g·s + β                                     extension grn_apply (GELU folded on CUDA; on the CPU
                                                      one aten GELU pass feeds both GRN kernels)
    out = y·W2ᵀ + b2 + x  [·(1 + a) + b]              addmm accumulating onto x + b2; extension modulate
Backward: extension modulate_backward, GEMMs for the Linear gradients, grn_colsum / grn_apply_backward
(GELU' folded) for the GRN, dwconv_ln_backward (recomputes the conv and the norm statistics from x).
Saved between the two: xn (M, C), the pre-activation h (M, 4C), the GRN statistics and, with a
folded modulation, the output before it. Stage C with a skip (a grouped conv over cat[x, skip]) and
kernel sizes other than 3 are not served (the registry reports it; auto then takes another backend).
Equivalent code: `reference.resblock` / `reference.resblock_stage_b` (then `reference.modulate`).
"""
from __future__ import annotations

import torch

from .grn import ext_stats, ext_stats_bwd
from .layout import empty_out_like


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C) rows (a view for channels-last, a copy otherwise)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def forward(x, skip, wd, bd, w1, b1, gamma, beta, w2, b2, mod_a, mod_b, eps, stage_b, keep_h=True):
    """(out, out_pre, xn, rstd (empty: the backward recomputes it), h, stats) as the resblock op returns.

    keep_h=False (inference: nothing needs a gradient) returns h empty and, on the CPU, runs GELU and the
    GRN scale in place in h's buffer instead of allocating g and y beside it. At Stage B's level 0 each of
    those is 84 MB; an allocation that large is a fresh mmap on glibc, and faulting its pages in costs
    about 40 ms on a 2-core CPU, more than the pass that fills it."""
    C_ = torch.ops.wuerstchen_fast_C
    B, C, H, W = x.shape
    N, M = w1.shape[0], B * H * W
    xn = _rows(C_.dwconv_ln(x, wd, bd, eps))  # channels-last result: the rows are a view
    h = torch.addmm(b1, xn, w1[:, :C].t())
    if stage_b and skip is not None:
        h.addmm_(_rows(skip), w1[:, C:].t())
    h4 = h.view(B, H, W, N)
    # GELU(h) once (CPU: a separate vectorized pass costs less than computing erf in both GRN kernels,
    # whose (B·H·W, 4C) operand is far out of cache either way), or folded into both kernels (CUDA: the
    # GRN is bandwidth-bound there and GELU is free beside the loads).
    fold = h.is_cuda
    if not keep_h and not fold:  # GELU, then GELU(h)·s + β, in h's buffer
        g4 = torch.ops.aten.gelu_(h4)
        st = ext_stats(C_.grn_colsum(g4, None, False)[0], gamma)
        # one pass, float32 math, one rounding to g's dtype (as grn_apply)
        y = torch.addcmul(beta.float(), g4, st[0].float().view(B, 1, 1, N), out=g4)
    else:
        g4 = h4 if fold else torch.nn.functional.gelu(h4)
        st = ext_stats(C_.grn_colsum(g4, None, fold)[0], gamma)
        y = C_.grn_apply(g4, st[0], beta, fold)  # GELU(h)·s + β, (B, H, W, N) rows
        del g4
    out_pre = empty_out_like(x)
    torch.add(x, b2.view(1, C, 1, 1), out=out_pre)
    if out_pre.is_contiguous():  # (B, C, HW) += W2 · yᵀ per batch: the residual's own layout
        out_pre.view(B, C, H * W).baddbmm_(w2.expand(B, C, N), y.view(B, H * W, N).transpose(1, 2))
    else:  # channels-last: rows
        out_pre.permute(0, 2, 3, 1).view(M, C).addmm_(y.view(M, N), w2.t())
    rstd = x.new_empty(0, dtype=torch.float32)
    if not keep_h:
        h = x.new_empty(0, N)
    if mod_a is None:
        return out_pre, x.new_empty(0), xn, rstd, h, st
    return C_.modulate(out_pre, mod_a, mod_b), out_pre, xn, rstd, h, st


def backward(grad, x, skip, wd, bd, w1, gamma, beta, w2, mod_a, out_pre, xn, h, st, eps, stage_b):
    """The 12 gradients of the resblock op (absent ones as distinct empty tensors)."""
    C_ = torch.ops.wuerstchen_fast_C
    B, C, H, W = x.shape
    N, M = w1.shape[0], B * H * W
    da, db = x.new_empty(0), x.new_empty(0)
    dpre = grad
    if mod_a is not None:
        dpre, da, db = C_.modulate_backward(grad, out_pre, mod_a)
    dout = _rows(dpre)
    db2 = dout.sum(0)
    dy = dout @ w2
    h4, dy4 = h.view(B, H, W, N), dy.view(B, H, W, N)
    ps, dbeta = C_.grn_colsum(h4, dy4, True)
    t, dgamma = ext_stats_bwd(ps, st, gamma)
    dw2 = dout.t() @ C_.grn_apply(h4, st[0], beta, True).view(M, N)
    dh = C_.grn_apply_backward(h4, dy4, st[0], t, True).view(M, N)
    db1 = dh.sum(0)
    dxn = dh @ w1[:, :C]
    dw1 = dh.t() @ xn
    dskip = x.new_empty(0)
    if stage_b and skip is not None:
        dw1 = torch.cat([dw1, dh.t() @ _rows(skip)], dim=1)
        dskip = empty_out_like(skip).copy_((dh @ w1[:, C:]).view(B, H, W, -1).permute(0, 3, 1, 2))
    dconv, dwd, dbd = C_.dwconv_ln_backward(dxn.view(B, H, W, C).permute(0, 3, 1, 2), x, wd, bd, eps)
    dx = empty_out_like(x)
    torch.add(dconv, dpre, out=dx)
    p = w1.dtype
    return (dx, dskip, dwd, dbd, dw1, db1, dgamma.to(p), dbeta.to(p), dw2, db2, da, db)

