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
    randomize_(module, seed)       -> the module, every tensor redrawn
    relative_error(a, b)           -> max|a - b| / max|b|
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# Parity tolerance (fp32, CPU): the same weights through the same math differ only by summation
# order (SDPA vs explicit softmax, fused vs unfused LayerNorm), about 1e-7 relative; 1e-5 leaves
# two orders of magnitude for that and still catches any real difference (a wrong key, a missed
# skip, a different eps), which shows up at >= 1e-3.
PARITY_RTOL = 1e-5

TINY_PRIOR = dict(c_in=16, c=64, c_cond=48, c_r=64, depth=2, nhead=4, dropout=0.1)
TINY_DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32, 48], nhead=[-1, 2, 3],
                    blocks=[1, 1, 2], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
                    effnet_embd=16, clip_embd=40, kernel_size=3, dropout=0.1)
TINY_VQGAN = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2,
                  embed_dim=32, latent_channels=4, num_vq_embeddings=64, scale_factor=0.3764)
TINY_CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                      pad_token_id=0, bos_token_id=49406, eos_token_id=49407, projection_dim=32)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter and floating buffer: weights ~ N(0, 1/fan_in) (keeps activations O(1)
    through depth), 1-d tensors ~ 0.3 * N(0, 1), BatchNorm running_var ~ U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.dim() >= 2 and not name.endswith(("gamma", "beta")):
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return module


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_diffusers_prior(seed: int = 0, **cfg):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    torch.manual_seed(seed)
    model = randomize_(WuerstchenPrior(**{**TINY_PRIOR, **cfg}), seed).eval()
    # Output = (x - a) / (|1 - b| + 1e-5): keep b well away from 1 so that the division does not
    # amplify rounding differences into a flaky comparison (b is still random and non-zero).
    with torch.no_grad():
        model.out[1].weight.mul_(0.1)
        model.out[1].bias.mul_(0.1)
    return model


def make_diffusers_decoder(seed: int = 0, **cfg):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    torch.manual_seed(seed)
    return randomize_(WuerstchenDiffNeXt(**{**TINY_DECODER, **cfg}), seed).eval()


def make_diffusers_vqgan(seed: int = 0, **cfg):
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    torch.manual_seed(seed)
    return randomize_(PaellaVQModel(**{**TINY_VQGAN, **cfg}), seed).eval()


def make_clip_text_model(seed: int = 0, **cfg):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP_TEXT, **cfg}))
    return randomize_(model, seed).eval()


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
