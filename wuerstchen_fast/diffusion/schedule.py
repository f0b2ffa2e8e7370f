"""The Würstchen noise schedule: cosine ᾱ(t) over continuous t in [0, 1] (spec §6).

    ᾱ(t) = clamp(cos²(((t + s)/(1 + s))·π/2) / cos²((s/(1 + s))·π/2), 1e-4, 0.9999),  s = 0.008

t = 1 is pure noise, t = 0 is data. `scaler` warps t before the cosine exactly as
`DDPMWuerstchenScheduler` does (1 in every release). Everything is tensor math in float32 so a
sampler can precompute its whole schedule once on the device and never sync with the host.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "alpha_cumprod",
    "add_noise",
    "make_timesteps",
    "DEFAULT_STAGE_C_TIMESTEPS",
    "S_OFFSET",
]

S_OFFSET = 0.008  # the cosine schedule's offset s (Nichol & Dhariwal); every release uses it

# The prior's fast schedule from the released code: 20 steps over [1, 2/3] and 10 over [2/3, 0],
# 29 model evaluations (the final 0 is only the t_prev of the last step).
# Built in float64 (python floats) as the reference does; they round to float32 on use.
DEFAULT_STAGE_C_TIMESTEPS: list[float] = (
    torch.linspace(1.0, 2 / 3, 20, dtype=torch.float64).tolist()
    + torch.linspace(2 / 3, 0.0, 11, dtype=torch.float64)[1:].tolist()
)


_CONSTANTS: dict[float, tuple[float, float, float]] = {}


def _constants(s: float) -> tuple[float, float, float]:
    """(s, 1 + s, ᾱ_raw(0)) rounded to float32 exactly as float32 tensor math would round them.

    Held as Python floats so `alpha_cumprod` creates no tensor from host data: that keeps it
    legal inside CUDA graph capture while giving the same bits as the reference scheduler.
    """
    if s not in _CONSTANTS:  # a plain dict, not lru_cache: torch.compile traces through it cleanly
        s32 = torch.tensor([s], dtype=torch.float32)
        init = torch.cos(s32 / (1 + s32) * math.pi * 0.5) ** 2
        _CONSTANTS[s] = (float(s32), float(1 + s32), float(init))
    return _CONSTANTS[s]


def alpha_cumprod(t: torch.Tensor, s: float = S_OFFSET, scaler: float = 1.0) -> torch.Tensor:
    """ᾱ(t) for a tensor of continuous timesteps, computed in float32 (any shape, any device).

    A float64 `t` stays float64 (with the same float32-rounded constants): the exact oracle the
    fused step kernel's tests measure float32 errors against.
    """
    t = t if t.dtype == torch.float64 else t.float()
    if scaler > 1:
        t = 1 - (1 - t) ** scaler
    elif scaler < 1:
        t = t**scaler
    s32, one_plus_s, init = _constants(float(s))
    out = torch.cos((t + s32) / one_plus_s * math.pi * 0.5) ** 2 / init
    return out.clamp(1e-4, 0.9999)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, s: float = S_OFFSET, scaler: float = 1.0
) -> torch.Tensor:
    """Forward noising for training: x_t = sqrt(ᾱ(t))·x0 + sqrt(1 − ᾱ(t))·ε, per batch element.

    `t` has one entry per batch element (shape (B,)) or is a scalar. Math in float32, result in
    x0's dtype.
    """
    t = torch.as_tensor(t, device=x0.device)
    a = alpha_cumprod(t.reshape(-1), s, scaler)
    a = a.view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def make_timesteps(
    num_steps: int | None = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The chain of t values as a float32 tensor, `len = model calls + 1`.

    `num_steps=n` gives linspace(1, 0, n + 1) (n model calls). A custom list is used as given,
    like diffusers: the model is called at every entry but the last, and the last entry is the
    t_prev of the final step (so lists should end at 0 for a clean sample).
    """
    if timesteps is not None:
        ts = torch.as_tensor(timesteps, dtype=torch.float32).detach().clone().reshape(-1)
        if ts.numel() < 2:
            raise ValueError(
                f"timesteps must hold at least 2 values (the model runs at all but the last), got {ts.tolist()}"
            )
        if not bool(torch.isfinite(ts).all()) or float(ts.min()) < 0 or float(ts.max()) > 1:
            raise ValueError(f"timesteps must lie in [0, 1] (1 = pure noise), got {ts.tolist()}")
        if not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError(f"timesteps must be strictly decreasing (from noise towards 0), got {ts.tolist()}")
        return ts.to(device)
    if num_steps is None:
        raise ValueError("pass either num_steps or timesteps")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"the number of inference steps must be a positive int, got {num_steps!r}")
    return torch.linspace(1.0, 0.0, num_steps + 1, device=device)


_constants(S_OFFSET)  # filled at import, so a compiled step only ever reads the cache
