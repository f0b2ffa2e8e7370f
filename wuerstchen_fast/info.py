"""`python -m wuerstchen_fast.info`: versions, what the compiled extension was built with, and the
table of ops x backends with availability (xformers.info-style)."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__
from ._extension import build_info, extension_reasons
from .ops import registry
from .ops.registry import BACKENDS


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _status(op: registry.OpSpec, name: str) -> str:
    impl = op.impls.get(name)
    if impl is None:
        return "-"
    reasons = impl.available()
    if not reasons:
        return "available"
    if name == "cuda" and not extension_reasons() and build_info()["with_cuda"]:
        return "built, unavailable: no GPU" if not torch.cuda.is_available() else "unavailable"
    return "unavailable"


def report() -> str:
    lines = [
        f"wuerstchen_fast {__version__}",
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton          {_version('triton')}",
        f"GPU             {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
    ]
    info = build_info()
    if info is None:
        lines.append(f"_C              not usable: {'; '.join(extension_reasons())}")
    else:
        cuda = f"CUDA {info['cuda_version']}, archs {info['cuda_archs']}" if info["with_cuda"] else "CPU only"
        lines.append(f"_C              built for torch {info['torch_version']}, {cuda}, git {info['git_revision']}")
    lines.append(f"backend request {registry.get_backend()} (WUERSTCHEN_FAST_BACKEND, set_backend, backend())")
    ops = registry.all_ops()
    width = max([len(o.name) for o in ops] + [2])
    cols = [max(len(b), 26) for b in BACKENDS]
    lines.append("")
    lines.append("op".ljust(width) + "  " + "  ".join(b.ljust(w) for b, w in zip(BACKENDS, cols)))
    for op in ops:
        lines.append(op.name.ljust(width) + "  " + "  ".join(_status(op, b).ljust(w) for b, w in zip(BACKENDS, cols)))
    why = {(op.name, b): op.impls[b].available() for op in ops for b in BACKENDS if b in op.impls}
    notes = sorted({r for reasons in why.values() for r in reasons})
    if notes:
        lines += ["", "reasons:"] + [f"  - {r}" for r in notes]
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
