"""Random-weight Würstchen models and pipelines, built in memory, for tests and benchmarks.

Weights need not be trained for parity or timing; they must be *random everywhere* (a parity test
against zero-initialized GRN gammas or output heads proves nothing, and zeros can time faster than
real data). Sizes:

    tiny   a few thousand parameters: the parity tests (tests/_model_factories.py re-exports these)
    small  CPU benchmarks: released layouts, narrow widths, so the CPU suite runs in minutes
    v2     the released sizes (Stage C ~1.0B, Stage B ~1.06B, Stage A 18M, CLIP bigG / H text towers)

    randomize_(module, seed)                       every parameter and floating buffer redrawn, on its device
    make_diffusers_prior / _decoder / _vqgan(seed, device=, dtype=, **cfg)
    make_clip_text_model(seed, device=, dtype=, **cfg)  transformers CLIPTextModel
    ours_from_diffusers(model)                     our StageC / StageB / StageA / CLIPTextEncoder, same weights
    build_pipelines(size, device, dtype, ...)      (diffusers WuerstchenCombinedPipeline, our WuerstchenPipeline)
                                                   over the same random weights
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "TINY_PRIOR", "TINY_DECODER", "TINY_VQGAN", "TINY_CLIP_TEXT", "SIZES",
    "randomize_", "make_diffusers_prior", "make_diffusers_decoder", "make_diffusers_vqgan", "make_clip_text_model",
    "scale_output_heads_", "ours_from_diffusers", "build_pipelines",
]

TINY_PRIOR = dict(c_in=16, c=64, c_cond=48, c_r=64, depth=2, nhead=4, dropout=0.1)
TINY_DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32, 48], nhead=[-1, 2, 3],
                    blocks=[1, 1, 2], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
                    effnet_embd=16, clip_embd=40, kernel_size=3, dropout=0.1)
TINY_VQGAN = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2,
                  embed_dim=32, latent_channels=4, num_vq_embeddings=64, scale_factor=0.3764)
TINY_CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                      pad_token_id=0, bos_token_id=49406, eos_token_id=49407, projection_dim=32)

# Per size: prior, decoder, vqgan configs (diffusers keyword arguments) and the two text towers
# (prior text width = prior c_cond, decoder text width = decoder clip_embd).
SIZES = {
    "tiny": dict(prior=TINY_PRIOR, decoder=TINY_DECODER, vqgan=TINY_VQGAN,
                 prior_text=dict(hidden_size=48), decoder_text=dict(hidden_size=40)),
    # The released layouts (4 decoder levels, CT/CTA, effnet injection, 24x24 Stage C latents)
    # at widths a 2-core CPU steps through in well under a second.
    "small": dict(
        prior=dict(c_in=16, c=256, c_cond=128, c_r=64, depth=4, nhead=4, dropout=0.0),
        decoder=dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=64, c_hidden=[32, 64, 128, 128],
                     nhead=[-1, 2, 4, 4], blocks=[1, 1, 2, 1], level_config=["CT", "CTA", "CTA", "CTA"],
                     inject_effnet=[False, True, True, True], effnet_embd=16, clip_embd=64, kernel_size=3,
                     dropout=0.0),
        vqgan=dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2,
                   embed_dim=64, latent_channels=4, num_vq_embeddings=256, scale_factor=0.3764),
        prior_text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4),
        decoder_text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)),
    # Released v2: diffusers' defaults for the three stages; CLIP ViT-bigG-14 (prior) and ViT-H-14 (decoder).
    "v2": dict(
        prior=dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.0),
        decoder=dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640, 1280, 1280],
                     nhead=[-1, 10, 20, 20], blocks=[4, 4, 14, 4], level_config=["CT", "CTA", "CTA", "CTA"],
                     inject_effnet=[False, True, True, True], effnet_embd=16, clip_embd=1024, kernel_size=3,
                     dropout=0.0),
        vqgan=dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=12,
                   embed_dim=384, latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764),
        prior_text=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
        decoder_text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)),
}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter and floating buffer: weights ~ N(0, 1/fan_in) (keeps activations O(1)
    through depth), 1-d tensors ~ 0.3 * N(0, 1), BatchNorm running_var ~ U(0.5, 1.5).

    Draws happen in float32 on each tensor's device, from one generator per device seeded with
    `seed`; on the CPU the values are the same as they always were (the parity tests' weights)."""
    gens: dict = {}

    def gen(device):
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(seed)
        return gens[device]

    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        g = gen(t.device)
        kw = dict(generator=g, device=t.device, dtype=torch.float32)
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, **kw) + 0.5)
        elif t.dim() >= 2 and not name.endswith(("gamma", "beta")):
            t.copy_(torch.randn(t.shape, **kw) / math.sqrt(t[0].numel()))
        else:
            t.copy_(torch.randn(t.shape, **kw) * 0.3)
    return module


def _build(cls, defaults: dict, cfg: dict, seed: int, device, dtype):
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = cls(**{**defaults, **cfg})
    model = randomize_(model, seed).eval()
    return model.to(dtype) if dtype is not None else model


