"""Shared set-up of the training tests: tiny configs on tiny synthetic images, one thread per process
(on a 2-core machine several OpenMP threads make small ops 1000x slower when the machine is busy)."""
from __future__ import annotations

import torch

from wuerstchen_fast.models import StageA, StageAConfig, save_stage
from wuerstchen_fast.models.text import build_transformers_clip_tokenizer

CONTEXT = 16


def tiny_overrides(stage: str, out, **extra) -> list:
    ov = [f"stage={stage}", f"output_dir={out}", "train.batch_size=4", "train.mixed_precision=fp32",
          "train.threads=1", "log.progress=false", "log.every=1", "log.checkpoint_every=0", "data.resolution=32",
          "data.length=16", "compressor.image_size=64", f"text_encoder.context_length={CONTEXT}",
          "optim.lr=2e-3", "optim.warmup_steps=3", "optim.ema_decay=0.9", "train.backend=torch"]
    ov += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return ov


def make_tokenizer(folder):
    build_transformers_clip_tokenizer(folder, model_max_length=CONTEXT)
    return folder


def make_stage_a(folder):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return save_stage(StageA(StageAConfig.tiny()), folder)


def first_last(xs, k=8):
    return sum(xs[:k]) / k, sum(xs[-k:]) / k
