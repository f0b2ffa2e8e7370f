"""What a training run builds around the stage it trains: the stage itself (with the released code's
initialization), the frozen text encoder and tokenizer, the semantic compressor, the patch
discriminator, and per-block gradient checkpointing.

The semantic compressor is the released EfficientNetV2-S encoder (`kind="efficientnet_v2_s"`) or, for
small models, `TinyCompressor`: five stride-2 convolutions (/32, as the backbone) and the same
`mapper = [Conv2d(->c_latent, 1, bias=False), BatchNorm2d]` head. It is only needed in training
(the pipeline generates its latents with Stage C), so it is saved with the Stage B run
(`compressor/`) and read back by the Stage C run.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..models import (CLIPTextEncoder, EfficientNetEncoder, StageA, StageB, StageC, load_effnet, load_stage_a,
                      load_stage_b, load_stage_c, load_text_encoder, save_stage, save_text_encoder)
from ..models.blocks import AttnBlock, ResBlock, ResBlockStageB, TimestepBlock
from ..models.configs import EffNetConfig, StageAConfig, StageBConfig, StageCConfig
from ..models.effnet import IMAGENET_MEAN, IMAGENET_STD
from ..models.stage_a import MixingResidualBlock
from ..models.text import TextEncoderConfig

__all__ = ["build_stage", "init_weights", "build_text", "TinyCompressor", "build_compressor", "save_compressor",
           "load_compressor", "compressor_input", "PatchDiscriminator", "enable_grad_checkpointing", "checkpoint_blocks",
           "frozen"]

_CFG = {"stage_a": StageAConfig, "stage_b": StageBConfig, "stage_c": StageCConfig}
_CLS = {"stage_a": StageA, "stage_b": StageB, "stage_c": StageC}
_LOAD = {"stage_a": load_stage_a, "stage_b": load_stage_b, "stage_c": load_stage_c}


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


# --------------------------------------------------------------------------------------------- stages
def stage_config(stage: str, preset: str, overrides: dict, *, text_width: int | None = None, c_latent: int = 16):
    cls = _CFG[stage]
    if not hasattr(cls, preset):
        raise ValueError(f"model.preset {preset!r} unknown for {stage}; use 'tiny', 'v1' or 'v2'")
    d = {**getattr(cls, preset)().to_dict(), **overrides}
    # Widths tied to other components follow them unless set explicitly.
    if stage == "stage_c":
        if "c_cond" not in overrides and text_width:
            d["c_cond"] = text_width
        if "c_in" not in overrides:
            d["c_in"] = c_latent
    elif stage == "stage_b":
        if "clip_embd" not in overrides and text_width:
            d["clip_embd"] = text_width
        if "effnet_embd" not in overrides:
            d["effnet_embd"] = c_latent
    return cls.from_dict(d, strict=True)


@torch.no_grad()
def init_weights(model: nn.Module) -> nn.Module:
    """The released code's initialization: xavier-uniform convs and linears with zero biases, N(0, 0.02)
    text mappers, residual branches scaled by sqrt(1 / depth), TimestepBlock mappers and the output head at
    zero (so an untrained Stage C predicts ε̂ = x and a new block starts as the identity)."""
    if isinstance(model, StageA):
        return model  # PyTorch defaults, as the released VQGAN
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if isinstance(model, StageC):
        mappers = [model.cond_mapper[0], model.cond_mapper[2]]
        depth = model.config.depth
        head = model.out[1]
    else:
        mappers = [model.clip_mapper]
        depth = sum(model.config.blocks)
        head = model.clf[1]
    for lin in mappers:
        nn.init.normal_(lin.weight, std=0.02)
    for m in model.modules():
        if isinstance(m, (ResBlock, ResBlockStageB)):
            m.channelwise[-1].weight.mul_(math.sqrt(1 / depth))
        elif isinstance(m, TimestepBlock):
            nn.init.zeros_(m.mapper.weight)
    nn.init.zeros_(head.weight)
    return model


def build_stage(stage: str, section, *, text_width: int | None, c_latent: int, seed: int) -> nn.Module:
    """The stage to train: from `section.init` weights if given, else freshly initialized from `seed`."""
    if section.init:
        model = _LOAD[stage](section.init, **section.config)
        return model.float().train()
    cfg = stage_config(stage, section.preset, section.config, text_width=text_width, c_latent=c_latent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = init_weights(_CLS[stage](cfg))
    return model.train()


# ------------------------------------------------------------------------------------------ text side
_TOKENIZERS: dict = {}


def build_text(section, out_dir: Path | None):
    """-> (tokenizer (transformers CLIPTokenizer), frozen CLIPTextEncoder). A random-init encoder is drawn
    from `section.seed` (the same for every stage trained with that seed). With `out_dir`, both are saved
    there (`text_encoder/`, `tokenizer/`) for the pipeline."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from ..models.text import build_transformers_clip_tokenizer

    if section.tokenizer:
        tok = HFCLIPTokenizer.from_pretrained(str(section.tokenizer))
    else:  # building it from open_clip's BPE file takes seconds: once per process
        if section.context_length not in _TOKENIZERS:
            _TOKENIZERS[section.context_length] = build_transformers_clip_tokenizer(
                None, model_max_length=section.context_length)
        tok = _TOKENIZERS[section.context_length]
    if section.path:
        enc = load_text_encoder(section.path)
    else:
        d = {**getattr(TextEncoderConfig, section.preset)().to_dict(), "context_length": section.context_length,
             **section.config}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            enc = CLIPTextEncoder(TextEncoderConfig.from_dict(d, strict=True))
    if out_dir is not None:
        save_text_encoder(enc, Path(out_dir) / "text_encoder")
        tok.save_pretrained(str(Path(out_dir) / "tokenizer"))
    return tok, frozen(enc.float())


