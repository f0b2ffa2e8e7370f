"""The Würstchen DDPM update, written once (spec §6). A fused kernel will replace this function;
it stays the reference for that kernel.

Math, with ᾱ from `schedule.alpha_cumprod`, for one step from t to the next value t_prev:

    α     = ᾱ(t) / ᾱ(t_prev)
    μ     = α^(−1/2) · (x − (1 − α) · ε̂ / sqrt(1 − ᾱ(t)))
    σ     = sqrt((1 − α)(1 − ᾱ(t_prev)) / (1 − ᾱ(t)))
    x_new = μ + σ·z·[t_prev ≠ 0]

The noise z is always an input, even for the last step where it is masked out: the caller draws it
from the generator every step so the random stream advances exactly as in diffusers' scheduler.
All tensor math, no data-dependent Python branching: safe under torch.compile and CUDA graphs.
Computed in float32, returned in x's dtype.
"""
from __future__ import annotations

import torch

from .schedule import S_OFFSET, alpha_cumprod

__all__ = ["ddpm_step"]


def ddpm_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    noise: torch.Tensor,
    *,
    s: float = S_OFFSET,
    scaler: float = 1.0,
) -> torch.Tensor:
    """One reverse step x_t -> x_{t_prev}. `t`, `t_prev`: 0-d tensors or one value per batch element."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t = torch.as_tensor(t, device=x.device).reshape(shape)
    t_prev = torch.as_tensor(t_prev, device=x.device).reshape(shape)
    a_t = alpha_cumprod(t, s, scaler)
    a_prev = alpha_cumprod(t_prev, s, scaler)
    alpha = a_t / a_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - a_t).sqrt())
    std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt() * noise
    keep = (t_prev != 0).float()
    return (mu + std * keep).to(x.dtype)
