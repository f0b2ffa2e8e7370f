"""Named configurations of the three stages and the semantic compressor.

Field names are those of the diffusers `config.json` of each model (`WuerstchenPrior`,
`WuerstchenDiffNeXt`, `PaellaVQModel`), so a diffusers config maps onto a dataclass one to one.
Each config class has the named constructors `v1()`, `v2()` (the released sizes) and `tiny()`
(a few-thousand-parameter model for tests).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["StageCConfig", "StageBConfig", "StageAConfig", "EffNetConfig", "config_from_dict"]


class _ConfigMixin:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = False):
        """Build from a dict; keys that are not fields (diffusers' `_class_name`, ...) are ignored
        unless `strict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
        if strict and unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known keys: {sorted(names)}")
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in names})


@dataclass
class StageCConfig(_ConfigMixin):
    """Stage C, the text-conditional prior (`WuerstchenPrior`)."""

    c_in: int = 16
    c: int = 1536
    c_cond: int = 1280
    c_r: int = 64
    depth: int = 32
    nhead: int = 24
    dropout: float = 0.1

    def __post_init__(self):
        if self.c % self.nhead:
            raise ValueError(f"StageCConfig: c={self.c} must be divisible by nhead={self.nhead}")

    @classmethod
    def v2(cls) -> "StageCConfig":
        """Released v2 prior: 32 blocks of width 1536 on CLIP ViT-bigG-14 text (~994M params)."""
        return cls()

    @classmethod
    def v1(cls) -> "StageCConfig":
        """v1 prior: as v2 but conditioned on CLIP ViT-H-14 (c_cond=1024)."""
        return cls(c_cond=1024)

    @classmethod
    def tiny(cls) -> "StageCConfig":
        return cls(c_in=16, c=32, c_cond=24, c_r=16, depth=2, nhead=2, dropout=0.0)


@dataclass
class StageBConfig(_ConfigMixin):
    """Stage B, the latent diffusion decoder (`WuerstchenDiffNeXt`)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    nhead: list = field(default_factory=lambda: [-1, 10, 20, 20])
    blocks: list = field(default_factory=lambda: [4, 4, 14, 4])
    level_config: list = field(default_factory=lambda: ["CT", "CTA", "CTA", "CTA"])
    inject_effnet: list = field(default_factory=lambda: [False, True, True, True])
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: float | list = 0.1

    def __post_init__(self):
        n = len(self.c_hidden)
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"StageBConfig: {name} has {len(getattr(self, name))} entries, c_hidden has {n}")
        for i, lc in enumerate(self.level_config):
            if set(lc) - set("CTA"):
                raise ValueError(f"StageBConfig: level_config[{i}]={lc!r} may only use the block types C, T, A")
            if "A" in lc and self.nhead[i] <= 0:
                raise ValueError(f"StageBConfig: level {i} has attention but nhead[{i}]={self.nhead[i]}")

    @classmethod
    def v2(cls) -> "StageBConfig":
        """Released v2 decoder (~1055M params)."""
        return cls()

    @classmethod
    def v1(cls) -> "StageBConfig":
        """v1 decoder: same layout as v2 (CLIP ViT-H-14 text, EfficientNetV2-S effnet)."""
        return cls()

    @classmethod
    def tiny(cls) -> "StageBConfig":
        return cls(c_r=16, c_cond=24, c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1], level_config=["CT", "CTA"],
                   inject_effnet=[False, True], clip_embd=20, dropout=0.0)


@dataclass
class StageAConfig(_ConfigMixin):
    """Stage A, the f4 VQGAN (`PaellaVQModel`)."""

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    @property
    def c_levels(self) -> list:
        return [self.embed_dim // (2 ** i) for i in reversed(range(self.levels))]

    @classmethod
    def v2(cls) -> "StageAConfig":
        """Released VQGAN f4 (~18.4M params); v1 and v2 share it."""
        return cls()

    @classmethod
    def v1(cls) -> "StageAConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "StageAConfig":
        return cls(bottleneck_blocks=2, embed_dim=32, num_vq_embeddings=64)


@dataclass
class EffNetConfig(_ConfigMixin):
    """Semantic compressor: EfficientNetV2-S features then a 1x1 conv + BatchNorm to c_latent channels
    (`affine=False`: Stable Cascade's `effnet_encoder.safetensors`, whose BatchNorm has no weight and bias)."""

    c_latent: int = 16
    backbone: str = "efficientnet_v2_s"
    affine: bool = True

    @classmethod
    def v2(cls) -> "EffNetConfig":
        return cls()

    @classmethod
    def v1(cls) -> "EffNetConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "EffNetConfig":
        return cls()  # the backbone is fixed; only the mapper could shrink


_BY_STAGE = {"stage_a": StageAConfig, "stage_b": StageBConfig, "stage_c": StageCConfig, "effnet": EffNetConfig}


def config_from_dict(stage: str, d: dict):
    """Config object of `stage` ('stage_a', 'stage_b', 'stage_c', 'effnet') from a plain dict."""
    if stage not in _BY_STAGE:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_BY_STAGE)}")
    return _BY_STAGE[stage].from_dict(d)