# ---------------------------------------------------------------------------------- semantic compressor
class TinyCompressor(nn.Module):
    """A small semantic compressor: stride-2 3x3 convs with GELU (/2 each; five make /32), then
    `mapper = [Conv2d(-> c_latent, 1, bias=False), BatchNorm2d(c_latent)]` as in the released encoder."""

    def __init__(self, c_latent: int = 16, widths=(16, 32, 64, 96, 128)):
        super().__init__()
        self.config = {"kind": "tiny", "c_latent": c_latent, "widths": list(widths)}
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GELU()]
            c = w
        self.backbone = nn.Sequential(*layers)
        self.mapper = nn.Sequential(nn.Conv2d(c, c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


def compressor_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [0, 1] -> the compressor's input: resized to size x size, ImageNet-normalized."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - mean) / std


def build_compressor(section) -> nn.Module:
    if section.path:
        return load_compressor(section.path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)
        if section.kind == "tiny":
            return TinyCompressor(section.c_latent, section.widths)
        if section.kind == "efficientnet_v2_s":
            return EfficientNetEncoder(EffNetConfig(c_latent=section.c_latent))
    raise ValueError(f"compressor.kind must be 'tiny' or 'efficientnet_v2_s', got {section.kind!r}")


def save_compressor(model: nn.Module, folder) -> Path:
    """EfficientNetEncoder: `save_stage` (loads with `load_effnet`); TinyCompressor: compressor.json + model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if isinstance(model, EfficientNetEncoder):
        return save_stage(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compressor.json").write_text(json.dumps(model.config, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def load_compressor(folder) -> nn.Module:
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "compressor.json").is_file():
        cfg = json.loads((folder / "compressor.json").read_text())
        model = TinyCompressor(cfg["c_latent"], cfg["widths"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model
    if folder.exists():
        return load_effnet(folder).float()
    raise FileNotFoundError(f"compressor {str(folder)!r} does not exist; train Stage B first (it writes "
                            f"<output_dir>/compressor) or set compressor.path=null for a random one")


# ------------------------------------------------------------------------------------ discriminator
class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (hinge loss) for Stage A: strided 4x4 convs, a logit per patch."""

    def __init__(self, c: int = 32, layers: int = 3):
        super().__init__()
        mods, ch = [nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2)], c
        for _ in range(layers - 1):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


# ---------------------------------------------------------------------------- gradient checkpointing
_CHECKPOINTED = (ResBlock, ResBlockStageB, AttnBlock, MixingResidualBlock)


def checkpoint_blocks(model: nn.Module) -> list:
    """The modules that are checkpointed / sharded one by one (every residual and attention block)."""
    return [m for m in model.modules() if isinstance(m, _CHECKPOINTED)]


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Recompute every block's activations in backward. Implemented by replacing the blocks' bound
    `forward` (no wrapper module), so parameter names, state dicts and checkpoints are unchanged."""
    n = 0
    for block in checkpoint_blocks(model):
        if "forward" in block.__dict__:
            continue
        orig = block.forward

        @functools.wraps(orig)
        def fwd(*args, _orig=orig, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        block.forward = fwd
        n += 1
    return n
