"""Configuration of the Stable Cascade (Würstchen v3) UNet, one class for both stages.

Field names and meanings are those of diffusers' `StableCascadeUNet` `config.json`, so a diffusers
config maps onto the dataclass one to one. Named constructors give the four released models
(`prior()` 3.6B, `prior_lite()` 1.0B, `decoder()` 1.5B, `decoder_lite()` 0.7B) and two tiny ones for
tests (`tiny_prior()`, `tiny_decoder()`).

Lists are ordered as diffusers orders them: `block_out_channels`, `num_attention_heads`,
`down_num_layers_per_block`, `down_blocks_repeat_mappers`, `block_types_per_layer`, `dropout` from the
shallowest level to the deepest; `up_num_layers_per_block` and `up_blocks_repeat_mappers` in the order
the up path runs, deepest level first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .configs import _ConfigMixin

__all__ = ["StableCascadeConfig", "RESBLOCK", "TIMESTEPBLOCK", "ATTNBLOCK"]

RESBLOCK, TIMESTEPBLOCK, ATTNBLOCK = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
_CTA = [RESBLOCK, TIMESTEPBLOCK, ATTNBLOCK]
_CT = [RESBLOCK, TIMESTEPBLOCK]
_PER_LEVEL = ("num_attention_heads", "down_num_layers_per_block", "up_num_layers_per_block",
              "down_blocks_repeat_mappers", "up_blocks_repeat_mappers", "block_types_per_layer")


@dataclass
class StableCascadeConfig(_ConfigMixin):
    """Stable Cascade Stage C (prior, `patch_size=1`, CLIP text/image conditioning) or Stage B (decoder,
    `patch_size=2`, effnet and pixels conditioning); the defaults are the released 3.6B prior."""

    in_channels: int = 16
    out_channels: int = 16
    timestep_ratio_embedding_dim: int = 64
    patch_size: int = 1
    conditioning_dim: int = 2048
    block_out_channels: list = field(default_factory=lambda: [2048, 2048])
    num_attention_heads: list = field(default_factory=lambda: [32, 32])
    down_num_layers_per_block: list = field(default_factory=lambda: [8, 24])
    up_num_layers_per_block: list = field(default_factory=lambda: [24, 8])
    down_blocks_repeat_mappers: list | None = field(default_factory=lambda: [1, 1])
    up_blocks_repeat_mappers: list | None = field(default_factory=lambda: [1, 1])
    block_types_per_layer: list = field(default_factory=lambda: [list(_CTA), list(_CTA)])
    clip_text_in_channels: int | None = 1280
    clip_text_pooled_in_channels: int = 1280
    clip_image_in_channels: int | None = 768
    clip_seq: int = 4
    effnet_in_channels: int | None = None
    pixel_mapper_in_channels: int | None = None
    kernel_size: int = 3
    dropout: float | list = field(default_factory=lambda: [0.1, 0.1])
    self_attn: bool | list = True
    timestep_conditioning_type: list = field(default_factory=lambda: ["sca", "crp"])
    switch_level: list | None = field(default_factory=lambda: [False])

    def __post_init__(self):
        n = len(self.block_out_channels)
        # None means "no repeats" (diffusers would build no level at all from a None here).
        for name in ("down_blocks_repeat_mappers", "up_blocks_repeat_mappers"):
            if getattr(self, name) is None:
                setattr(self, name, [1] * n)
        self.block_types_per_layer = [list(t) for t in self.block_types_per_layer]
        for name in _PER_LEVEL:
            if len(getattr(self, name)) != n:
                raise ValueError(f"StableCascadeConfig: {name} has {len(getattr(self, name))} entries, "
                                 f"block_out_channels has {n} (one per level)")
        for name in ("dropout", "self_attn"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and len(v) != n:
                raise ValueError(f"StableCascadeConfig: {name} has {len(v)} entries for {n} levels")
        if self.switch_level is not None and len(self.switch_level) != n - 1:
            raise ValueError(f"StableCascadeConfig: switch_level has {len(self.switch_level)} entries; it needs "
                             f"one per level transition ({n - 1}), or None for k2 s2 convolutions")
        known = {RESBLOCK, TIMESTEPBLOCK, ATTNBLOCK}
        for i, types in enumerate(self.block_types_per_layer):
            bad = [t for t in types if t not in known]
            if bad:
                raise ValueError(f"StableCascadeConfig: block_types_per_layer[{i}] has unknown block types {bad}; "
                                 f"known: {sorted(known)}")
            c, heads = self.block_out_channels[i], self.num_attention_heads[i]
            if ATTNBLOCK in types and (heads <= 0 or c % heads):
                raise ValueError(f"StableCascadeConfig: level {i} has attention, so num_attention_heads[{i}] must "
                                 f"be a positive divisor of block_out_channels[{i}]={c}; got {heads}")
        for name in ("down_blocks_repeat_mappers", "up_blocks_repeat_mappers"):
            if any(r < 1 for r in getattr(self, name)):
                raise ValueError(f"StableCascadeConfig: {name} must be >= 1 everywhere, got {getattr(self, name)}")
        if self.timestep_ratio_embedding_dim < 4:
            raise ValueError("StableCascadeConfig: timestep_ratio_embedding_dim must be at least 4")

    # ---------------------------------------------------------------------------------------- views
    @property
    def is_prior(self) -> bool:
        """Stage C: conditioned on CLIP text tokens (`clip_text_in_channels`), no effnet input."""
        return self.clip_text_in_channels is not None and self.effnet_in_channels is None

    def dropouts(self) -> list:
        d = self.dropout
        return list(d) if isinstance(d, (list, tuple)) else [d] * len(self.block_out_channels)

    def self_attns(self) -> list:
        s = self.self_attn
        return list(s) if isinstance(s, (list, tuple)) else [s] * len(self.block_out_channels)

    # ---------------------------------------------------------------------------------- released
    @classmethod
    def prior(cls) -> "StableCascadeConfig":
        """Released Stage C (`prior/`, `stage_c.safetensors`): width 2048, 8 + 24 down, 24 + 8 up (3.6B)."""
        return cls()

    @classmethod
    def prior_lite(cls) -> "StableCascadeConfig":
        """Released Stage C lite (`prior_lite/`, `stage_c_lite.safetensors`): width 1536 (1.0B)."""
        return cls(conditioning_dim=1536, block_out_channels=[1536, 1536], num_attention_heads=[24, 24],
                   down_num_layers_per_block=[4, 12], up_num_layers_per_block=[12, 4])

    @classmethod
    def decoder(cls) -> "StableCascadeConfig":
        """Released Stage B (`decoder/`, `stage_b.safetensors`): 4 levels 320-1280, up repeats 3,3,2,2 (1.5B)."""
        return cls(in_channels=4, out_channels=4, patch_size=2, conditioning_dim=1280,
                   block_out_channels=[320, 640, 1280, 1280], num_attention_heads=[0, 0, 20, 20],
                   down_num_layers_per_block=[2, 6, 28, 6], up_num_layers_per_block=[6, 28, 6, 2],
                   down_blocks_repeat_mappers=[1, 1, 1, 1], up_blocks_repeat_mappers=[3, 3, 2, 2],
                   block_types_per_layer=[list(_CT), list(_CT), list(_CTA), list(_CTA)],
                   clip_text_in_channels=None, clip_image_in_channels=None, effnet_in_channels=16,
                   pixel_mapper_in_channels=3, dropout=[0.0, 0.0, 0.1, 0.1], timestep_conditioning_type=["sca"],
                   switch_level=None)

    @classmethod
    def decoder_lite(cls) -> "StableCascadeConfig":
        """Released Stage B lite (`decoder_lite/`, `stage_b_lite.safetensors`): 320-1152, up repeats 2 (0.7B)."""
        d = cls.decoder()
        return cls.from_dict({**d.to_dict(), "block_out_channels": [320, 576, 1152, 1152],
                              "num_attention_heads": [0, 9, 18, 18], "down_num_layers_per_block": [2, 4, 14, 4],
                              "up_num_layers_per_block": [4, 14, 4, 2], "up_blocks_repeat_mappers": [2, 2, 2, 2]})

    # -------------------------------------------------------------------------------------- tiny
    @classmethod
    def tiny_prior(cls) -> "StableCascadeConfig":
        """A few-thousand-parameter Stage C with the released layout (2 levels at one resolution, a long skip)."""
        return cls(timestep_ratio_embedding_dim=16, conditioning_dim=32, block_out_channels=[32, 32],
                   num_attention_heads=[2, 2], down_num_layers_per_block=[1, 2], up_num_layers_per_block=[2, 1],
                   clip_text_in_channels=24, clip_text_pooled_in_channels=24, clip_image_in_channels=20,
                   dropout=[0.0, 0.0])

    @classmethod
    def tiny_decoder(cls) -> "StableCascadeConfig":
        """A tiny Stage B with the released layout: k2 s2 levels, CT then CTA, up-path repeat mappers."""
        return cls(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=16, patch_size=2,
                   conditioning_dim=32, block_out_channels=[16, 24, 32], num_attention_heads=[0, 0, 2],
                   down_num_layers_per_block=[1, 1, 1], up_num_layers_per_block=[1, 1, 1],
                   down_blocks_repeat_mappers=[1, 1, 1], up_blocks_repeat_mappers=[2, 2, 1],
                   block_types_per_layer=[list(_CT), list(_CT), list(_CTA)], clip_text_in_channels=None,
                   clip_text_pooled_in_channels=24, clip_image_in_channels=None, effnet_in_channels=16,
                   pixel_mapper_in_channels=3, dropout=[0.0, 0.0, 0.0], timestep_conditioning_type=["sca"],
                   switch_level=None)
