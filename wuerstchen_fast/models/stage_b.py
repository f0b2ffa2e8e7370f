"""Stage B: the DiffNeXt latent diffusion decoder (spec §3; diffusers `WuerstchenDiffNeXt`).

forward(x, r, effnet, clip) -> eps_hat. x: (B, c_in, H, W) Stage A latent (H, W divisible by
patch_size * 2**(levels-1)); r: (B,) noise level; effnet: (B, effnet_embd, h, w) semantic latent
(resized bicubically to every injecting level); clip: (B, T, clip_embd) CLIP text hidden states or None.
Output: (x - a) / b with b = sigmoid(.) * (1 - 2 eps) + eps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.reference.ddpm import STAGE_B_HEAD_EPS, stage_b_head
from .blocks import (AttnBlock, LayerNorm2d, ResBlockStageB, RFrequencies, TimestepBlock, r_embedding,
                     resblock_then_timestep)
from .configs import StageBConfig

__all__ = ["StageB"]


class StageB(nn.Module):
    # The sampler fuses this output head (with eps=1e-3) into its DDPM step op via forward_raw.
    eps_head = "stage_b"

    def __init__(self, config: StageBConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else StageBConfig.v2()
        self.c_r = cfg.c_r
        self.r_freqs = RFrequencies(cfg.c_r)  # eager constant, see RFrequencies
        n = len(cfg.c_hidden)
        dropout = cfg.dropout if isinstance(cfg.dropout, (list, tuple)) else [cfg.dropout] * n

        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        # One slot per down level then per up level; None where a level does not inject, so only the
        # injecting indices appear in the state dict (released: effnet_mappers.1..6).
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if inject else None
             for inject in list(cfg.inject_effnet) + list(reversed(cfg.inject_effnet))]
        )
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        p = cfg.patch_size
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p * p, cfg.c_hidden[0], kernel_size=1), LayerNorm2d()
        )

        def block(kind: str, c: int, nhead: int, c_skip: int, drop: float) -> nn.Module:
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=cfg.kernel_size, dropout=drop)
            if kind == "A":
                return AttnBlock(c, cfg.c_cond, nhead, self_attn=True, dropout=drop)
            return TimestepBlock(c, cfg.c_r)

        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(cfg.c_hidden):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(), nn.Conv2d(cfg.c_hidden[i - 1], c, kernel_size=2, stride=2)))
            c_skip = cfg.c_cond if cfg.inject_effnet[i] else 0
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    level.append(block(kind, c, cfg.nhead[i], c_skip, dropout[i]))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            c = cfg.c_hidden[i]
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, kind in enumerate(cfg.level_config[i]):
                    # The first block of every level below the top also takes the down path's output.
                    c_skip = c if (i < n - 1 and j == 0 and k == 0) else 0
                    c_skip += cfg.c_cond if cfg.inject_effnet[i] else 0
                    level.append(block(kind, c, cfg.nhead[i], c_skip, dropout[i]))
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(), nn.ConvTranspose2d(c, cfg.c_hidden[i - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(
            LayerNorm2d(), nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_out * p * p, kernel_size=1), nn.PixelShuffle(p)
        )
        # Fold each TimestepBlock's modulation into the preceding ResBlockStageB op when a fused backend
        # runs it (see ResBlock.folds); False keeps the two ops apart (the tests compare both paths).
        self.fold_modulation = True

    def gen_r_embedding(self, r: torch.Tensor) -> torch.Tensor:
        return r_embedding(r, self.c_r, freqs=self.r_freqs.freqs)

    def gen_c_embeddings(self, clip: torch.Tensor) -> torch.Tensor:
        return self.seq_norm(self.clip_mapper(clip))

    def _effnet_cond(self, idx: int, effnet: torch.Tensor, size) -> torch.Tensor | None:
        mapper = self.effnet_mappers[idx]
        if mapper is None:
            return None
        # Resize in fp32 (bicubic + antialias), as the released code does, then back to the input dtype.
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(effnet.dtype))

    def _run(self, block: nn.Module, x, r_embed, clip):
        """Any block but a ResBlockStageB (see _resblock)."""
        if isinstance(block, AttnBlock):
            return block(x, clip)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    def _resblock(self, level: nn.ModuleList, j: int, x, skip, r_embed):
        """level[j], a ResBlockStageB, and the TimestepBlock after it if there is one (its modulation
        folded into the block op's epilogue where a fused backend runs it). Returns (x, next index)."""
        if j + 1 < len(level) and isinstance(level[j + 1], TimestepBlock):
            return resblock_then_timestep(level[j], level[j + 1], x, skip, r_embed, self.fold_modulation), j + 2
        return level[j](x, skip), j + 1

    def _down_encode(self, x, r_embed, effnet, clip) -> list:
        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            effnet_c, j = None, 0
            while j < len(level):
                if isinstance(level[j], ResBlockStageB):
                    if effnet_c is None:
                        effnet_c = self._effnet_cond(i, effnet, x.shape[-2:])
                    x, j = self._resblock(level, j, x, effnet_c, r_embed)
                else:
                    x, j = self._run(level[j], x, r_embed, clip), j + 1
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(self, level_outputs, r_embed, effnet, clip) -> torch.Tensor:
        x = level_outputs[0]
        n = len(self.down_blocks)
        for i, level in enumerate(self.up_blocks):
            effnet_c, j = None, 0
            while j < len(level):
                if isinstance(level[j], ResBlockStageB):
                    if effnet_c is None:
                        effnet_c = self._effnet_cond(n + i, effnet, x.shape[-2:])
                    skip = level_outputs[i] if (j == 0 and i > 0) else None
                    if effnet_c is not None:
                        skip = effnet_c if skip is None else torch.cat([skip, effnet_c], dim=1)
                    x, j = self._resblock(level, j, x, skip, r_embed)
                else:
                    x, j = self._run(level[j], x, r_embed, clip), j + 1
        return x

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor | None = None,
                eps: float = STAGE_B_HEAD_EPS) -> torch.Tensor:
        return stage_b_head(x, self.forward_raw(x, r, effnet, clip), eps)

    def forward_raw(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor,
                    clip: torch.Tensor | None = None) -> torch.Tensor:
        """The output before the head: (B, 2 c_out, H, W), a then b along channels."""
        r_embed = self.gen_r_embedding(r)
        if clip is not None:
            clip = self.gen_c_embeddings(clip)
        x = self.embedding(x)
        x = self._up_decode(self._down_encode(x, r_embed, effnet, clip), r_embed, effnet, clip)
        return self.clf(x)
