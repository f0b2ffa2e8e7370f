"""Loading the compiled extension `wuerstchen_fast._C`, once, with one clear warning if it cannot be used.

The extension registers the `wuerstchen_fast_C::*` ops (CPU kernels always, CUDA kernels when it
was built with a CUDA toolkit). It is optional: without it the `torch` and `triton` backends work.
It is unusable when it was never built (a plain source checkout), or when it was built against
another torch (C++ ABI: the import fails with undefined symbols, or the recorded version differs).
"""
from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["extension", "extension_reasons", "build_info", "has_cuda_kernels"]


@functools.lru_cache(maxsize=None)
def _load():
    """(module or None, reason or None). Warns once when the extension exists but cannot be used."""
    try:
        from . import _C  # noqa: F401  (registers the ops as a side effect)
    except ImportError as e:  # not built, or built against another torch
        missing = isinstance(e, ModuleNotFoundError) and e.name == f"{__package__}._C"
        if missing:
            reason = "the compiled extension wuerstchen_fast._C is not built (pip install --no-build-isolation .)"
        else:
            reason = f"the compiled extension wuerstchen_fast._C failed to load ({e}); rebuild it for this torch"
        warnings.warn(f"wuerstchen_fast: {reason}. The torch and triton backends still work.", stacklevel=3)
        return None, reason
    built = _C.build_info()
    if built["torch_version"] != torch.__version__:
        reason = (
            f"wuerstchen_fast._C was built for torch {built['torch_version']}, this is torch {torch.__version__}; "
            "rebuild it (pip install --no-build-isolation --force-reinstall --no-deps .)"
        )
        warnings.warn(f"wuerstchen_fast: {reason}. The torch and triton backends still work.", stacklevel=3)
        return None, reason
    return _C, None


def extension():
    """The loaded extension module, or None."""
    return _load()[0]


def extension_reasons() -> list:
    """Why the extension's backends cannot run at all (empty when it loaded)."""
    reason = _load()[1]
    return [reason] if reason else []


def build_info() -> dict | None:
    """What `_C` was built with (torch version, CUDA version and archs, git revision), or None."""
    ext = extension()
    return dict(ext.build_info()) if ext is not None else None


def has_cuda_kernels() -> bool:
    info = build_info()
    return bool(info and info["with_cuda"])
