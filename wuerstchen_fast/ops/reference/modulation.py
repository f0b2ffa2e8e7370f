"""Reference: timestep modulation (see the package docstring for the role of references)."""
from __future__ import annotations

import torch

__all__ = ["modulate"]


def modulate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TimestepBlock's modulation: `x * (1 + a) + b` with a, b of shape (B, C) broadcast over H, W.

    diffusers: `a, b = self.mapper(t)[:, :, None, None].chunk(2, dim=1); x * (1 + a) + b`.
    """
    if x.dim() != 4 or a.shape != x.shape[:2] or b.shape != x.shape[:2]:
        raise ValueError(f"modulate expects x (B, C, H, W) and a, b (B, C); got x {tuple(x.shape)}, "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    return x * (1 + a[:, :, None, None]) + b[:, :, None, None]
