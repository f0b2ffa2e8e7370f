"""The two ends every loader shares: a model built on the meta device that adopts a checkpoint's tensors
(no second copy of a multi-GB model), and our own format written next to it.

Our format: `folder/wuerstchen_fast.json` ({"format", "version", "stage", "config"}) + `folder/model.safetensors`
(the same JSON in its metadata, so the file alone loads too).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint_io import FORMAT_TAG, OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, save_safetensors

__all__ = ["build_with_state", "save_own_format"]


def build_with_state(model_cls, config, sd: dict, *, source: str, device=None, dtype=None) -> nn.Module:
    """`model_cls(config)` holding `sd` (cast to `dtype`, strictly checked, on `device`), in eval mode."""
    from .loading import load_model_state

    with torch.device("meta"):
        model = model_cls(config)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    load_model_state(model, sd, source=source, assign=True)
    if device is not None:
        model.to(device)
    return model.eval()


def save_own_format(model: nn.Module, folder, stage: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_TAG, "version": 1, "stage": stage, "config": model.config.to_dict()}
    (folder / OWN_CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    save_safetensors(model.state_dict(), folder / OWN_WEIGHTS_NAME, metadata={FORMAT_TAG: json.dumps(meta)})
    return folder
