"""Per-stage benches: one denoising step of Stage C and of Stage B, and a Stage A decode.

    stage_c  one step of the prior at 1024x1024 (24x24 latents), classifier-free guidance on: the
             denoiser runs on batch 2 ([cond, uncond]), then the CFG lerp and the DDPM step
    stage_b  one step of the decoder at 1024x1024 (256x256 latents), guidance off (batch 1)
    stage_a  VQGAN decode of a 4x256x256 latent to a 1024x1024 image
    stage_b01  a whole Stage B forward with the released decoder's level-0/1 widths (B01 below) on the
             1x4x256x256 latent, at every size and dtype: the denoiser alone, no sampler step

At size "released" (a GPU, bf16) the models have the v2 sizes; at "small" (a CPU, fp32) they keep
the released layouts at narrow widths and smaller images, so the suite runs in minutes and never
rots; "tiny" (the parity tests' models on small latents) is for rehearsing the GPU check on a CPU
in seconds, not for timing. Weights are random (wuerstchen_fast.testing.random_models), the same for diffusers and ours.

Providers (the baseline is diffusers' eager model, what issue 10's targets are stated against):
    diffusers          diffusers' WuerstchenPrior / WuerstchenDiffNeXt / PaellaVQModel, eager
    diffusers-compile  the same under diffusers' recipe, torch.compile(mode="reduce-overhead", fullgraph=True)
    torch              our model with every op on the pure-PyTorch reference backend
    auto               our model, backends chosen by the registry (the default)
    triton, cuda, cpu  our model with that backend first ("<name>,torch"), skipped where it cannot run
    auto-compile       our step under torch.compile (what `compile=True` does)
    auto-cudagraphs, auto-compile-cudagraphs   our step captured in a CUDA graph (CUDA only)
FLOPs are counted once per stage by torch's FlopCounterMode on the diffusers model (matmuls,
convolutions, attention), so TFLOP/s compares every provider against the same work.
"""
from __future__ import annotations

import os

import pytest
import torch

import wuerstchen_fast
from bench.common import DEVICE, SIZE, count_flops, skip_unless_backend_available
from wuerstchen_fast.diffusion import DenoiseLoop
from wuerstchen_fast.testing.random_models import (SIZES, make_diffusers_decoder, make_diffusers_prior,
                                                   make_diffusers_vqgan, ours_from_diffusers, scale_output_heads_)

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CFG = SIZES[{"released": "v2"}.get(SIZE, SIZE)]
# Latent sizes: released = 1024x1024 images; small = 512x512-equivalent decoder latents on CPU.
GEOMETRY = {
    "released": dict(c_hw=(24, 24), b_hw=(256, 256), a_hw=(256, 256)),
    "small": dict(c_hw=(24, 24), b_hw=(128, 128), a_hw=(64, 64)),
    "tiny": dict(c_hw=(8, 8), b_hw=(32, 32), a_hw=(16, 16)),
}[SIZE]

# Issue 6's CPU target: a whole Stage B forward at the decoder's level-0/1 sizes. The released decoder's first
# two levels (c_hidden 320 and 640, 10 heads at level 1, 1024-wide conditioning), one block per level and
# side, on the 1x4x256x256 latent of a 1024x1024 image: level 0 runs at 128x128, level 1 at 64x64.
B01 = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640], nhead=[-1, 10], blocks=[1, 1],
           level_config=["CT", "CTA"], inject_effnet=[False, True], effnet_embd=16, clip_embd=1024, kernel_size=3,
           dropout=0.0)
B01_PROVIDERS = ("diffusers", "torch", "auto", "cpu", "cuda", "triton")

STEP_PROVIDERS = ("diffusers", "diffusers-compile", "torch", "auto", "triton", "cuda", "cpu", "auto-compile",
                  "auto-cudagraphs", "auto-compile-cudagraphs")
DECODE_PROVIDERS = ("diffusers", "diffusers-compile", "torch", "auto", "triton", "cuda", "cpu", "auto-compile")

_MODELS: dict = {}
_FLOPS: dict = {}


def _models(stage: str):
    """(diffusers model, our model with the same weights), built once per session."""
    if stage not in _MODELS:
        _MODELS.clear()  # one stage resident at a time: the v2 models are GBs each
        kw = dict(device=DEVICE)
        if stage == "stage_c":
            ref = make_diffusers_prior(2, **kw, **CFG["prior"])
        elif stage in ("stage_b", "stage_b01"):
            ref = make_diffusers_decoder(4, **kw, **(CFG["decoder"] if stage == "stage_b" else B01))
            scale_output_heads_(ref)
        else:
            ref = make_diffusers_vqgan(5, **kw, **CFG["vqgan"])
        ref = ref.to(DTYPE)
        _MODELS[stage] = (ref, ours_from_diffusers(ref))
    return _MODELS[stage]


