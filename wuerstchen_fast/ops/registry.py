"""The backend registry: which implementation of an op runs for a given input.

Four backends exist (xformers-style, each answers with *reasons* when it cannot run an input):

    torch   the pure-PyTorch reference (`ops/reference.py`); always available, runs anything.
    triton  Triton kernels (`kernels/triton/`); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    cuda    the compiled extension's CUDA kernels (`wuerstchen_fast._C`), on CUDA tensors.
    cpu     the compiled extension's CPU kernels (`wuerstchen_fast._C`), on CPU tensors.

Selection, strongest first: the per-call `backend=` argument, the innermost `with backend(...)`,
`set_backend(...)`, the `WUERSTCHEN_FAST_BACKEND` environment variable, then "auto".
A request is one backend name, a comma-separated priority list ("triton,torch"), or "auto".

* "auto" walks the op's priority list (fastest first, as measured) and quietly takes the first
  backend that can run the input. The reference always can, so auto never fails.
* An explicit request that no listed backend can honour raises `BackendUnavailableError` naming every
  backend's reasons. Nothing falls back silently when the user asked for something specific.

The state is process-global (plain module globals, not thread-locals or context variables) so that
`torch.compile` reads it as ordinary globals and traces through dispatch without graph breaks.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

__all__ = [
    "BACKENDS",
    "AUTO",
    "BackendUnavailableError",
    "OpSpec",
    "Impl",
    "register_op",
    "get_op",
    "all_ops",
    "resolve",
    "set_backend",
    "get_backend",
    "backend",
]

BACKENDS = ("torch", "triton", "cuda", "cpu")
AUTO = "auto"
ENV_VAR = "WUERSTCHEN_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this input; the message lists every reason."""


Checker = Callable[..., list]


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op.

    `fn` runs the op; `check(*args, **kwargs)` returns a list of reasons why it cannot (empty = can).
    `available()` returns the reasons the backend cannot run at all in this process (not built,
    no GPU, ...), independent of the input; it is what `python -m wuerstchen_fast.info` shows.
    """

    backend: str
    fn: Callable
    check: Checker
    available: Callable[[], list]


@dataclass
class OpSpec:
    """An op: its reference, its implementations and its automatic priority order."""

    name: str
    doc: str
    impls: dict = field(default_factory=dict)
    # Priority for "auto" per device type of the first tensor argument, fastest first; set per op
    # from measurements in bench/. Triton on CPU (the interpreter) is for tests: never automatic.
    priority: dict = field(default_factory=lambda: {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")})
    # Sample inputs of the function `op(*args, **kwargs)` for tests: samples(device) -> [(args, kwargs)].
    samples: Callable | None = None
    # The registered ops behind one sample for a backend, for opcheck: (args, kwargs, backend) ->
    # [(op, args, kwargs)] — the front op and its backward, and the extension's ops for cpu/cuda.
    opcheck_cases: Callable | None = None
    # Modules holding the op's Triton kernels; each lists COMPILE_SPECS for the sm_80/sm_90 build test.
    triton_modules: tuple = ()

    def add(self, impl: Impl) -> None:
        if impl.backend not in BACKENDS:
            raise ValueError(f"unknown backend {impl.backend!r}; expected one of {BACKENDS}")
        self.impls[impl.backend] = impl

    def reasons(self, backend_name: str, *args, **kwargs) -> list:
        impl = self.impls.get(backend_name)
        if impl is None:
            return [f"{self.name} has no {backend_name} implementation"]
        return list(impl.available()) or list(impl.check(*args, **kwargs))


_OPS: dict = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in _OPS:
        raise ValueError(f"op {spec.name!r} registered twice")
    if "torch" not in spec.impls:
        raise ValueError(f"op {spec.name!r} needs a torch (reference) implementation")
    _OPS[spec.name] = spec
    return spec


def get_op(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; registered ops: {sorted(_OPS)}") from None


def all_ops() -> list:
    return [_OPS[k] for k in sorted(_OPS)]


# ----------------------------------------------------------------------------- selection state

def _parse(request: str | Sequence[str] | None, source: str) -> tuple | None:
    """Normalise a request to a tuple of backend names, or None for "auto"."""
    if request is None:
        return None
    names = request.split(",") if isinstance(request, str) else list(request)
    names = tuple(n.strip().lower() for n in names if n.strip())
    if not names or names == (AUTO,):
        return None
    bad = [n for n in names if n not in BACKENDS]
    if bad or AUTO in names:
        raise ValueError(
            f"{source}: unknown backend {', '.join(map(repr, bad or [AUTO]))}; use 'auto', one of "
            f"{', '.join(BACKENDS)}, or a comma-separated priority list such as 'triton,torch'"
        )
    return names


_env_request = _parse(os.environ.get(ENV_VAR), f"environment variable {ENV_VAR}")
_global_request: tuple | None = None
_stack: list = []


def set_backend(name: str | Sequence[str] | None) -> None:
    """Set the process-wide backend request ("auto" or None restores automatic choice)."""
    global _global_request
    _global_request = _parse(name, "set_backend()")


def get_backend() -> str:
    """The request in force outside any per-call argument, as a string ("auto" if none)."""
    req = _current_request()
    return AUTO if req is None else ",".join(req)


@contextlib.contextmanager
def backend(name: str | Sequence[str] | None) -> Iterator[None]:
    """`with wuerstchen_fast.backend("triton"): ...` — request a backend inside the block."""
    _stack.append(_parse(name, "backend()"))
    try:
        yield
    finally:
        _stack.pop()


def _current_request() -> tuple | None:
    if _stack:
        return _stack[-1]
    if _global_request is not None:
        return _global_request
    return _env_request


def resolve(op: str | OpSpec, *args, backend: str | Sequence[str] | None = None, **kwargs) -> str:
    """Name of the backend that will run `op` on these inputs.

    Raises BackendUnavailableError when an explicit request cannot be honoured.
    """
    spec = get_op(op) if isinstance(op, str) else op
    request = _parse(backend, "backend=") if backend is not None else _current_request()
    if request is None:
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        for name in spec.priority.get(device, ("torch",)):
            if name in spec.impls and not spec.reasons(name, *args, **kwargs):
                return name
        return "torch"
    for name in request:
        if not spec.reasons(name, *args, **kwargs):
            return name
    lines = [f"  {name}: {'; '.join(spec.reasons(name, *args, **kwargs)) or 'can run'}" for name in BACKENDS]
    raise BackendUnavailableError(
        f"{spec.name}: requested backend {','.join(request)!r} cannot run this input.\n"
        + "\n".join(lines)
        + "\nUse backend='auto' to let wuerstchen_fast choose, or fix the input as the reasons say."
    )
