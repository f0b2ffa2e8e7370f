"""Reference: one sampler step = model head -> classifier-free guidance -> Würstchen DDPM update.

The three pieces are exactly the code the released pipelines run, in the same order, so the `torch`
backend of `ops.ddpm_step` reproduces diffusers bit for bit:

    head     "eps"      model_out is ε̂ already
             "stage_c"  a, b = model_out.chunk(2, dim=1); ε̂ = (x_in − a) / (|1 − b| + 1e-5)
             "stage_b"  a, b = model_out.chunk(2, dim=1); ε̂ = (x_in − a) / (sigmoid(b)(1 − 2e-3) + 1e-3)
    cfg      when model_out holds 2B samples [cond, uncond]: ε = lerp(ε_uncond, ε_cond, w)
             (x_in is then [x, x], the doubled batch the loop fed the model)
    step     `wuerstchen_fast.diffusion.ddpm.ddpm_step` (spec §6), noise drawn by the caller
"""
from __future__ import annotations

import torch

__all__ = ["HEADS", "stage_c_head", "stage_b_head", "apply_head", "cfg_combine", "ddpm_step_fused"]

HEADS = ("eps", "stage_c", "stage_b")
STAGE_B_HEAD_EPS = 1e-3  # diffusers WuerstchenDiffNeXt.forward(eps=1e-3)


def stage_c_head(x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Stage C output head: (x_in − a) / (|1 − b| + 1e-5) with a, b = out.chunk(2, dim=1)."""
    a, b = out.chunk(2, dim=1)
    return (x_in - a) / ((1 - b).abs() + 1e-5)


def stage_b_head(x_in: torch.Tensor, out: torch.Tensor, eps: float = STAGE_B_HEAD_EPS) -> torch.Tensor:
    """Stage B output head: (x_in − a) / (sigmoid(b)(1 − 2 eps) + eps) with a, b = out.chunk(2, dim=1)."""
    a, b = out.chunk(2, dim=1)
    b = b.sigmoid() * (1 - eps * 2) + eps
    return (x_in - a) / b


def apply_head(head: str, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if head == "eps":
        return out
    if head == "stage_c":
        return stage_c_head(x_in, out)
    if head == "stage_b":
        return stage_b_head(x_in, out)
    raise ValueError(f"unknown model head {head!r}; expected one of {HEADS}")


def cfg_combine(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [cond, uncond] batch: lerp(ε_uncond, ε_cond, w)."""
    eps_cond, eps_uncond = eps.chunk(2)
    return torch.lerp(eps_uncond, eps_cond, guidance_scale)


def ddpm_step_fused(
    x: torch.Tensor,
    model_out: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    noise: torch.Tensor,
    guidance: float = 1.0,
    head: str = "eps",
    s: float = 0.008,
    scaler: float = 1.0,
) -> torch.Tensor:
    """x_t -> x_{t_prev} from the raw model output. CFG applies iff model_out has twice x's batch."""
    from wuerstchen_fast.diffusion.ddpm import ddpm_step  # diffusion imports ops: resolve at call time

    cfg = model_out.shape[0] == 2 * x.shape[0]
    x_in = torch.cat([x, x]) if (cfg and head != "eps") else x
    eps = apply_head(head, x_in, model_out)
    if cfg:
        eps = cfg_combine(eps, guidance)
    return ddpm_step(x, eps, t, t_prev, noise, s=s, scaler=scaler)
