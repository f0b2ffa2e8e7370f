"""The output-layout rule every 2-d (B, C, H, W) op follows, in one place.

Output keeps the input's layout when it is contiguous or channels-last, else it is contiguous.
The C++/CUDA kernels (csrc/layout.h), the Triton launchers and the fake (meta) implementations all
follow it, so `torch.compile` and opcheck see the strides the kernels really produce.
"""
from __future__ import annotations

import torch


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_out_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=out_memory_format(x))
