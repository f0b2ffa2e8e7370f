"""Exponential moving average of the trainable parameters (buffers are taken from the live model when
saving). Works on plain tensors and on FSDP2's sharded DTensors alike (each rank averages its shard)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, module: nn.Module, decay: float, start: int = 0, every: int = 1):
        self.decay, self.start, self.every = decay, start, every
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for n, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """`step` counts finished optimizer steps. Before `start` the average just copies the weights."""
        if step % self.every:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if step <= self.start:
            torch._foreach_copy_(self.shadow, [p.detach() for p in params])
        else:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - self.decay)

    def named(self):
        return dict(zip(self.names, self.shadow))
