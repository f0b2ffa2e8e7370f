"""torchrun integration: process group set-up, DDP / FSDP2 wrapping, and small collectives.

Single process when WORLD_SIZE is unset or 1 (no process group, no wrapper): the same script runs
everywhere. Backend: NCCL on CUDA, gloo on CPU. FSDP2 shards every residual / attention block with
`fully_shard` (the unit the blocks' weights are gathered in), then the whole trainable module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "init_distributed", "wrap_model", "all_mean", "barrier", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        here = True
    return DistInfo(rank, world, local_rank, dev, here)


def wrap_model(module: nn.Module, info: DistInfo, mode: str, blocks: list) -> nn.Module:
    """DDP or FSDP2 around `module` (returned unchanged in a single process)."""
    if not info.enabled:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    raise ValueError(f"unknown distributed mode {mode!r}; expected 'ddp' or 'fsdp'")


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def all_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
