"""The CLIP ViT-L/14 image tower with projection (Stable Cascade's image variation), and its preprocessing.

`CLIPVisionEncoder(pixel_values) -> image_embeds` equals transformers'
`CLIPVisionModelWithProjection(pixel_values).image_embeds`: patch conv (no bias), class token, learned
positions, `ln_pre`, the pre-LN transformer without a mask, `ln_post` on the class token, then the
projection. Parameter names are open_clip's `visual.` tower (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.N.*`, `ln_post`, `proj` as a (width, proj)
matrix), so open_clip checkpoints load directly; transformers folders (`CLIPVisionModelWithProjection`,
or a full `CLIPModel`) are converted on load.

`CLIPImagePreprocessor` is transformers' `CLIPImageProcessor` (what diffusers' Stable Cascade prior runs
on `images=`): shortest edge resized bicubically with antialiasing on the uint8 image, center crop,
(x / 255 - mean) / std; the settings are read from a `preprocessor_config.json` when one is given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .assemble import build_with_state, save_own_format
from .checkpoint_io import (OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, CheckpointError, read_state_dict_file,
                            read_tensor_file)
from .clip_transformer import CLIPTransformer, check_activation, encoder_layers_from_transformers
from .configs import _ConfigMixin
from .weight_files import read_weights

__all__ = ["VisionEncoderConfig", "CLIPVisionEncoder", "CLIPVisionOutput", "CLIPImagePreprocessor",
           "load_image_encoder", "save_image_encoder", "vision_from_transformers_layout"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OWN_STAGE = "image_encoder"


@dataclass
class VisionEncoderConfig(_ConfigMixin):
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    act: str = "quick_gelu"  # OpenAI CLIP
    ln_eps: float = 1e-5
    projection_dim: int | None = 768

    @classmethod
    def vit_l_14(cls) -> "VisionEncoderConfig":
        """OpenAI CLIP ViT-L/14 (openai/clip-vit-large-patch14): 224 px, 24 layers of width 1024, 768-d embeds."""
        return cls()

    @classmethod
    def tiny(cls) -> "VisionEncoderConfig":
        return cls(image_size=28, patch_size=14, width=32, layers=2, heads=2, mlp_width=64, projection_dim=20)


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, 1 + grid², width), the last layer's output (no ln_post)
    pooled_output: torch.Tensor  # (B, width), ln_post of the class token
    image_embeds: torch.Tensor | None  # (B, projection_dim), pooled_output @ proj


class CLIPVisionEncoder(nn.Module):
    def __init__(self, config: VisionEncoderConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else VisionEncoderConfig.vit_l_14()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"VisionEncoderConfig: image_size={cfg.image_size} must be a multiple of "
                             f"patch_size={cfg.patch_size}")
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width).normal_(std=cfg.width ** -0.5))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, cfg.width).normal_(std=cfg.width ** -0.5))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.transformer = CLIPTransformer(cfg.width, cfg.heads, cfg.layers, cfg.mlp_width, cfg.act, cfg.ln_eps)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        if cfg.projection_dim is not None:
            self.proj = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim).normal_(std=cfg.width ** -0.5))

    def encode(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be (B, 3, {size}, {size}) (see CLIPImagePreprocessor), got "
                             f"{tuple(pixel_values.shape)}")
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x)
        pooled = self.ln_post(x[:, 0])
        proj = getattr(self, "proj", None)
        return CLIPVisionOutput(x, pooled, F.linear(pooled, proj.t().contiguous()) if proj is not None else None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, projection_dim) image_embeds (pooled_output without one)."""
        out = self.encode(pixel_values)
        return out.image_embeds if out.image_embeds is not None else out.pooled_output