def make_diffusers_prior(seed: int = 0, device=None, dtype=None, **cfg):
    """diffusers WuerstchenPrior (tiny by default), every tensor random; output head scaled by 0.1 so
    that b in (x - a) / (|1 - b| + 1e-5) stays away from 1 (b is still random and non-zero)."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    model = _build(WuerstchenPrior, TINY_PRIOR, cfg, seed, device, None)
    with torch.no_grad():
        model.out[1].weight.mul_(0.1)
        model.out[1].bias.mul_(0.1)
    return model.to(dtype) if dtype is not None else model


def make_diffusers_decoder(seed: int = 0, device=None, dtype=None, **cfg):
    """diffusers WuerstchenDiffNeXt (tiny by default), every tensor random."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    return _build(WuerstchenDiffNeXt, TINY_DECODER, cfg, seed, device, dtype)


def make_diffusers_vqgan(seed: int = 0, device=None, dtype=None, **cfg):
    """diffusers PaellaVQModel (tiny by default), every tensor random."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    return _build(PaellaVQModel, TINY_VQGAN, cfg, seed, device, dtype)


def make_clip_text_model(seed: int = 0, device=None, dtype=None, **cfg):
    """transformers CLIPTextModel (tiny by default), every tensor random."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP_TEXT, **cfg}))
    model = randomize_(model, seed).eval()
    return model.to(dtype) if dtype is not None else model


@torch.no_grad()
def scale_output_heads_(decoder) -> None:
    """Stage B returns (x - a) / b with b = sigmoid(.)·(1 − 2e-3) + 1e-3: fully random heads put b near
    1e-3 somewhere, turning rounding noise into large differences over a chain. Scaled by 0.1, b stays
    near 0.5; every parameter is still random."""
    decoder.clf[1].weight.mul_(0.1)
    decoder.clf[1].bias.mul_(0.1)


def ours_from_diffusers(model: nn.Module) -> nn.Module:
    """Our module with the same weights (and device, dtype) as a diffusers / transformers model."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    from ..models import StageA, StageAConfig, StageB, StageBConfig, StageC, StageCConfig
    from ..models.text import CLIPTextEncoder, _config_from_transformers, from_transformers_layout

    p = next(model.parameters())
    if isinstance(model, WuerstchenPrior):
        ours, sd = StageC(StageCConfig.from_dict(dict(model.config))), model.state_dict()
    elif isinstance(model, WuerstchenDiffNeXt):
        ours, sd = StageB(StageBConfig.from_dict(dict(model.config))), model.state_dict()
    elif isinstance(model, PaellaVQModel):
        ours, sd = StageA(StageAConfig.from_dict(dict(model.config))), model.state_dict()
    else:  # transformers CLIPTextModel
        ours = CLIPTextEncoder(_config_from_transformers(model.config.to_dict()))
        sd = from_transformers_layout(model.state_dict())
    ours = ours.to(device=p.device, dtype=p.dtype)
    ours.load_state_dict(sd)
    return ours.eval()


def build_pipelines(size: str = "tiny", device="cpu", dtype=torch.float32, *, seed: int = 0,
                    compile: bool = False, cuda_graphs: bool = False, diffusers_compile: bool = False):
    """(diffusers WuerstchenCombinedPipeline, our WuerstchenPipeline) over the same random weights.

    `diffusers_compile=True` applies diffusers' documented recipe for Würstchen:
    `torch.compile(mode="reduce-overhead", fullgraph=True)` on the prior and the decoder.
    `compile` / `cuda_graphs` are our pipeline's options. Tokenizers are built offline from
    open_clip's BPE vocabulary (transformers CLIPTokenizer, pad '!')."""
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline

    from ..models.text import build_transformers_clip_tokenizer
    from ..pipeline import load_pipeline

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    s = SIZES[size]
    kw = dict(device=device, dtype=dtype)
    prior = make_diffusers_prior(seed + 2, **kw, **s["prior"])
    decoder = make_diffusers_decoder(seed + 4, device=device, **s["decoder"])
    scale_output_heads_(decoder)
    decoder = decoder.to(dtype)
    vqgan = make_diffusers_vqgan(seed + 5, **kw, **s["vqgan"])
    prior_text = make_clip_text_model(seed + 1, **kw, **s["prior_text"])
    decoder_text = make_clip_text_model(seed + 3, **kw, **s["decoder_text"])
    tokenizer = build_transformers_clip_tokenizer()

    ours = load_pipeline(prior=ours_from_diffusers(prior), decoder=ours_from_diffusers(decoder),
                         vqgan=ours_from_diffusers(vqgan), prior_text_encoder=ours_from_diffusers(prior_text),
                         prior_tokenizer=tokenizer, decoder_text_encoder=ours_from_diffusers(decoder_text),
                         decoder_tokenizer=tokenizer, device=device, dtype=dtype, compile=compile,
                         cuda_graphs=cuda_graphs)
    ref = WuerstchenCombinedPipeline(
        tokenizer=tokenizer, text_encoder=decoder_text, decoder=decoder, scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan, prior_tokenizer=tokenizer, prior_text_encoder=prior_text, prior_prior=prior,
        prior_scheduler=DDPMWuerstchenScheduler())
    if diffusers_compile:
        # diffusers' docs assign `pipe.prior_prior = torch.compile(...)`, but the combined pipeline
        # runs its sub-pipelines' own references: compile the modules that actually run.
        ref.prior_pipe.prior = torch.compile(prior, mode="reduce-overhead", fullgraph=True)
        ref.decoder_pipe.decoder = torch.compile(decoder, mode="reduce-overhead", fullgraph=True)
    ref.set_progress_bar_config(disable=True)
    return ref, ours
