"""Stage C: the text-conditional prior (spec §2; diffusers `WuerstchenPrior`, original `Prior`).

forward(x, r, c) -> eps_hat, where x is the (B, c_in, h, w) noisy latent, r the (B,) noise level in
[0, 1] and c the (B, T, c_cond) CLIP text hidden states. Output: (x - a) / (|1 - b| + 1e-5).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.reference.ddpm import stage_c_head
from .blocks import AttnBlock, LayerNorm2d, ResBlock, RFrequencies, TimestepBlock, r_embedding, resblock_then_timestep
from .configs import StageCConfig

__all__ = ["StageC"]


class StageC(nn.Module):
    # The sampler fuses this output head into its DDPM step op (ops.ddpm_step) via forward_raw.
    eps_head = "stage_c"

    def __init__(self, config: StageCConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else StageCConfig.v2()
        self.c_r = cfg.c_r
        self.r_freqs = RFrequencies(cfg.c_r)  # eager constant, see RFrequencies
        self.projection = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, cfg.c), nn.LeakyReLU(0.2), nn.Linear(cfg.c, cfg.c))
        # Flat list, keys blocks.{3k} ResBlock, blocks.{3k+1} TimestepBlock, blocks.{3k+2} AttnBlock.
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ResBlock(cfg.c, dropout=cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.c, cfg.c_r))
            self.blocks.append(AttnBlock(cfg.c, cfg.c, cfg.nhead, self_attn=True, dropout=cfg.dropout))
        self.out = nn.Sequential(LayerNorm2d(), nn.Conv2d(cfg.c, cfg.c_in * 2, kernel_size=1))
        # Fold each TimestepBlock's modulation into the preceding ResBlock op when a fused backend runs
        # it (see ResBlock.folds); False keeps the two ops apart (the tests compare both paths).
        self.fold_modulation = True

    def gen_r_embedding(self, r: torch.Tensor) -> torch.Tensor:
        return r_embedding(r, self.c_r, freqs=self.r_freqs.freqs)

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return stage_c_head(x, self.forward_raw(x, r, c))

    def forward_raw(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The output before the head: (B, 2 c_in, h, w), a then b along channels."""
        x = self.projection(x)
        c_embed = self.cond_mapper(c)
        r_embed = self.gen_r_embedding(r)
        blocks, i = self.blocks, 0
        while i < len(blocks):
            block = blocks[i]
            if isinstance(block, AttnBlock):
                x = block(x, c_embed)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            elif isinstance(block, ResBlock) and i + 1 < len(blocks) and isinstance(blocks[i + 1], TimestepBlock):
                # ResBlock -> TimestepBlock: the modulation folds into the ResBlock's output epilogue.
                x = resblock_then_timestep(block, blocks[i + 1], x, None, r_embed, self.fold_modulation)
                i += 1
            else:
                x = block(x)
            i += 1
        return self.out(x)

