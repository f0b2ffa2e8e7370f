"""Model CPU offload: every module lives on the CPU and visits the execution device only while it runs.

`ModelOffload.placed(name)` is the whole protocol: on entry the module moves to the execution device,
on exit back to the CPU, so at most the running module (a 3.6B prior, say) holds GPU memory. Moves
are counted per module object, so nested or concurrent uses of one module (two threads, or one text
encoder shared by two pipelines) move it once in and once out.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterable

import torch

__all__ = ["ModelOffload", "move_module"]

_LOCK = threading.Lock()
_USERS: dict[int, int] = {}  # id(module) -> blocks currently using it on the execution device


def move_module(module: Any, device: torch.device) -> None:
    """The one place offload moves a module (tests record the moves here)."""
    module.to(device)


class ModelOffload:
    """Offload for one pipeline: `get(name)` returns its module of that name (read at each use, so a
    module replaced after `enable_model_cpu_offload()` is the one that moves)."""

    def __init__(self, names: Iterable[str], get: Callable[[str], Any], device: torch.device):
        self.names = tuple(names)
        self.get = get
        self.device = torch.device(device)
        self.home = torch.device("cpu")
        for name in self.names:
            module = get(name)
            if hasattr(module, "to"):
                move_module(module, self.home)

    @contextlib.contextmanager
    def placed(self, name: str):
        module = self.get(name) if name in self.names else None
        if module is None or not hasattr(module, "to"):
            yield module
            return
        key = id(module)
        with _LOCK:
            if _USERS.get(key, 0) == 0:
                move_module(module, self.device)
            _USERS[key] = _USERS.get(key, 0) + 1
        try:
            yield module
        finally:
            with _LOCK:
                _USERS[key] -= 1
                if _USERS[key] == 0:
                    del _USERS[key]
                    move_module(module, self.home)
