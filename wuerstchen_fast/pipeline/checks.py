"""Input checks for the pipeline call, and the NaN check between stages.

Every check runs before any model does, and every message says what was wrong, what was expected
and what to do. The size rule is the one of the released pipelines:

    Stage C grid   h_c = ceil(H / 42.67)
    Stage B latent h_b = int(h_c · 10.67)     (must be a multiple of the decoder's downsampling)
    output side    4 · h_b  =  4·int(ceil(H/42.67)·10.67)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "check_dtype",
    "check_side",
    "check_steps",
    "check_count",
    "check_output_type",
    "check_guidance",
    "check_generator",
    "LatentGeometry",
    "check_finite",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}.get(dtype, dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype!r}: the pipeline runs in torch.float32, torch.bfloat16 or torch.float16 "
            "(bf16 recommended on GPUs; fp16 may overflow in the prior)"
        )
    return dtype


def check_steps(name: str, steps, timesteps) -> None:
    if timesteps is not None:
        return  # validated by make_timesteps (range, order, length)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"{name} must be a positive int (number of denoiser calls), got {steps!r}")


def check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_output_type(value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"output_type must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_guidance(name: str, scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 (guidance is applied only when > 1; 0 or 1 turns it off), got {scale!r}"
        )
    return float(scale)


def check_generator(generator, device: torch.device, batch: int):
    """diffusers' rule: a CPU generator serves any device (noise drawn on the CPU, then moved);
    any other generator must live on the pipeline's device."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if isinstance(generator, (list, tuple)) and len(generator) not in (1, batch):
        raise ValueError(
            f"got a list of {len(generator)} generators for {batch} images: pass one generator, or one per image"
        )
    for g in gens:
        if g is None:
            continue
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (or a list of them), got {type(g).__name__}")
        gd = g.device
        same = gd.type == device.type and (gd.index is None or device.index is None or gd.index == device.index)
        if gd.type != "cpu" and not same:
            where = "" if device.type == "cpu" else f"torch.Generator(device={str(device)!r}) or "
            raise ValueError(
                f"generator is on {gd} but the pipeline runs on {device}: create it with {where}"
                "torch.Generator('cpu') (reproducible across devices), or pass seed=..."
            )


def check_side(name: str, side) -> int:
    if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
        raise ValueError(f"{name} must be a positive int number of pixels, got {side!r}")
    return side


class LatentGeometry:
    """The latent sizes a (height, width) request maps to, and the check that Stage B can run them."""

    def __init__(self, resolution_multiple: float = 42.67, latent_dim_scale: float = 10.67,
                 decoder_multiple: int = 16, pixels_per_latent: int = 4):
        self.resolution_multiple = resolution_multiple
        self.latent_dim_scale = latent_dim_scale
        self.decoder_multiple = decoder_multiple
        self.pixels_per_latent = pixels_per_latent

    def prior_side(self, side: int) -> int:
        return math.ceil(side / self.resolution_multiple)

    def decoder_side(self, prior_side: int) -> int:
        return int(prior_side * self.latent_dim_scale)

    def output_side(self, side: int) -> int:
        return self.pixels_per_latent * self.decoder_side(self.prior_side(side))

    def _valid_grid(self, h_c: int) -> bool:
        hb = self.decoder_side(h_c)
        return hb > 0 and hb % self.decoder_multiple == 0

    def nearest_valid(self, side: int) -> list[int]:
        """Nearest requestable sides below and above `side` (the largest input with that grid)."""
        h_c = self.prior_side(side)
        found = []
        for direction in (-1, 1):
            k = h_c + direction
            while 1 <= k <= h_c + 64 and not self._valid_grid(k):
                k += direction
            if 1 <= k <= h_c + 64:
                found.append(math.floor(k * self.resolution_multiple))
        return found

    def check(self, name: str, side) -> tuple[int, int]:
        """-> (Stage C side, Stage B side) for a requested pixel side, or a ValueError with the rule."""
        h_c = self.prior_side(check_side(name, side))
        hb = self.decoder_side(h_c)
        if self._valid_grid(h_c):
            return h_c, hb
        options = " or ".join(f"{s} (-> {self.output_side(s)} px)" for s in self.nearest_valid(side))
        rm, ls, m, f = self.resolution_multiple, self.latent_dim_scale, self.decoder_multiple, self.pixels_per_latent
        raise ValueError(
            f"{name}={side} cannot be generated: it gives a Stage C grid of ceil({side}/{rm}) = {h_c} and a "
            f"Stage B latent of int({h_c}*{ls}) = {hb}, but the decoder needs a multiple of {m} "
            f"(its patch size times its downsamplings). Output side = {f}*int(ceil(H/{rm})*{ls}). "
            f"Nearest valid {name}: {options}."
        )


    def check_grid(self, name: str, h_c: int) -> int:
        """-> the Stage B side for a Stage C grid side (of given image embeddings), or a ValueError."""
        if self._valid_grid(h_c):
            return self.decoder_side(h_c)
        ok = [k for k in range(max(1, h_c - 64), h_c + 65) if self._valid_grid(k)]
        near = sorted(ok, key=lambda k: (abs(k - h_c), k))[:2]
        ls, m = self.latent_dim_scale, self.decoder_multiple
        raise ValueError(
            f"image_embeddings {name} {h_c} gives a Stage B latent of int({h_c}*{ls}) = {self.decoder_side(h_c)}, "
            f"but the decoder needs a multiple of {m}; embeddings {name}s that work nearby: "
            f"{' or '.join(map(str, sorted(near)))} (the prior makes ceil(pixels/{self.resolution_multiple}))."
        )


def check_finite(x: torch.Tensor, stage: str) -> None:
    """One host sync per stage: refuse to hand NaN/Inf on (it would end as a black image)."""
    if bool(torch.isfinite(x).all()):
        return
    n_bad = int((~torch.isfinite(x)).sum())
    if x.dtype == torch.float16:
        cause = ("This is almost certainly fp16 overflow in the activations: load the pipeline with "
                 "dtype=torch.bfloat16 (same speed on recent GPUs, float32's range) or torch.float32.")
    else:
        cause = ("In bf16/fp32 this points at the weights (a corrupted or mismatched checkpoint) or at the "
                 "inputs (latents=, timesteps, a callback that changed the latents); try dtype=torch.float32.")
    raise FloatingPointError(f"{stage} produced {n_bad} NaN/Inf values out of {x.numel()} ({x.dtype}). {cause}")
