"""Random-weight Stable Cascade reference models (diffusers, transformers) for tests and benchmarks.

Every builder randomizes every parameter (`random_models.randomize_`): the zero-initialized TimestepBlock
mappers, GRN gammas/betas and output convolutions too, because parity against zeros proves nothing.

    make_diffusers_stable_cascade(config, seed, device=, dtype=, **overrides)  diffusers StableCascadeUNet
    make_clip_text_with_projection(seed, **cfg)     transformers CLIPTextModelWithProjection
    make_clip_vision_with_projection(seed, **cfg)   transformers CLIPVisionModelWithProjection
    SC_SIZES                                        prior / decoder configs per benchmark size
"""
from __future__ import annotations

import torch

from ..models.stable_cascade_config import StableCascadeConfig
from .random_models import randomize_

__all__ = ["TINY_SC_TEXT", "TINY_SC_VISION", "SC_SIZES", "sc_config", "make_diffusers_stable_cascade",
           "make_clip_text_with_projection", "make_clip_vision_with_projection"]

# A tiny bigG-like text tower (gelu, pad "!" = 0, EOS 49407) whose width is the tiny models' pooled width.
TINY_SC_TEXT = dict(vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                    pad_token_id=0, bos_token_id=49406, eos_token_id=49407, projection_dim=24)
# A tiny ViT-L/14-like vision tower (quick_gelu, as OpenAI's) with projection to the tiny prior's image width.
TINY_SC_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=28, patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      projection_dim=20)

# Benchmark sizes: "small" keeps the released layouts at widths a 2-core CPU runs in seconds;
# "released" is the released 3.6B prior and 1.5B decoder.
SC_SIZES = {
    "tiny": dict(prior=StableCascadeConfig.tiny_prior(), decoder=StableCascadeConfig.tiny_decoder()),
    "small": dict(
        prior=StableCascadeConfig.from_dict({**StableCascadeConfig.prior().to_dict(), "conditioning_dim": 256,
                                             "block_out_channels": [256, 256], "num_attention_heads": [4, 4],
                                             "down_num_layers_per_block": [2, 4], "up_num_layers_per_block": [4, 2],
                                             "dropout": [0.0, 0.0]}),
        decoder=StableCascadeConfig.from_dict({**StableCascadeConfig.decoder().to_dict(),
                                               "block_out_channels": [32, 64, 128, 128],
                                               "num_attention_heads": [0, 0, 2, 2], "conditioning_dim": 128,
                                               "down_num_layers_per_block": [1, 1, 2, 1],
                                               "up_num_layers_per_block": [1, 2, 1, 1], "dropout": 0.0})),
    "released": dict(prior=StableCascadeConfig.from_dict({**StableCascadeConfig.prior().to_dict(), "dropout": 0.0}),
                     decoder=StableCascadeConfig.from_dict({**StableCascadeConfig.decoder().to_dict(), "dropout": 0.0})),
}


def sc_config(config, **overrides) -> StableCascadeConfig:
    """A StableCascadeConfig from a config, a preset name ('prior', 'tiny_decoder', ...) or a dict, then overrides."""
    if isinstance(config, str):
        config = getattr(StableCascadeConfig, config)()
    base = config.to_dict() if isinstance(config, StableCascadeConfig) else dict(config)
    return StableCascadeConfig.from_dict({**base, **overrides})


def _random(build, seed: int, device, dtype):
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = build()
    model = randomize_(model, seed).eval()
    return model.to(dtype) if dtype is not None else model


def make_diffusers_stable_cascade(config="tiny_prior", seed: int = 0, device=None, dtype=None, **overrides):
    """diffusers StableCascadeUNet (tiny prior by default), every tensor random, eval mode."""
    from diffusers import StableCascadeUNet

    cfg = sc_config(config, **overrides).to_dict()
    return _random(lambda: StableCascadeUNet(**cfg), seed, device, dtype)


def make_clip_text_with_projection(seed: int = 0, device=None, dtype=None, **cfg):
    """transformers CLIPTextModelWithProjection (tiny by default), every tensor random."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return _random(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**TINY_SC_TEXT, **cfg})), seed, device, dtype)


def make_clip_vision_with_projection(seed: int = 0, device=None, dtype=None, **cfg):
    """transformers CLIPVisionModelWithProjection (tiny by default), every tensor random."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return _random(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_SC_VISION, **cfg})), seed, device,
                   dtype)
