"""Reference: Stage A MixingResidualBlock's two branches (see the package docstring): norm + modulation,
the depthwise-conv residual and the MLP residual."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["norm_mod", "dwconv_residual", "mlp_residual"]


def norm_mod(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Channel LayerNorm of a (B, C, H, W) tensor (no affine) then a scalar affine: LN(x)·(1 + scale) + shift.

    Exactly MixingResidualBlock's `norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g) + g'`
    with `nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)`; `scale`, `shift` are 0-d tensors.
    """
    if x.dim() != 4:
        raise ValueError(f"norm_mod expects a 4-d (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2) * (1 + scale) + shift


def dwconv_residual(x: torch.Tensor, xn: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    gamma: torch.Tensor) -> torch.Tensor:
    """MixingResidualBlock's first branch after norm_mod: x + depthwise(xn)·gamma, with
    `depthwise = [ReplicationPad2d(1), Conv2d(c, c, 3, groups=c)]` (weight (C, 1, 3, 3)); gamma 0-d.

    Exactly the module's arithmetic (ReplicationPad2d is F.pad(mode="replicate"), the Conv2d has no padding).
    """
    return x + F.conv2d(F.pad(xn, (1, 1, 1, 1), mode="replicate"), weight, bias, groups=xn.shape[1]) * gamma


def mlp_residual(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MixingResidualBlock's second branch: x + channelwise(norm_mod(x, scale, shift))·gamma, with
    `channelwise = [Linear(c, n), GELU, Linear(n, c)]` applied channels-last (w1 (n, c), w2 (c, n)); scale,
    shift, gamma 0-d (the block's gammas[3], [4], [5]).

    Exactly the module's arithmetic: `x + channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g5`.
    """
    h = norm_mod(x, scale, shift, eps).permute(0, 2, 3, 1)
    return x + F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2).permute(0, 3, 1, 2) * gamma
