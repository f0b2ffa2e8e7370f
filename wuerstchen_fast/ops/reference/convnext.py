"""Reference: the ConvNeXt blocks, GRN and both ResBlocks (see the package docstring).

Operation for operation what diffusers' `GlobalResponseNorm`, `ResBlock` (Stage C, skip concatenated
before the depthwise conv) and `ResBlockStageB` (skip concatenated after the norm) do, with the
modules' `nn.Linear`/`nn.GELU`/`nn.Dropout` as their functional forms, so the `torch` backend
reproduces diffusers bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm import layer_norm_2d

__all__ = ["dwconv_ln", "grn", "resblock", "resblock_stage_b"]


def dwconv_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The blocks' `depthwise` Conv2d (groups = weight.shape[0], zero padding k // 2) + bias, then LayerNorm2d.

    x (B, C_in, H, W) with C_in = C * weight.shape[1] (Stage C's ResBlock feeds cat[x, skip] here);
    weight (C, C_in / C, k, k), bias (C,). Output (B, C, H, W), channels-last strided (LayerNorm2d's permutes).
    """
    k = weight.shape[-1]
    return layer_norm_2d(F.conv2d(x, weight, bias, padding=k // 2, groups=weight.shape[0]), eps)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """GlobalResponseNorm of channels-last x (B, H, W, C); gamma, beta of shape (1, 1, 1, C) or (C,).

    Gx = ||x||_2 over (H, W); Nx = Gx / (mean_C Gx + 1e-6); out = gamma * (x * Nx) + beta + x.
    """
    if x.dim() != 4:
        raise ValueError(f"grn expects a channels-last (B, H, W, C) tensor, got shape {tuple(x.shape)}")
    agg_norm = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    stand_div_norm = agg_norm / (agg_norm.mean(dim=-1, keepdim=True) + 1e-6)
    return gamma * (x * stand_div_norm) + beta + x


def _channelwise(x, w1, b1, gamma, beta, w2, b2, dropout, training):
    """[Linear, GELU, GRN, Dropout, Linear] on channels-last x."""
    x = F.gelu(F.linear(x, w1, b1))
    x = F.dropout(grn(x, gamma, beta), dropout, training)
    return F.linear(x, w2, b2)


def resblock(x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout=0.0, training=False, eps=1e-6):
    """Stage C ResBlock: depthwise(cat[x, skip]) -> LayerNorm2d -> channelwise MLP -> + x."""
    x_res = x
    h = torch.cat([x, x_skip], dim=1) if x_skip is not None else x
    h = dwconv_ln(h, dw_weight, dw_bias, eps)
    h = _channelwise(h.permute(0, 2, 3, 1), w1, b1, gamma, beta, w2, b2, dropout, training).permute(0, 3, 1, 2)
    return h + x_res


def resblock_stage_b(x, x_skip, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, dropout=0.0, training=False,
                     eps=1e-6):
    """Stage B ResBlock: depthwise(x) -> LayerNorm2d -> cat[., skip] -> channelwise MLP -> + x."""
    x_res = x
    h = dwconv_ln(x, dw_weight, dw_bias, eps)
    if x_skip is not None:
        h = torch.cat([h, x_skip], dim=1)
    h = _channelwise(h.permute(0, 2, 3, 1), w1, b1, gamma, beta, w2, b2, dropout, training).permute(0, 3, 1, 2)
    return h + x_res