# ------------------------------------------------------------------------------------- preprocessing
class CLIPImagePreprocessor:
    """PIL images / (3, H, W) uint8 or [0, 1] float tensors -> (B, 3, crop, crop) pixel_values."""

    def __init__(self, size: int = 224, crop_size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 do_resize: bool = True, do_center_crop: bool = True, do_normalize: bool = True,
                 rescale_factor: float = 1 / 255):
        self.size, self.crop_size, self.mean, self.std = size, crop_size, tuple(mean), tuple(std)
        self.do_resize, self.do_center_crop, self.do_normalize = do_resize, do_center_crop, do_normalize
        self.rescale_factor = rescale_factor

    @classmethod
    def from_folder(cls, folder) -> "CLIPImagePreprocessor":
        """From a `preprocessor_config.json` (a diffusers pipeline's `feature_extractor/`, or the file itself)."""
        path = Path(folder)
        path = path / "preprocessor_config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} does not exist: expected a CLIPImageProcessor preprocessor_config.json")
        c = json.loads(path.read_text())
        size, crop = c.get("size", 224), c.get("crop_size", 224)
        size = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size
        crop = crop.get("height", 224) if isinstance(crop, dict) else crop
        if c.get("resample", 3) != 3:
            raise CheckpointError(f"{str(path)!r}: resample={c['resample']} is not bicubic (3), the only one supported")
        return cls(size=int(size), crop_size=int(crop), mean=c.get("image_mean", OPENAI_CLIP_MEAN),
                   std=c.get("image_std", OPENAI_CLIP_STD), do_resize=c.get("do_resize", True),
                   do_center_crop=c.get("do_center_crop", True), do_normalize=c.get("do_normalize", True),
                   rescale_factor=c.get("rescale_factor", 1 / 255))

    @staticmethod
    def _to_uint8(image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ValueError(f"an image tensor must be (3, H, W) (or (1, H, W)), got {tuple(image.shape)}")
            if image.dtype != torch.uint8:
                image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
            return image.expand(3, -1, -1).cpu()
        import numpy as np

        if not hasattr(image, "convert"):
            raise TypeError(f"images must be PIL images or (3, H, W) tensors, got {type(image).__name__}")
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.size, int(self.size * long / short)
        size = (new_short, new_long) if h <= w else (new_long, new_short)
        try:  # torchvision (an open_clip dependency): bicubic + antialias on uint8, rounded back to uint8
            from torchvision.transforms.v2 import functional as tvF

            return tvF.resize(x, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        except ImportError:
            y = torch.nn.functional.interpolate(x[None].float(), size=size, mode="bicubic", antialias=True)
            return y[0].round().clamp(0, 255).to(torch.uint8)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crop_size
        h, w = x.shape[-2:]
        if c > h or c > w:  # pad like transformers (zeros, the extra pixel at the bottom/right)
            ph, pw = max(c - h, 0), max(c - w, 0)
            x = torch.nn.functional.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
            h, w = x.shape[-2:]
        top, left = int((h - c) / 2.0), int((w - c) / 2.0)
        return x[:, top:top + c, left:left + c]

    def __call__(self, images) -> torch.Tensor:
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for image in images:
            x = self._to_uint8(image)
            if self.do_resize:
                x = self._resize(x)
            if self.do_center_crop:
                x = self._crop(x)
            x = x.float()
            if self.do_normalize:  # transformers folds the rescale into mean and std
                mean = torch.tensor(self.mean).view(3, 1, 1) / self.rescale_factor
                std = torch.tensor(self.std).view(3, 1, 1) / self.rescale_factor
                x = (x - mean) / std
            else:
                x = x * self.rescale_factor
            out.append(x)
        return torch.stack(out)


# ------------------------------------------------------------------------------------------- loading
def vision_from_transformers_layout(sd: dict) -> dict:
    """transformers CLIPVisionModel(WithProjection) / CLIPModel vision keys -> open_clip `visual.` tower keys."""
    sd = {(k[len("vision_model."):] if k.startswith("vision_model.") else k): v for k, v in sd.items()}
    out = {"conv1.weight": sd.pop("embeddings.patch_embedding.weight"),
           "class_embedding": sd.pop("embeddings.class_embedding"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_pre.weight": sd.pop("pre_layrnorm.weight"), "ln_pre.bias": sd.pop("pre_layrnorm.bias"),
           "ln_post.weight": sd.pop("post_layernorm.weight"), "ln_post.bias": sd.pop("post_layernorm.bias")}
    sd.pop("embeddings.position_ids", None)
    if "visual_projection.weight" in sd:
        out["proj"] = sd.pop("visual_projection.weight").t().contiguous()
    encoder_layers_from_transformers(sd, out)
    out.update(sd)  # leftovers surface as unexpected keys
    return out


def _config_from_transformers(conf: dict, projection_dim: int | None) -> VisionEncoderConfig:
    if conf.get("model_type") == "clip" and "vision_config" in conf:
        conf = conf["vision_config"]
    return VisionEncoderConfig(image_size=conf.get("image_size", 224), patch_size=conf.get("patch_size", 32),
                               width=conf.get("hidden_size", 768), layers=conf.get("num_hidden_layers", 12),
                               heads=conf.get("num_attention_heads", 12), mlp_width=conf.get("intermediate_size", 3072),
                               act=check_activation(conf.get("hidden_act", "quick_gelu"), CheckpointError),
                               ln_eps=conf.get("layer_norm_eps", 1e-5), projection_dim=projection_dim)


def _infer_config(sd: dict, heads: int | None) -> VisionEncoderConfig:
    conv = sd.get("conv1.weight")
    if conv is None or "positional_embedding" not in sd:
        raise CheckpointError("this does not look like a CLIP image encoder checkpoint: no visual.conv1.weight / "
                              f"positional_embedding (keys e.g. {sorted(sd)[:8]})")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width
    return VisionEncoderConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                               heads=heads or max(width // 64, 1), mlp_width=mlp,
                               projection_dim=sd["proj"].shape[1] if "proj" in sd else None)


def load_image_encoder(path, *, device=None, dtype=None, config: VisionEncoderConfig | None = None,
                       heads: int | None = None, variant: str | None = None) -> CLIPVisionEncoder:
    """CLIP image encoder from a transformers folder (a diffusers pipeline's `image_encoder/` too), an open_clip
    checkpoint file (the `visual.` tower; config from shapes, heads = width/64 and quick_gelu unless `config=`),
    or our format (`save_image_encoder`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if path.is_dir() and (path / "image_encoder").is_dir() and not (path / "config.json").is_file():
        path = path / "image_encoder"
    if path.is_dir() and (path / OWN_CONFIG_NAME).is_file():
        meta = json.loads((path / OWN_CONFIG_NAME).read_text())
        if meta.get("stage") != OWN_STAGE:
            raise CheckpointError(f"{str(path)!r} holds a {meta.get('stage')} model, not an image encoder")
        sd, _ = read_tensor_file(path / OWN_WEIGHTS_NAME)
        cfg, source = config or VisionEncoderConfig.from_dict(meta["config"]), f"wuerstchen_fast folder {str(path)!r}"
    elif path.is_dir() and (path / "config.json").is_file():
        conf = json.loads((path / "config.json").read_text())
        raw = read_weights(path, "model", variant=variant)
        raw = {k: v for k, v in raw.items() if k.startswith(("vision_model.", "visual_projection."))}
        try:
            sd = vision_from_transformers_layout(raw)
        except KeyError as e:
            raise CheckpointError(f"{str(path)!r} is not a CLIP vision checkpoint: key {e} is missing") from e
        cfg = config or _config_from_transformers(conf, sd["proj"].shape[1] if "proj" in sd else None)
        source = f"transformers folder {str(path)!r}"
    elif path.is_dir():
        raise CheckpointError(f"{str(path)!r} is neither a transformers CLIP folder (config.json) nor a wuerstchen_fast "
                              f"folder ({OWN_CONFIG_NAME})")
    else:
        obj, meta = read_tensor_file(path)
        raw = obj if meta is not None else read_state_dict_file(path, ("state_dict",))
        sd = {k[len("visual."):]: v for k, v in raw.items() if k.startswith("visual.")} or raw
        cfg, source = config or _infer_config(sd, heads), f"open_clip checkpoint {str(path)!r}"
    return build_with_state(CLIPVisionEncoder, cfg, sd, source=source, device=device, dtype=dtype)


def save_image_encoder(model: CLIPVisionEncoder, folder) -> Path:
    """Our format: `folder/wuerstchen_fast.json` + `folder/model.safetensors`."""
    return save_own_format(model, folder, OWN_STAGE)
