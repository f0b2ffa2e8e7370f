"""Stable Cascade (Würstchen v3): one UNet class for both stages, with diffusers' `StableCascadeUNet`
parameter names, built from the same blocks (and fused ops) as Würstchen v2.

    Stage C (prior):   x (B, 16, h, w) latent, conditioned on CLIP text tokens, the pooled projected
                       text embedding and CLIP image embeddings; all levels at one resolution.
    Stage B (decoder): x (B, 4, H, W) VQGAN latent, conditioned on the prior's latent (`effnet`), the
                       pooled text embedding and a `pixels` map; k2 s2 levels, up-path repeats.

Both predict ε directly. The blocks are v2's: `ResBlockStageB` (the skip enters the first Linear after
the norm, as in `SDCascadeResBlock`), `AttnBlock` and `TimestepBlock(conds=...)`, whose extra mappers
(`mapper_sca`, `mapper_crp`) are summed into the modulation, which folds into the preceding ResBlock
op where a fused backend runs it.

The forward is split in two so that a sampler computes the constant part once per call, not per step:

    conds = model.prepare_conditioning(clip_text_pooled, clip_text, clip_img, effnet, pixels, sample_size=...)
    eps = model.denoise(x, r, *conds)      # per step; == model(x, r, clip_text_pooled, ...)

`conds` is (CLIP tokens after `clip_norm`, then the maps added to the embedded latent: effnet, pixels).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (LN_EPS, AttnBlock, LayerNorm2d, ResBlockStageB, RFrequencies, TimestepBlock, r_embedding,
                     resblock_then_timestep)
from .stable_cascade_config import ATTNBLOCK, RESBLOCK, StableCascadeConfig

__all__ = ["StableCascadeUNet", "UpDownBlock2d"]


class UpDownBlock2d(nn.Module):
    """A 1x1 conv with an optional bilinear 2x resize (after the conv going down, before it going up).
    Stage C's level transitions run with `enabled=False`: LN + 1x1 conv at one resolution."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        resize = (nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
                  if enabled else nn.Identity())
        conv = nn.Conv2d(c_in, c_out, kernel_size=1)
        # Order sets the keys: blocks.0 is the conv going down, blocks.1 going up.
        self.blocks = nn.ModuleList([resize, conv] if mode == "up" else [conv, resize])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _mapper_2d(c_in: int, c: int) -> nn.Sequential:
    # effnet_mapper / pixels_mapper: keys .0 and .2 (1x1 convs), LN2d without parameters at .3.
    return nn.Sequential(nn.Conv2d(c_in, c * 4, kernel_size=1), nn.GELU(), nn.Conv2d(c * 4, c, kernel_size=1),
                         LayerNorm2d())


