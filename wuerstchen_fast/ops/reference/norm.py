"""Reference: normalisation ops (see the package docstring for the role of references)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["layer_norm_2d"]


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of a (B, C, H, W) tensor, no affine parameters.

    Exactly what `WuerstchenLayerNorm` / `LayerNorm2d` do: permute to BHWC, `F.layer_norm` over
    the last dimension, permute back (so a contiguous input gives a channels-last-strided result).
    """
    if x.dim() != 4:
        raise ValueError(f"layer_norm_2d expects a 4-d (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)
