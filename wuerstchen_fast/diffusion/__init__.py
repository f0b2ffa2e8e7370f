"""Diffusion process of Würstchen: the cosine schedule, the DDPM step and the sampling loop."""
from .ddpm import ddpm_step
from .sampler import DenoiseLoop, cfg_combine
from .schedule import DEFAULT_STAGE_C_TIMESTEPS, add_noise, alpha_cumprod, make_timesteps

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "DenoiseLoop",
    "add_noise",
    "alpha_cumprod",
    "cfg_combine",
    "ddpm_step",
    "make_timesteps",
]
