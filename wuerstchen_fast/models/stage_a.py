"""Stage A: the f4 VQGAN (spec §4; diffusers `PaellaVQModel`, original `VQModel`).

encode(images in [0, 1]) -> unquantized latents (B, 4, H/4, W/4);
decode(latents) -> images, without quantizing (diffusers' default; the pipeline scales latents by
`scale_factor` first and clamps the result to [0, 1]);
quantize(latents) -> (codes, indices, vq_loss).
Codebook key: `vquantizer.embedding.weight` (diffusers); the original `vquantizer.codebook.weight`
is converted by the loaders.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wuerstchen_fast import ops
from wuerstchen_fast.ops.mixing import mixing_dwconv
from wuerstchen_fast.ops.mixing_mlp import mixing_mlp

from .configs import StageAConfig

__all__ = ["StageA", "MixingResidualBlock", "VectorQuantizer"]


class MixingResidualBlock(nn.Module):
    """x += dw(LN1(x)(1+g0)+g1)*g2; x += mlp(LN2(x)(1+g3)+g4)*g5, `gammas` (6,), zero init.

    Runs as three registered ops: norm_mod + mixing_dwconv (first branch) and mixing_mlp (second branch);
    parameter names are the released ones (`depthwise.1.*`, `channelwise.0.*`, `channelwise.2.*`, `gammas`).
    """

    def __init__(self, c: int, c_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    @staticmethod
    def _norm_mod(x: torch.Tensor, norm: nn.LayerNorm, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Channel LayerNorm of a BCHW tensor then a scalar affine: LN(x) * (1 + scale) + shift.

        Runs as the registered op `ops.norm_mod` (one Triton kernel forward and backward on the GPU;
        the torch backend is exactly `norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + scale) + shift`).
        """
        return ops.norm_mod(x, scale, shift, norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        # x + depthwise(xn)·g2 as one op (torch backend: exactly this expression with self.depthwise's pad + conv)
        conv = self.depthwise[1]
        x = mixing_dwconv(x, self._norm_mod(x, self.norm1, g[0], g[1]), conv.weight, conv.bias, g[2])
        # x + channelwise(LN2(x)·(1 + g3) + g4)·g5 as one op (torch backend: exactly
        # `x + self.channelwise(norm_mod(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]`)
        l1, l2 = self.channelwise[0], self.channelwise[2]
        return mixing_mlp(x, l1.weight, l1.bias, l2.weight, l2.bias, g[3], g[4], g[5], self.norm2.eps)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantizer (L2), straight-through gradient."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, dim)

    def forward(self, z: torch.Tensor):
        """z: (B, C, H, W) -> (codes (B, C, H, W), indices (B, H, W), loss scalar).

        loss = mse(q, z.detach()) + beta * mse(z, q.detach()).
        """
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = torch.argmin(torch.cdist(flat, self.embedding.weight), dim=1)
        q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()
        return q.contiguous(), indices.view(b, h, w), loss


class StageA(nn.Module):
    def __init__(self, config: StageAConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else StageAConfig.v2()
        self.scale_factor = cfg.scale_factor
        c_levels = cfg.c_levels
        s = cfg.up_down_scale_factor
        self.in_block = nn.Sequential(nn.PixelUnshuffle(s), nn.Conv2d(cfg.in_channels * s * s, c_levels[0], kernel_size=1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.latent_channels, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.latent_channels)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels, beta=0.25)
        up = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c_levels[-1], kernel_size=1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(c, c * 4))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], cfg.out_channels * s * s, kernel_size=1), nn.PixelShuffle(s))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> unquantized latents (B, latent_channels, H/f, W/f)."""
        return self.down_blocks(self.in_block(images))

    def quantize(self, latents: torch.Tensor):
        """-> (codes, indices (B, h, w), vq_loss)."""
        return self.vquantizer(latents)

    def decode(self, latents: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latents -> images (not clamped). Quantizes first only when `quantize=True`."""
        if quantize:
            latents = self.quantize(latents)[0]
        return self.out_block(self.up_blocks(latents))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))
