"""Image decoding and the resize/crop every data source shares.

`decode_image(bytes or path)` returns None for anything PIL cannot read (truncated, corrupted, not an
image), so a loader can skip it and count it; it never raises on bad data.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["decode_image", "to_tensor", "resize_center_crop", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def decode_image(src):
    """bytes / a path -> an RGB PIL image, or None when it cannot be decoded."""
    from PIL import Image

    try:
        f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(Path(src), "rb")
        with f, Image.open(f) as im:
            im.load()  # force the full decode here: a truncated file fails now, not later
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable": skip and count it
        return None


def to_tensor(img) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size): shorter side to `size` (bicubic, antialiased), centre crop."""
    h, w = img.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        img = img[:, top:top + size, left:left + size].clamp_(0, 1)
    return img.contiguous()
