"""End to end: text -> image with our WuerstchenPipeline against diffusers' WuerstchenCombinedPipeline.

Both pipelines hold the same random weights (wuerstchen_fast.testing.random_models.build_pipelines).
Released size (a GPU): v2 models in bf16, 1024x1024, the default steps (prior 60, decoder 12),
prior guidance 4. Small size (a CPU): the "small" configs, 256x256, 6 prior + 3 decoder steps.

Providers (baseline: diffusers eager):
    diffusers          WuerstchenCombinedPipeline, eager
    diffusers-compile  diffusers' recipe: torch.compile(mode="reduce-overhead", fullgraph=True) on the
                       prior and the decoder (applied to the modules its sub-pipelines run)
    torch              ours, every op on the reference backend
    auto               ours, default backends
    auto-compile       ours with compile=True
    auto-cudagraphs, auto-compile-cudagraphs   ours with cuda_graphs=True (CUDA only)
Each row also records the largest pixel difference from diffusers' image for the same seed.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.common import DEVICE, SIZE
from wuerstchen_fast.pipeline import WuerstchenPipeline
from wuerstchen_fast.testing.random_models import build_pipelines

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CALL = {
    "released": dict(height=1024, width=1024, prior_num_inference_steps=60, num_inference_steps=12),
    "small": dict(height=256, width=256, prior_num_inference_steps=6, num_inference_steps=3),
}[SIZE]
CALL.update(prior_guidance_scale=4.0, decoder_guidance_scale=0.0, output_type="pt")
PROMPT = "a photograph of a red fox in the snow, high detail"
SEEDS = (0, 1)
PROVIDERS = ("diffusers", "diffusers-compile", "torch", "auto", "auto-compile", "auto-cudagraphs",
             "auto-compile-cudagraphs")

_STATE: dict = {}


def _pipes():
    if "pipes" not in _STATE:
        _STATE["pipes"] = build_pipelines("v2" if SIZE == "released" else "small", DEVICE, DTYPE, seed=0)
    return _STATE["pipes"]


def _ours_variant(ours: WuerstchenPipeline, compile: bool, cuda_graphs: bool) -> WuerstchenPipeline:
    return WuerstchenPipeline(ours.prior, ours.decoder, ours.vqgan, ours.prior_text, ours.decoder_text,
                              device=ours.device, dtype=ours.dtype, config=ours.config, compile=compile,
                              cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_e2e_sample(benchmark, measure, provider):
    import wuerstchen_fast

    if "cudagraphs" in provider and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if "compile" in provider and DEVICE != "cuda" and not os.environ.get("WF_BENCH_E2E_COMPILE"):
        pytest.skip("compiling both stages takes minutes on a small CPU; bench_stages covers compile there "
                    "(set WF_BENCH_E2E_COMPILE=1 to run it)")
    ref, ours = _pipes()
    restore = None
    if "compile" in provider:
        torch._dynamo.reset()
    if provider.startswith("diffusers"):
        if provider == "diffusers-compile":
            prior, decoder = ref.prior_pipe.prior, ref.decoder_pipe.decoder
            restore = lambda: (setattr(ref.prior_pipe, "prior", prior), setattr(ref.decoder_pipe, "decoder", decoder))  # noqa: E731
            ref.prior_pipe.prior = torch.compile(prior, mode="reduce-overhead", fullgraph=True)
            ref.decoder_pipe.decoder = torch.compile(decoder, mode="reduce-overhead", fullgraph=True)

        def fn(seed):
            return ref(PROMPT, generator=torch.Generator().manual_seed(seed), **CALL).images
        request = None
    else:
        pipe = _ours_variant(ours, "compile" in provider, "cudagraphs" in provider)
        request = "torch" if provider == "torch" else None

        def fn(seed):
            with wuerstchen_fast.backend(request):
                return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), progress=False, **CALL).images

    try:
        h, w = CALL["height"], CALL["width"]
        out = measure(benchmark, fn, [(s,) for s in SEEDS], provider=provider, baseline=provider == "diffusers",
                      group=f"e2e sample {h}x{w} prior {CALL['prior_num_inference_steps']} + decoder "
                            f"{CALL['num_inference_steps']} steps {SIZE} {str(DTYPE)[6:]}", min_rounds=3)
    finally:
        if restore is not None:
            restore()
    assert torch.isfinite(out).all()
    if provider == "diffusers":
        _STATE["reference_image"] = out.float().cpu()
    elif "reference_image" in _STATE:
        benchmark.extra_info["max_abs_diff_vs_diffusers"] = (out.float().cpu() - _STATE["reference_image"]).abs().max().item()