def _inputs(stage: str, n_sets: int = 2):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE)

    def t(v, dtype=torch.float32):
        return torch.tensor(v, device=DEVICE, dtype=dtype)

    sets = []
    for _ in range(n_sets):
        if stage == "stage_c":
            p = CFG["prior"]
            x = randn(1, p["c_in"], *GEOMETRY["c_hw"])
            sets.append((x, t(0.8, DTYPE), t(0.8), t(0.75), randn(*x.shape), randn(2, 77, p["c_cond"])))
        elif stage == "stage_b":
            d = CFG["decoder"]
            x = randn(1, d["c_in"], *GEOMETRY["b_hw"])
            effnet_hw = tuple(max(1, round(s / 10.67)) for s in GEOMETRY["b_hw"])
            sets.append((x, t(0.6, DTYPE), t(0.6), t(0.4), randn(*x.shape), randn(1, d["effnet_embd"], *effnet_hw),
                         randn(1, 77, d["clip_embd"])))
        elif stage == "stage_b01":  # the denoiser's own arguments (x, r, effnet, clip)
            sets.append((randn(1, 4, 256, 256), t([0.6], DTYPE), randn(1, 16, 24, 24), randn(1, 77, 1024)))
        else:
            sets.append((randn(1, CFG["vqgan"]["latent_channels"], *GEOMETRY["a_hw"]),))
    return sets


def _step_fn(model, guidance: float, *, compile=False, graphs=False):
    return DenoiseLoop(model, guidance, compile=compile, cuda_graphs=graphs)._step


def _callable(stage: str, provider: str):
    """The function the provider times, and the backend request it runs under (None = auto)."""
    ref, ours = _models(stage)
    if "cudagraphs" in provider and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if provider in ("triton", "cuda", "cpu"):
        skip_unless_backend_available(provider)
    if "compile" in provider and DEVICE != "cuda" and stage != "stage_c" and not os.environ.get("WF_BENCH_CPU_COMPILE"):
        pytest.skip("on a CPU only Stage C runs compiled (each compile takes minutes on 2 cores); "
                    "set WF_BENCH_CPU_COMPILE=1 for all")
    if "compile" in provider:
        torch._dynamo.reset()  # each compiled provider starts from a clean cache (no recompile limits)
    request = {"torch": "torch", "triton": "triton,torch", "cuda": "cuda,torch", "cpu": "cpu,torch"}.get(provider)

    if stage == "stage_a":
        if provider == "diffusers":
            return (lambda x: ref.decode(x).sample), None
        if provider == "diffusers-compile":
            dec = torch.compile(ref.decode, mode="reduce-overhead", fullgraph=True)
            return (lambda x: dec(x).sample), None
        if provider == "auto-compile":
            return torch.compile(ours.decode, dynamic=False), None
        return ours.decode, request

    if stage == "stage_b01":  # the bare forward, no sampler step
        return (ref if provider == "diffusers" else ours), request

    guidance = 4.0 if stage == "stage_c" else 0.0
    if provider == "diffusers":
        return _step_fn(ref, guidance), None
    if provider == "diffusers-compile":
        return _step_fn(torch.compile(ref, mode="reduce-overhead", fullgraph=True), guidance), None
    if provider in ("auto-compile", "auto-cudagraphs", "auto-compile-cudagraphs"):
        return _step_fn(ours, guidance, compile="compile" in provider, graphs="cudagraphs" in provider), None
    return _step_fn(ours, guidance), request


def _run(benchmark, measure, stage: str, provider: str, label: str, min_rounds: int = 3):
    fn, request = _callable(stage, provider)
    sets = _inputs(stage)

    def call(*args):
        with wuerstchen_fast.backend(request):
            return fn(*args)

    if stage not in _FLOPS:
        _FLOPS[stage] = count_flops(_callable(stage, "diffusers")[0], *sets[0])
    flops = _FLOPS[stage]
    with torch.no_grad():
        out = measure(benchmark, call, sets, group=f"{stage} {label} {SIZE} {str(DTYPE)[6:]}", provider=provider,
                      baseline=provider == "diffusers", flops=flops, min_rounds=min_rounds)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_stage_c_step(benchmark, measure, provider):
    h, w = GEOMETRY["c_hw"]
    _run(benchmark, measure, "stage_c", provider, f"step B=2(CFG) {h}x{w}")


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_stage_b_step(benchmark, measure, provider):
    h, w = GEOMETRY["b_hw"]
    _run(benchmark, measure, "stage_b", provider, f"step B=1 {h}x{w}")


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
def test_stage_a_decode(benchmark, measure, provider):
    h, w = GEOMETRY["a_hw"]
    _run(benchmark, measure, "stage_a", provider, f"decode 4x{h}x{w}")


@pytest.mark.parametrize("provider", B01_PROVIDERS)
def test_stage_b_forward_levels01(benchmark, measure, provider):
    # 2.5 s a call on a 2-core CPU, where 3 rounds left the median ±10% between runs: 9 rounds.
    _run(benchmark, measure, "stage_b01", provider, "forward 1x4x256x256 released level-0/1 widths", min_rounds=9)
