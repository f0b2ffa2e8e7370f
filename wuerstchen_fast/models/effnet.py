"""The semantic compressor (spec §5): EfficientNetV2-S features + 1x1 conv + BatchNorm to 16 channels.

Keys follow the original `EfficientNetEncoder`: `backbone.*` (torchvision `efficientnet_v2_s().features`
layout) and `mapper.0.weight`, `mapper.1.*`, so the released `effnet_state_dict` loads unchanged, and so does
Stable Cascade's `effnet_encoder.safetensors` (its BatchNorm without affine parameters: `affine=False`).
The backbone is built without downloading weights. Input: ImageNet-normalized images (see `preprocess`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import EffNetConfig

__all__ = ["EfficientNetEncoder", "preprocess_for_effnet", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    def __init__(self, config: EffNetConfig | None = None):
        super().__init__()
        from torchvision.models import efficientnet_v2_s

        self.config = cfg = config if config is not None else EffNetConfig.v2()
        if cfg.backbone != "efficientnet_v2_s":
            raise ValueError(f"EfficientNetEncoder: only the efficientnet_v2_s backbone is supported, got {cfg.backbone!r}")
        self.backbone = efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(nn.Conv2d(1280, cfg.c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(cfg.c_latent, affine=cfg.affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, c_latent, H/32, W/32)."""
        return self.mapper(self.backbone(x))


def preprocess_for_effnet(images: torch.Tensor, size: int = 768) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> resized (shorter side `size`, bilinear, antialiased), center-cropped
    to size x size, ImageNet-normalized."""
    h, w = images.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std
