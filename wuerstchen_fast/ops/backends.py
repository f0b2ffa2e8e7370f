"""What each backend needs, as reasons: shared by every op's availability and input checks.

Each function returns a list of human-readable reasons why a backend cannot run (empty = it can).
Kept to cheap attribute reads (device, dtype, dim) so dispatch costs little and traces cleanly
under torch.compile.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .._extension import extension_reasons, has_cuda_kernels

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Facts of this process, read once at import: dispatch then reads plain globals, which is cheap and
# which torch.compile traces without graph breaks (it cannot trace into the extension's pybind
# functions or importlib). TRITON_INTERPRET only matters before Triton is imported anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_MISSING = [] if importlib.util.find_spec("triton") is not None else ["triton is not installed"]
_EXT_REASONS = extension_reasons()
_CUDA_KERNELS = has_cuda_kernels()
_GPU = torch.cuda.is_available()


def triton_interpret() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported) runs kernels on CPU."""
    return _INTERPRET


def triton_available() -> list:
    if _TRITON_MISSING:
        return list(_TRITON_MISSING)
    if not _GPU and not _INTERPRET:
        return ["no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"]
    return []


def cpu_ext_available() -> list:
    return list(_EXT_REASONS)


def cuda_ext_available() -> list:
    if _EXT_REASONS:
        return list(_EXT_REASONS)
    if not _CUDA_KERNELS:
        return ["wuerstchen_fast._C was built without CUDA kernels"]
    if not _GPU:
        return ["CUDA kernels are built but no CUDA GPU is available"]
    return []


def on_device(device_type: str, *tensors: torch.Tensor) -> list:
    bad = {t.device.type for t in tensors if t.device.type != device_type}
    return [f"needs {device_type} tensors, got {', '.join(sorted(bad))}"] if bad else []


def for_triton(*tensors: torch.Tensor) -> list:
    """Triton runs CUDA tensors, and CPU tensors only under the interpreter."""
    if triton_interpret():
        return []
    return on_device("cuda", *tensors)


def float_dtype(*tensors: torch.Tensor) -> list:
    bad = {str(t.dtype) for t in tensors if t.dtype not in FLOAT_DTYPES}
    return [f"supports float32, bfloat16 and float16, got {', '.join(sorted(bad))}"] if bad else []


def ndim(n: int, *tensors: torch.Tensor) -> list:
    bad = [t.dim() for t in tensors if t.dim() != n]
    return [f"needs {n}-d tensors, got {bad[0]}-d"] if bad else []
