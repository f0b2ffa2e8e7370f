"""The tolerance rule for every kernel test, in one place (flash-attention's rule).

A fused kernel's error against an exact (float64) reference may be at most FACTOR times the error
PyTorch itself makes computing the same reference in the kernel's dtype, plus a floor per dtype
for values that round to zero error by luck. So a kernel is held to the standard of the eager code
it replaces, whatever the dtype, without a hand-tuned number per test.
"""
from __future__ import annotations

import math

import torch

# Twice PyTorch's own error: room for a different (equally valid) summation order, no more.
FACTOR = 2.0

# Floor per dtype: one unit in the last place (ulp) at the reference's largest magnitude, at least ulp(1).
# PyTorch's error can be zero by luck where ours is one rounding away; for O(1) outputs of normalised ops
# that is ulp(1), for a gradient summed to ~25 over many pixels it is ulp(16) -- no result in the dtype can
# be held closer than one rounding of its own magnitude.
FLOOR = {
    torch.float32: 2.0 ** -23,
    torch.float16: 2.0 ** -10,
    torch.bfloat16: 2.0 ** -7,
}


def max_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    return (a.detach().double().cpu() - exact.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """`out` (ours) and `eager` (PyTorch in the same dtype) both against `exact` (float64)."""
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != {eager.dtype}"
    ours, theirs = max_error(out, exact), max_error(eager, exact)
    floor = floor_for(exact, out.dtype)
    bound = FACTOR * theirs + floor
    assert ours <= bound, (
        f"{what}: max error {ours:.3e} against the float64 reference exceeds {bound:.3e} "
        f"(= {FACTOR} x PyTorch's own {out.dtype} error {theirs:.3e} + floor {floor:.1e})"
    )


def floor_for(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """FLOOR[dtype] scaled to the binade of max|exact| (never below ulp(1))."""
    peak = exact.detach().abs().max().item() if exact.numel() else 0.0
    scale = 2.0 ** math.floor(math.log2(peak)) if peak > 1.0 else 1.0
    return FLOOR[dtype] * scale
