"""Training step time and activation memory of a Stage C block stack at the released width, eager
(`backend=torch`) vs fused (`backend=auto`), with and without gradient checkpointing.

    pytest bench/bench_train.py --benchmark-only [--benchmark-json out.json]

Shape: released v2 width (c=1536, c_cond=1280, 24 heads, c_r=64, 77 text tokens). On a GPU: 4 blocks,
batch 8, 24x24 latents (the 1024px latent), bf16 autocast. On CPU (too slow for that): 2 blocks, batch 2,
8x8 latents, fp32. One step = forward + p2-weighted ε loss + backward + AdamW, exactly the trainer's
objective (`StageCObjective`). Memory: the bytes autograd saves for backward during the forward (the
activation memory, device-independent), and on CUDA also the peak allocated memory.
extra_info records device, versions, git revision, shape, FLOPs per step and achieved TFLOP/s.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

import wuerstchen_fast
from wuerstchen_fast.models import StageC, StageCConfig
from wuerstchen_fast.training.components import enable_grad_checkpointing, init_weights
from wuerstchen_fast.training.objectives import StageCObjective

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DEPTH, BATCH, SIDE = (4, 8, 24) if CUDA else (2, 2, 8)


def _git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _setup(checkpointing: bool):
    torch.manual_seed(0)
    cfg = StageCConfig(c_in=16, c=1536, c_cond=1280, c_r=64, depth=DEPTH, nhead=24, dropout=0.0)
    model = init_weights(StageC(cfg)).to(DEVICE).train()
    if checkpointing:
        enable_grad_checkpointing(model)
    obj = StageCObjective(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(BATCH, 16, SIDE, SIDE, generator=g) * 0.1).to(DEVICE)
    text = torch.randn(BATCH, 77, 1280, generator=g).to(DEVICE)
    t = torch.rand(BATCH, generator=g).to(DEVICE)
    noise = torch.randn(BATCH, 16, SIDE, SIDE, generator=g).to(DEVICE)
    return obj, opt, (x0, text, t, noise)


def _step(obj, opt, inputs):
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
        loss, _ = obj(*inputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _saved_bytes(obj, inputs) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss, _ = obj(*inputs)
    loss.backward()
    return total


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "grad_ckpt"])
@pytest.mark.parametrize("backend", ["torch", "auto"], ids=["eager", "fused"])
def test_train_step_stage_c(benchmark, backend, checkpointing):
    with wuerstchen_fast.backend(backend):
        obj, opt, inputs = _setup(checkpointing)
        _step(obj, opt, inputs)  # warm-up (kernel builds, autotuning)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            _step(obj, opt, inputs)
        flops = fc.get_total_flops()
        saved = _saved_bytes(obj, inputs)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def run():
            _step(obj, opt, inputs)
            if CUDA:
                torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
                wuerstchen_fast=wuerstchen_fast.__version__, git=_git_rev(), backend=backend,
                grad_checkpointing=checkpointing, shape=dict(c=1536, depth=DEPTH, batch=BATCH, side=SIDE, tokens=77),
                dtype="bf16-autocast" if CUDA else "fp32", flops_per_step=flops,
                activation_saved_mb=saved / 2**20)
    if benchmark.stats is not None:
        info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    if CUDA:
        info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
