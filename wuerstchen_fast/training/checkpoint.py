"""Training checkpoints: written atomically, resumed exactly.

Layout of `<output_dir>/checkpoints/step_00000100/`:
    model/, ema/            the stage, raw and EMA weights, in the model loaders' format (`save_stage`):
                            `load_stage_c(".../ema")` / the pipeline read them directly
    trainable.safetensors   every trainable module's full state (the exact resume source; it also holds
                            the jointly trained compressor of Stage B / discriminator of Stage A)
    ema.safetensors         the EMA shadow of every trainable parameter
    optimizer.safetensors   AdamW moments and step counts, keyed by parameter name
    rank{r}.safetensors     per-rank RNG states (torch CPU, CUDA, the trainer's generator)
    state.json              step, scheduler, data position per rank, optimizer param groups, config
The folder is written as `step_X.tmp`, then renamed; `latest` (a one-line file, also replaced atomically)
names the newest complete checkpoint. A run killed mid-write leaves only a `.tmp` folder, never read.
Multi-rank: every rank writes its own `rank{r}` file into the temp folder (a shared file system is assumed
across nodes), rank 0 writes the rest and renames.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .distributed import DistInfo, barrier

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "flatten_optimizer", "unflatten_optimizer"]


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # an FSDP2 shard (DTensor): gather the whole tensor
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def _save(tensors: dict, path: Path) -> None:
    save_file({k: _full(v) for k, v in tensors.items()}, str(path))


def flatten_optimizer(osd: dict) -> tuple[dict, list]:
    """DCP-style optimizer state (keyed by parameter name) -> (flat tensors, param_groups)."""
    flat = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            flat[f"{name}::{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat, osd["param_groups"]


def unflatten_optimizer(flat: dict, groups: list) -> dict:
    state: dict = {}
    for key, v in flat.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": groups}


def _rng_state(gen: torch.Generator) -> dict:
    out = {"torch_cpu": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(st: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch_cpu"])
    gen.set_state(st["generator"])
    if "torch_cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["torch_cuda"])


def latest_checkpoint(output_dir) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    marker = root / "latest"
    if marker.is_file():
        p = root / marker.read_text().strip()
        if (p / "state.json").is_file():
            return p
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run, step: int, info: DistInfo, keep: int = 2) -> Path:
    """`run` is the trainer's `_Run` (module, optimizer, scheduler, ema, loader, generator, split helpers)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from ..models import save_stage

    root = Path(run.output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if info.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(info)
    # per rank: RNG states and data position
    rng = _rng_state(run.generator)
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rank{info.rank}.safetensors"))
    (tmp / f"rank{info.rank}.json").write_text(json.dumps({"data": run.loader.state_dict()}))
    # Every rank's files are in tmp before rank 0 renames it (DDP's state-dict calls below are no collective).
    barrier(info)
    # collectives (every rank), then rank 0 writes
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(run.wrapped, options=opts)
    osd = get_optimizer_state_dict(run.wrapped, run.optimizer, options=opts)
    ema = {k: _full(v) for k, v in run.ema.named().items()} if run.ema is not None else None
    if info.main:
        msd = {k: v.detach().cpu().contiguous() for k, v in msd.items()}
        save_file(msd, str(tmp / "trainable.safetensors"))
        flat, groups = flatten_optimizer(osd)
        save_file({k: v.detach().cpu().contiguous() for k, v in flat.items()}, str(tmp / "optimizer.safetensors"))
        if ema is not None:
            save_file(ema, str(tmp / "ema.safetensors"))
        save_stage(run.export_stage(msd), tmp / "model")
        if ema is not None:
            save_stage(run.export_stage({**msd, **ema}), tmp / "ema")
        state = {"step": step, "scheduler": run.scheduler.state_dict(), "param_groups": groups, "world": info.world,
                 "config": run.config.to_dict()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic_text(root / "latest", final.name)
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(run, path: Path, info: DistInfo) -> int:
    """Restore everything `save_checkpoint` wrote; -> the step to continue from."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("world", 1) != info.world:
        raise ValueError(f"checkpoint {str(path)!r} was written by {state.get('world')} ranks, this run has "
                         f"{info.world}: the data position and RNG states are per rank, so resume with the same "
                         f"number of ranks (or start a new run with model.init={str(path / 'model')!r})")
    opts = StateDictOptions(full_state_dict=True)
    msd = load_file(str(path / "trainable.safetensors"))
    set_model_state_dict(run.wrapped, msd, options=opts)
    osd = unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["param_groups"])
    set_optimizer_state_dict(run.wrapped, run.optimizer, osd, options=opts)
    run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None and (path / "ema.safetensors").is_file():
        saved = load_file(str(path / "ema.safetensors"))
        with torch.no_grad():
            for name, t in run.ema.named().items():
                full = saved[name]
                if hasattr(t, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full.to(t.device), t.device_mesh, t.placements)
                t.copy_(full.to(t.device) if not hasattr(full, "device_mesh") else full)
    run.loader.load_state_dict(json.loads((path / f"rank{info.rank}.json").read_text())["data"])
    _set_rng_state(load_file(str(path / f"rank{info.rank}.safetensors")), run.generator)
    return int(state["step"])
