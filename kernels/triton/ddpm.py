"""ddpm_step in Triton: model head + classifier-free guidance + the Würstchen DDPM update, one pass.

Math per element (b, c, h, w) of x, with B = x.shape[0] and C = x.shape[1]:
    head     HEAD=0 ε = O[b, c];  HEAD=1 (Stage C) ε = (x − O[b, c]) / (|1 − O[b, c + C]| + 1e-5)
             HEAD=2 (Stage B) ε = (x − O[b, c]) / (sigmoid(O[b, c + C])(1 − 2e-3) + 1e-3)
    cfg      CFG: ε = ε_u + w·(ε_c − ε_u) with ε_c from O[b], ε_u from O[b + B] (x_in = x for both)
    schedule ᾱ(t) = clamp(cos²((t + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2), 1e-4, 0.9999), t warped by
             `scaler` first (SCALER: 0 none, 1 t = 1 − (1 − t)^k, 2 t = t^k); t, t_prev read from
             device tensors (one value, or one per batch element) so the step never syncs the host
    update   α = ᾱ(t)/ᾱ(t_prev); y = α^−½·(x − (1 − α)·ε/sqrt(1 − ᾱ(t)))
                                     + sqrt((1 − α)(1 − ᾱ(t_prev))/(1 − ᾱ(t)))·z·[t_prev ≠ 0]
Layout: any strides for every tensor (the flat index is split into b, c, h, w), output in x's
layout. Accumulation: everything in float32 (the reference rounds the head and the lerp to the
model dtype in between; we do not, so we are at least as accurate). Forward only: sampling.
Limits: numel below 2**31 (offsets are int64 after the split).
Equivalent code: `wuerstchen_fast.ops.reference.ddpm_step_fused`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .rounding import rne_flag, to_out

__all__ = ["ddpm_step_fwd", "COMPILE_SPECS"]

_HEADS = {"eps": 0, "stage_c": 1, "stage_b": 2}
HALF_PI = math.pi * 0.5


@triton.jit
def _alpha_cumprod(t, s, one_plus_s, inv_init, scaler, SCALER: tl.constexpr):
    if SCALER == 1:
        t = 1.0 - tl.exp2(scaler * tl.log2(1.0 - t))
    elif SCALER == 2:
        t = tl.exp2(scaler * tl.log2(t))
    c = tl.cos((t + s) / one_plus_s * 1.5707963267948966)
    return tl.minimum(tl.maximum(c * c * inv_init, 1e-4), 0.9999)


@triton.jit
def _eps(O, ooff, ooff_b, x, HEAD: tl.constexpr, mask):
    a = tl.load(O + ooff, mask=mask, other=0.0).to(tl.float32)
    if HEAD == 0:
        return a
    bb = tl.load(O + ooff_b, mask=mask, other=0.0).to(tl.float32)
    if HEAD == 1:
        den = tl.abs(1.0 - bb) + 1e-5
    else:
        den = tl.sigmoid(bb) * (1.0 - 2e-3) + 1e-3
    return (x - a) / den


@triton.jit
def _ddpm_step_kernel(
    X, O, NZ, T, TP, Y,
    N, C, H, W, B,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    snb, snc, snh, snw,
    syb, syc, syh, syw,
    st, stp,
    guidance, s, one_plus_s, inv_init, scaler,
    HEAD: tl.constexpr, CFG: tl.constexpr, SCALER: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    w = (i % W).to(tl.int64)
    h = ((i // W) % H).to(tl.int64)
    c = ((i // (W * H)) % C).to(tl.int64)
    b = (i // (W * H * C)).to(tl.int64)
    x = tl.load(X + b * sxb + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(NZ + b * snb + c * snc + h * snh + w * snw, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + b * st, mask=mask, other=0.5).to(tl.float32)
    tp = tl.load(TP + b * stp, mask=mask, other=0.5).to(tl.float32)
    ooff = b * sob + c * soc + h * soh + w * sow
    eps = _eps(O, ooff, ooff + C * soc, x, HEAD, mask)
    if CFG:
        ooff_u = ooff + B * sob
        eps_u = _eps(O, ooff_u, ooff_u + C * soc, x, HEAD, mask)
        eps = eps_u + guidance * (eps - eps_u)
    a_t = _alpha_cumprod(t, s, one_plus_s, inv_init, scaler, SCALER)
    a_p = _alpha_cumprod(tp, s, one_plus_s, inv_init, scaler, SCALER)
    alpha = a_t / a_p
    mu = tl.sqrt(1.0 / alpha) * (x - (1.0 - alpha) * eps / tl.sqrt(1.0 - a_t))
    std = tl.sqrt((1.0 - alpha) * (1.0 - a_p) / (1.0 - a_t))
    y = mu + tl.where(tp != 0.0, std * z, 0.0)
    tl.store(Y + b * syb + c * syc + h * syh + w * syw, to_out(y, Y.dtype.element_ty, RNE), mask=mask)


BLOCK = 512  # elementwise: 4 warps x 4 elements per thread (1024 needs ~190 registers on sm_90)


def ddpm_step_fwd(x, model_out, t, t_prev, noise, guidance, head, s, scaler) -> torch.Tensor:
    from wuerstchen_fast.diffusion.schedule import _constants
    from wuerstchen_fast.ops.layout import empty_out_like

    y = empty_out_like(x)
    if x.numel() == 0:
        return y
    B, C, H, W = x.shape
    s32, one_plus_s, init = _constants(float(s))
    mode = 0 if scaler == 1 else (1 if scaler > 1 else 2)
    t, t_prev = t.reshape(-1), t_prev.reshape(-1)
    st = 0 if t.numel() == 1 else t.stride(0)
    stp = 0 if t_prev.numel() == 1 else t_prev.stride(0)
    cfg = model_out.shape[0] == 2 * B
    grid = (triton.cdiv(x.numel(), BLOCK),)
    _ddpm_step_kernel[grid](
        x, model_out, noise, t, t_prev, y, x.numel(), C, H, W, B,
        *x.stride(), *model_out.stride(), *noise.stride(), *y.stride(), st, stp,
        float(guidance), s32, one_plus_s, 1.0 / init, float(scaler),
        HEAD=_HEADS[head], CFG=cfg, SCALER=mode, BLOCK=BLOCK, RNE=rne_flag(y), num_warps=4,
    )
    return y


def _signature(dtype: str) -> dict:
    sig = {}
    for i, n in enumerate(_ddpm_step_kernel.arg_names):
        if i < 6:
            sig[n] = "*fp32" if n in ("T", "TP") else f"*{dtype}"
        elif n in ("guidance", "s", "one_plus_s", "inv_init", "scaler"):
            sig[n] = "fp32"
        elif n.isupper() and n not in ("N", "C", "H", "W", "B"):
            sig[n] = "constexpr"
        else:
            sig[n] = "i64" if n.startswith("s") else "i32"
    return sig


# Released uses: Stage C (head 1, CFG, bf16) at 2x16x24x24 and Stage B (head 2, no CFG) at 1x4x256x256.
COMPILE_SPECS = [
    dict(name=f"_ddpm_step_kernel[{name}]", kernel=_ddpm_step_kernel, signature=_signature("bf16"),
         constexprs=dict(HEAD=head, CFG=cfg, SCALER=0, BLOCK=BLOCK, RNE=False), num_warps=4)
    for name, head, cfg in (("stage_c,cfg", 1, True), ("stage_b", 2, False), ("eps,cfg", 0, True))
]