class StableCascadeUNet(nn.Module):
    def __init__(self, config: StableCascadeConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else StableCascadeConfig.prior()
        self.c_r = cfg.timestep_ratio_embedding_dim
        self.r_freqs = RFrequencies(self.c_r)  # eager constant, see RFrequencies
        c0, p, cc = cfg.block_out_channels[0], cfg.patch_size, cfg.conditioning_dim

        # conditioning
        if cfg.effnet_in_channels is not None:
            self.effnet_mapper = _mapper_2d(cfg.effnet_in_channels, c0)
        if cfg.pixel_mapper_in_channels is not None:
            self.pixels_mapper = _mapper_2d(cfg.pixel_mapper_in_channels, c0)
        self.clip_txt_pooled_mapper = nn.Linear(cfg.clip_text_pooled_in_channels, cc * cfg.clip_seq)
        if cfg.clip_text_in_channels is not None:
            self.clip_txt_mapper = nn.Linear(cfg.clip_text_in_channels, cc)
        if cfg.clip_image_in_channels is not None:
            self.clip_img_mapper = nn.Linear(cfg.clip_image_in_channels, cc * cfg.clip_seq)
        self.clip_norm = nn.LayerNorm(cc, elementwise_affine=False, eps=LN_EPS)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(p), nn.Conv2d(cfg.in_channels * p * p, c0, kernel_size=1),
                                       LayerNorm2d())

        widths, n = cfg.block_out_channels, len(cfg.block_out_channels)
        dropout, self_attn = cfg.dropouts(), cfg.self_attns()

        def block(kind: str, i: int, c_skip: int = 0) -> nn.Module:
            c = widths[i]
            if kind == RESBLOCK:
                return ResBlockStageB(c, c_skip, kernel_size=cfg.kernel_size, dropout=dropout[i])
            if kind == ATTNBLOCK:
                return AttnBlock(c, cc, cfg.num_attention_heads[i], self_attn=self_attn[i], dropout=dropout[i])
            return TimestepBlock(c, self.c_r, conds=cfg.timestep_conditioning_type)

        def transition(c_from: int, c_to: int, i: int, mode: str) -> nn.Module:
            if cfg.switch_level is not None:
                step = UpDownBlock2d(c_from, c_to, mode, enabled=cfg.switch_level[i])
            elif mode == "down":
                step = nn.Conv2d(c_from, c_to, kernel_size=2, stride=2)
            else:
                step = nn.ConvTranspose2d(c_from, c_to, kernel_size=2, stride=2)
            return nn.Sequential(LayerNorm2d(), step)

        self.down_blocks, self.down_downscalers, self.down_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            self.down_downscalers.append(transition(widths[i - 1], widths[i], i - 1, "down") if i > 0 else nn.Identity())
            self.down_blocks.append(nn.ModuleList(
                block(kind, i) for _ in range(cfg.down_num_layers_per_block[i]) for kind in cfg.block_types_per_layer[i]))
            self.down_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(widths[i], widths[i], kernel_size=1) for _ in range(cfg.down_blocks_repeat_mappers[i] - 1)))

        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        up_layers, up_repeats = cfg.up_num_layers_per_block[::-1], cfg.up_blocks_repeat_mappers[::-1]
        for i in reversed(range(n)):
            self.up_upscalers.append(transition(widths[i], widths[i - 1], i - 1, "up") if i > 0 else nn.Identity())
            level = nn.ModuleList()
            for j in range(up_layers[i]):
                for k, kind in enumerate(cfg.block_types_per_layer[i]):
                    # The first block of every level below the deepest also takes the down path's output.
                    level.append(block(kind, i, widths[i] if (i < n - 1 and j == k == 0) else 0))
            self.up_blocks.append(level)
            self.up_repeat_mappers.append(nn.ModuleList(
                nn.Conv2d(widths[i], widths[i], kernel_size=1) for _ in range(up_repeats[i] - 1)))

        self.clf = nn.Sequential(LayerNorm2d(), nn.Conv2d(c0, cfg.out_channels * p * p, kernel_size=1),
                                 nn.PixelShuffle(p))
        # Fold each TimestepBlock's modulation into the preceding ResBlock op when a fused backend runs
        # it (see ResBlock.folds); False keeps the two ops apart (the tests compare both paths).
        self.fold_modulation = True

    # ------------------------------------------------------------------------------- conditioning
    def gen_r_embedding(self, r: torch.Tensor, sca: torch.Tensor | None = None,
                        crp: torch.Tensor | None = None) -> torch.Tensor:
        """[emb(r), emb(cond) for each timestep condition], emb(0) where a condition is not given."""
        parts = [r_embedding(r, self.c_r, freqs=self.r_freqs.freqs)]
        given = {"sca": sca, "crp": crp}
        for name in self.config.timestep_conditioning_type:
            value = given.get(name)
            value = torch.zeros_like(r) if value is None else value.to(r.dtype).expand_as(r)
            parts.append(r_embedding(value, self.c_r, freqs=self.r_freqs.freqs))
        return torch.cat(parts, dim=1)

    def gen_clip_embeddings(self, clip_text_pooled: torch.Tensor, clip_text: torch.Tensor | None = None,
                            clip_img: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP tokens (B, T, conditioning_dim): [text (77), pooled (4 per row), image (4 per image)], then
        clip_norm. A prior given text but no image gets one zero image embedding (what text-to-image uses)."""
        cfg = self.config
        for name, value, mapper in (("clip_text", clip_text, "clip_txt_mapper"),
                                    ("clip_img", clip_img, "clip_img_mapper")):
            if value is not None and not hasattr(self, mapper):
                raise ValueError(f"{name} was given, but this model has no {mapper} (it is conditioned on "
                                 f"{self._conditioning_names()} only)")
        pooled = clip_text_pooled.unsqueeze(1) if clip_text_pooled.dim() == 2 else clip_text_pooled
        b = pooled.shape[0]
        tokens = []
        if clip_text is not None:
            tokens.append(self.clip_txt_mapper(clip_text))
            if clip_img is None and hasattr(self, "clip_img_mapper"):
                clip_img = pooled.new_zeros(b, 1, cfg.clip_image_in_channels)
        tokens.append(self.clip_txt_pooled_mapper(pooled).view(b, pooled.shape[1] * cfg.clip_seq, -1))
        if clip_img is not None:
            img = clip_img.unsqueeze(1) if clip_img.dim() == 2 else clip_img
            tokens.append(self.clip_img_mapper(img).view(b, img.shape[1] * cfg.clip_seq, -1))
        return self.clip_norm(torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0])

    def _conditioning_names(self) -> list:
        names = ["clip_text_pooled"]
        names += ["clip_text"] if hasattr(self, "clip_txt_mapper") else []
        names += ["clip_img"] if hasattr(self, "clip_img_mapper") else []
        names += ["effnet"] if hasattr(self, "effnet_mapper") else []
        names += ["pixels"] if hasattr(self, "pixels_mapper") else []
        return names

    def prepare_conditioning(self, clip_text_pooled: torch.Tensor, clip_text: torch.Tensor | None = None,
                             clip_img: torch.Tensor | None = None, effnet: torch.Tensor | None = None,
                             pixels: torch.Tensor | None = None, *, sample_size=None) -> tuple:
        """Everything of a forward that does not depend on the noisy sample or r, for a sample of spatial
        size `sample_size` (H, W; needed by a decoder's effnet / pixels maps): (clip tokens, *maps added to
        the embedded sample). Pass the result to `denoise`; it is the same math as `forward`, so a chain
        computes it once instead of every step."""
        if effnet is not None and not hasattr(self, "effnet_mapper"):
            raise ValueError(f"effnet was given, but this model has no effnet_mapper (it is conditioned on "
                             f"{self._conditioning_names()} only)")
        conds = [self.gen_clip_embeddings(clip_text_pooled, clip_text, clip_img)]
        if effnet is None and not hasattr(self, "pixels_mapper"):
            return tuple(conds)
        if sample_size is None:
            raise ValueError("prepare_conditioning needs sample_size=(H, W) of the noisy sample for the effnet / "
                             "pixels maps of a decoder")
        p = self.config.patch_size
        size = (int(sample_size[0]) // p, int(sample_size[1]) // p)
        if effnet is not None:
            conds.append(self.effnet_mapper(F.interpolate(effnet, size=size, mode="bilinear", align_corners=True)))
        if hasattr(self, "pixels_mapper"):
            if pixels is None:
                pixels = conds[0].new_zeros(conds[0].shape[0], self.config.pixel_mapper_in_channels, 8, 8)
            conds.append(F.interpolate(self.pixels_mapper(pixels), size=size, mode="bilinear", align_corners=True))
        return tuple(conds)

    # ------------------------------------------------------------------------------------- blocks
    def _run_level(self, level: nn.ModuleList, x, skip, r_embed, clip):
        """One pass over a level's blocks; `skip` goes to the first block (a ResBlock), x resized to it first."""
        j = 0
        while j < len(level):
            block = level[j]
            if isinstance(block, ResBlockStageB):
                s = skip if j == 0 else None
                if s is not None and x.shape[-2:] != s.shape[-2:]:
                    # Sides that do not halve evenly: bilinear in float32 to the skip's size, as diffusers does.
                    x = F.interpolate(x.float(), s.shape[-2:], mode="bilinear", align_corners=True).to(x.dtype)
                if j + 1 < len(level) and isinstance(level[j + 1], TimestepBlock):
                    x = resblock_then_timestep(block, level[j + 1], x, s, r_embed, self.fold_modulation)
                    j += 2
                    continue
                x = block(x, s)
            elif isinstance(block, AttnBlock):
                x = block(x, clip)
            else:
                x = block(x, r_embed)
            j += 1
        return x

    def _down_encode(self, x, r_embed, clip) -> list:
        outputs = []
        for level, downscaler, repeat_mappers in zip(self.down_blocks, self.down_downscalers, self.down_repeat_mappers):
            x = downscaler(x)
            for rep in range(len(repeat_mappers) + 1):
                x = self._run_level(level, x, None, r_embed, clip)
                if rep < len(repeat_mappers):
                    x = repeat_mappers[rep](x)
            outputs.insert(0, x)
        return outputs

    def _up_decode(self, outputs: list, r_embed, clip) -> torch.Tensor:
        x = outputs[0]
        for i, (level, upscaler, repeat_mappers) in enumerate(zip(self.up_blocks, self.up_upscalers,
                                                                   self.up_repeat_mappers)):
            skip = outputs[i] if i > 0 else None
            for rep in range(len(repeat_mappers) + 1):  # the skip is fed again on every repeat
                x = self._run_level(level, x, skip, r_embed, clip)
                if rep < len(repeat_mappers):
                    x = repeat_mappers[rep](x)
            x = upscaler(x)
        return x

    # ------------------------------------------------------------------------------------ forward
    def denoise(self, x: torch.Tensor, r: torch.Tensor, clip: torch.Tensor, *maps: torch.Tensor,
                sca: torch.Tensor | None = None, crp: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ from precomputed conditioning (`prepare_conditioning`): the per-step part of `forward`."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"the sample's sides {tuple(x.shape[-2:])} must be multiples of the patch size {p}")
        r_embed = self.gen_r_embedding(r, sca, crp)
        x = self.embedding(x)
        for m in maps:
            x = x + m
        return self.clf(self._up_decode(self._down_encode(x, r_embed, clip), r_embed, clip))

    def forward(self, sample: torch.Tensor, timestep_ratio: torch.Tensor, clip_text_pooled: torch.Tensor,
                clip_text: torch.Tensor | None = None, clip_img: torch.Tensor | None = None,
                effnet: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                sca: torch.Tensor | None = None, crp: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ (B, out_channels, H, W), with the arguments of diffusers' `StableCascadeUNet.forward`.

        Stage C: clip_text (B, 77, 1280) pre-final-LN text states, clip_text_pooled (B, 1, 1280) projected
        pooled text, clip_img (B, n, 768) image embeddings (zeros for text-to-image). Stage B:
        clip_text_pooled, effnet (B, 16, h, w) the prior's latent, pixels (B, 3, 8, 8) (zeros if None).
        """
        conds = self.prepare_conditioning(clip_text_pooled, clip_text, clip_img, effnet, pixels,
                                          sample_size=sample.shape[-2:])
        return self.denoise(sample, timestep_ratio, *conds, sca=sca, crp=crp)
