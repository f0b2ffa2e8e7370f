"""Store-side rounding shared by the Triton kernels: float32 -> bfloat16 to nearest even, everywhere.

On a GPU `x.to(tl.bfloat16)` rounds to nearest even (cvt.rn). Triton's CPU interpreter (3.x) instead
truncates the float32 bits, an error of up to one bf16 ulp that the GPU never makes, and that the
tolerance rule (2x PyTorch's own error) rightly rejects. Launchers pass `RNE=interpreting and
bfloat16 output`; the kernel then rounds the bits itself, so the interpreter's result is what the
GPU computes. Compiled for a GPU, RNE is False and this is the plain cast.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["to_out", "rne_flag"]


@triton.jit
def to_out(y, dtype: tl.constexpr, RNE: tl.constexpr):
    """float32 `y` cast to `dtype` for a store, rounded to nearest even."""
    if RNE:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        r = bits.to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, r)  # NaN stays NaN
    return y.to(dtype)


def rne_flag(out: torch.Tensor) -> bool:
    """RNE for a kernel writing `out`: only when interpreting and the output is bfloat16."""
    return out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
