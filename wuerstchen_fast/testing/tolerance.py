"""The tolerance rule for every kernel test, in one place (flash-attention's rule).

A fused kernel's error against an exact (float64) reference may be at most FACTOR times the error
PyTorch itself makes computing the same reference in the kernel's dtype, plus a floor per dtype
for values that round to zero error by luck. So a kernel is held to the standard of the eager code
it replaces, whatever the dtype, without a hand-tuned number per test.
"""
from __future__ import annotations

import torch

# Twice PyTorch's own error: room for a different (equally valid) summation order, no more.
FACTOR = 2.0

# Absolute floor per dtype, one unit in the last place at magnitude 1 (ulp(1)): outputs of
# normalised ops are O(1), and PyTorch's error can be exactly zero where ours is one rounding away.
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
    bound = FACTOR * theirs + FLOOR[out.dtype]
    assert ours <= bound, (
        f"{what}: max error {ours:.3e} against the float64 reference exceeds {bound:.3e} "
        f"(= {FACTOR} x PyTorch's own {out.dtype} error {theirs:.3e} + floor {FLOOR[out.dtype]:.1e})"
    )
