"""End to end: text -> image with our WuerstchenPipeline against diffusers' WuerstchenCombinedPipeline.

Both pipelines hold the same random weights (wuerstchen_fast.testing.random_models.build_pipelines).
Released size (a GPU): v2 models in bf16, 1024x1024, prior guidance 4, at the default steps (prior 60,
decoder 12) and at 29 + 12, a shorter prior schedule. Small size (a CPU): the "small" configs, 256x256,
6 prior + 3 decoder steps; "tiny" (the parity tests' models, 128x128) only rehearses the GPU check on
a CPU. The test id names the steps (`test_e2e_sample[60+12-auto]`), so a run can
pick one.

Providers (baseline: diffusers eager):
    diffusers          WuerstchenCombinedPipeline, eager
    diffusers-compile  diffusers' recipe: torch.compile(mode="reduce-overhead", fullgraph=True) on the
                       prior and the decoder (applied to the modules its sub-pipelines run)
    torch              ours, every op on the reference backend
    auto               ours, default backends
    auto-compile       ours with compile=True
    auto-cudagraphs, auto-compile-cudagraphs   ours with cuda_graphs=True (CUDA only)
Each row also records the largest pixel difference from diffusers' image for the same seed, and the
FLOPs of one image (torch's FlopCounterMode over diffusers' pipeline: matmuls, convolutions,
attention), so its rate sits against the matmul ceiling: the time at that ceiling is the floor.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.common import DEVICE, SIZE, count_flops
from wuerstchen_fast.pipeline import WuerstchenPipeline
from wuerstchen_fast.testing.random_models import build_pipelines

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CALL = {
    "released": dict(height=1024, width=1024),
    "small": dict(height=256, width=256),
    "tiny": dict(height=128, width=128),
}[SIZE]
CALL.update(prior_guidance_scale=4.0, decoder_guidance_scale=0.0, output_type="pt")
STEPS = {"released": ("60+12", "29+12"), "small": ("6+3",), "tiny": ("2+2", "1+1")}[SIZE]
"""(prior steps)+(decoder steps) per run."""
PROMPT = "a photograph of a red fox in the snow, high detail"
SEEDS = (0, 1)
PROVIDERS = ("diffusers", "diffusers-compile", "torch", "auto", "auto-compile", "auto-cudagraphs",
             "auto-compile-cudagraphs")

_STATE: dict = {}
_FLOPS: dict = {}


def _pipes():
    if "pipes" not in _STATE:
        _STATE["pipes"] = build_pipelines({"released": "v2"}.get(SIZE, SIZE), DEVICE, DTYPE, seed=0)
    return _STATE["pipes"]


def _ours_variant(ours: WuerstchenPipeline, compile: bool, cuda_graphs: bool) -> WuerstchenPipeline:
    return WuerstchenPipeline(ours.prior, ours.decoder, ours.vqgan, ours.prior_text, ours.decoder_text,
                              device=ours.device, dtype=ours.dtype, config=ours.config, compile=compile,
                              cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("steps", STEPS)
def test_e2e_sample(benchmark, measure, steps, provider):
    import wuerstchen_fast

    if "cudagraphs" in provider and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if "compile" in provider and DEVICE != "cuda" and not os.environ.get("WF_BENCH_E2E_COMPILE"):
        pytest.skip("compiling both stages takes minutes on a small CPU; bench_stages covers compile there "
                    "(set WF_BENCH_E2E_COMPILE=1 to run it)")
    ref, ours = _pipes()
    prior_steps, decoder_steps = (int(n) for n in steps.split("+"))
    call_kw = dict(CALL, prior_num_inference_steps=prior_steps, num_inference_steps=decoder_steps)
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
            return ref(PROMPT, generator=torch.Generator().manual_seed(seed), **call_kw).images
        request = None
    else:
        pipe = _ours_variant(ours, "compile" in provider, "cudagraphs" in provider)
        request = "torch" if provider == "torch" else None

        def fn(seed):
            with wuerstchen_fast.backend(request):
                return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), progress=False, **call_kw).images

    if steps not in _FLOPS:  # the same work for every provider: counted once, on diffusers' eager pipeline
        _FLOPS[steps] = count_flops(lambda: ref(PROMPT, generator=torch.Generator().manual_seed(0), **call_kw))
    try:
        h, w = CALL["height"], CALL["width"]
        out = measure(benchmark, fn, [(s,) for s in SEEDS], provider=provider, baseline=provider == "diffusers",
                      flops=_FLOPS[steps],
                      group=f"e2e sample {h}x{w} prior {prior_steps} + decoder {decoder_steps} steps {SIZE} "
                            f"{str(DTYPE)[6:]}", min_rounds=3)
    finally:
        if restore is not None:
            restore()
    assert torch.isfinite(out).all()
    if provider == "diffusers":
        _STATE[("reference_image", steps)] = out.float().cpu()
    elif ("reference_image", steps) in _STATE:
        ref_image = _STATE[("reference_image", steps)]
        benchmark.extra_info["max_abs_diff_vs_diffusers"] = (out.float().cpu() - ref_image).abs().max().item()
