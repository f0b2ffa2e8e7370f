"""Builders of small random-weight reference models (diffusers, transformers, torchvision) for tests.

Every builder randomizes *every* parameter and buffer (also the zero-initialized GRN gamma/beta,
the zero-initialized output projections and TimestepBlock mappers, and BatchNorm statistics),
because a parity test against zeros proves nothing. Names here are stable: other test files import
them.

    make_diffusers_prior(**cfg)    -> diffusers WuerstchenPrior, eval mode
    make_diffusers_decoder(**cfg)  -> diffusers WuerstchenDiffNeXt, eval mode
    make_diffusers_vqgan(**cfg)    -> diffusers PaellaVQModel, eval mode
    make_clip_text_model(**cfg)    -> transformers CLIPTextModel, eval mode
    make_clip_tokenizer(folder)    -> transformers CLIPTokenizer built offline from open_clip's BPE vocab
    make_torchvision_effnet_encoder() -> (features, mapper) with random weights
    make_open_clip_model(**cfg)    -> open_clip CLIP (text + vision towers), every parameter ~ N(0, 0.1)
    randomize_(module, seed)       -> the module, every tensor redrawn
    relative_error(a, b)           -> max|a - b| / max|b|
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Parity tolerance (fp32, CPU): the same weights through the same math differ only by summation
# order (SDPA vs explicit softmax, fused vs unfused LayerNorm), about 1e-7 relative; 1e-5 leaves
# two orders of magnitude for that and still catches any real difference (a wrong key, a missed
# skip, a different eps), which shows up at >= 1e-3.
PARITY_RTOL = 1e-5

# The random builders live in the package so that bench/ can build the same models (at v2 size too).
from wuerstchen_fast.testing.random_models import (TINY_CLIP_TEXT, TINY_DECODER, TINY_PRIOR,  # noqa: E402,F401
                                                   TINY_VQGAN, make_clip_text_model, make_diffusers_decoder,
                                                   make_diffusers_prior, make_diffusers_vqgan, randomize_)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_clip_tokenizer(folder, model_max_length: int = 77):
    """A transformers CLIPTokenizer built offline from the BPE vocabulary open_clip ships, padding
    with id 0 ('!') like the laion tokenizers Würstchen uses; saved to `folder` too."""
    from wuerstchen_fast.models.text import build_transformers_clip_tokenizer

    return build_transformers_clip_tokenizer(folder, model_max_length=model_max_length)


def make_torchvision_effnet_encoder(seed: int = 0, c_latent: int = 16):
    """(torchvision efficientnet_v2_s().features, mapper Sequential) with random weights."""
    from torchvision.models import efficientnet_v2_s

    torch.manual_seed(seed)
    features = randomize_(efficientnet_v2_s(weights=None).features, seed).eval()
    mapper = randomize_(nn.Sequential(nn.Conv2d(1280, c_latent, kernel_size=1, bias=False),
                                      nn.BatchNorm2d(c_latent)), seed + 1).eval()
    return features, mapper


def make_open_clip_model(seed: int = 0, **cfg):
    """An open_clip CLIP model (`open_clip.model.CLIP(**cfg)`), every parameter ~ N(0, 0.1), eval mode."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model
