"""Stable Cascade (Würstchen v3) benches: whole prior and decoder forwards, and their hot blocks at the
shapes the released models run, ours against diffusers' `StableCascadeUNet` / `SDCascade*Block`.

    prior_forward    the denoiser of one prior step at 1024x1024 with CFG: x 2x16x24x24, 85 CLIP tokens
                     (77 text + 4 pooled + 4 image); the conditioning is part of the call, as in diffusers
    decoder_forward  one decoder step at 1024x1024 without CFG: x 1x4x256x256, effnet 1x16x24x24, pooled text
    resblock_stage_b C=2048 at 2x24x24 (M=1152 rows) with the 2048-wide skip (the prior's long skip),
                     C=1280 at 1x32x32 (M=1024, decoder level 2), C=320 at 1x128x128 (M=16384, decoder level 0);
                     the block, then its TimestepBlock (sca/crp mappers summed), as the models run them
    attn_block       C=2048, 24x24 image tokens (N=576) + 85 CLIP tokens, 32 heads, batch 2 (prior);
                     C=1280, 32x32 (N=1024) + 4 pooled tokens, 20 heads, batch 1 (decoder level 2)

Sizes follow bench/common.py's SIZE: "released" (a GPU, bfloat16) runs the released 3.6B prior and 1.5B
decoder and the shapes above; "small" (a CPU, float32) keeps the layouts at narrow widths
(wuerstchen_fast.testing.random_stable_cascade.SC_SIZES) and halves the blocks' widths, so the suite runs
in minutes. Weights are random and the same for diffusers and ours.

Providers: diffusers (eager; the baseline), diffusers-compile (torch.compile fullgraph, GPU only unless
WF_BENCH_CPU_COMPILE=1), torch (ours, every op on the reference), auto (the registry's choice), triton /
cuda / cpu (that backend first, "<name>,torch"; skipped where it cannot run), auto-compile (ours compiled).
FLOPs: torch's FlopCounterMode on the diffusers module (matmuls, convolutions, attention).
"""
from __future__ import annotations

import os

import pytest
import torch

import wuerstchen_fast
from bench.common import DEVICE, SIZE, skip_unless_backend_available
from wuerstchen_fast.models import StableCascadeUNet
from wuerstchen_fast.models.blocks import AttnBlock, ResBlockStageB, TimestepBlock, resblock_then_timestep
from wuerstchen_fast.testing.random_models import randomize_
from wuerstchen_fast.testing.random_stable_cascade import SC_SIZES, make_diffusers_stable_cascade

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
RELEASED = SIZE == "released"
MODELS = SC_SIZES["released" if RELEASED else "small"]
DECODER_HW = (256, 256) if RELEASED else (128, 128)
PROVIDERS = ("diffusers", "diffusers-compile", "torch", "auto", "triton", "cuda", "cpu", "auto-compile")
# (B, C, H, W, c_skip); small: the same layouts at lower widths / sides
RESBLOCKS = {"prior_skip": (2, 2048, 24, 24, 2048), "decoder_l2": (1, 1280, 32, 32, 0),
             "decoder_l0": (1, 320, 128, 128, 0)}
RESBLOCKS_SMALL = {"prior_skip": (2, 512, 24, 24, 512), "decoder_l2": (1, 320, 32, 32, 0),
                   "decoder_l0": (1, 80, 64, 64, 0)}
# (B, C, H, W, heads, cond tokens, c_cond)
ATTNS = {"prior": (2, 2048, 24, 24, 32, 85, 2048), "decoder_l2": (1, 1280, 32, 32, 20, 4, 1280)}
ATTNS_SMALL = {"prior": (2, 512, 24, 24, 8, 85, 512), "decoder_l2": (1, 320, 32, 32, 5, 4, 320)}

_CACHE: dict = {}


def _skip_provider(provider: str) -> str | None:
    """The backend request the provider runs ours under; skips what cannot run here."""
    if provider in ("triton", "cuda", "cpu"):
        skip_unless_backend_available(provider)
    if "compile" in provider and DEVICE != "cuda" and not os.environ.get("WF_BENCH_CPU_COMPILE"):
        pytest.skip("compiled rows run on a GPU (each compile takes minutes on a 2-core CPU); "
                    "set WF_BENCH_CPU_COMPILE=1 for them on a CPU")
    if "compile" in provider:
        torch._dynamo.reset()
    return {"torch": "torch", "triton": "triton,torch", "cuda": "cuda,torch", "cpu": "cpu,torch"}.get(provider)


def _count_flops(fn, args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


def _run(benchmark, measure, ref_fn, ours_fn, sets, provider: str, group: str, min_rounds: int = 3):
    request = _skip_provider(provider)
    if provider == "diffusers":
        fn = ref_fn
    elif provider == "diffusers-compile":
        fn = torch.compile(ref_fn, fullgraph=True, dynamic=False)
    elif provider == "auto-compile":
        fn = torch.compile(ours_fn, fullgraph=True, dynamic=False)
    else:
        fn = ours_fn

    def call(*args):
        with wuerstchen_fast.backend(request):
            return fn(*args)

    key = ("flops", group)
    if key not in _CACHE:
        _CACHE[key] = _count_flops(ref_fn, sets[0])
    with torch.no_grad():
        out = measure(benchmark, call, sets, group=group, provider=provider, baseline=provider == "diffusers",
                      flops=_CACHE[key], min_rounds=min_rounds)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------- whole models
def _models(stage: str):
    """(diffusers StableCascadeUNet, ours with the same weights), one stage resident at a time."""
    if ("model", stage) not in _CACHE:
        for k in [k for k in _CACHE if k[0] == "model"]:
            del _CACHE[k]
        ref = make_diffusers_stable_cascade(MODELS[stage], seed=2, device=DEVICE, dtype=DTYPE)
        ours = StableCascadeUNet(MODELS[stage]).to(device=DEVICE, dtype=DTYPE).eval()
        ours.load_state_dict(ref.state_dict())
        _CACHE[("model", stage)] = (ref, ours)
    return _CACHE[("model", stage)]


def _model_inputs(stage: str, cfg, n_sets: int = 2):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE)

    sets = []
    for _ in range(n_sets):
        r = torch.full((2 if stage == "prior" else 1,), 0.7, device=DEVICE, dtype=DTYPE)
        if stage == "prior":  # CFG batch; one zero image embedding, as text-to-image runs it
            sets.append((randn(2, cfg.in_channels, 24, 24), r, randn(2, 1, cfg.clip_text_pooled_in_channels),
                         randn(2, 77, cfg.clip_text_in_channels),
                         torch.zeros(2, 1, cfg.clip_image_in_channels, device=DEVICE, dtype=DTYPE)))
        else:
            sets.append((randn(1, cfg.in_channels, *DECODER_HW), r, randn(1, 1, cfg.clip_text_pooled_in_channels),
                         randn(1, cfg.effnet_in_channels, 24, 24)))
    return sets


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_forward(benchmark, measure, stage, provider):
    ref, ours = _models(stage)
    cfg = ours.config
    sets = _model_inputs(stage, cfg)
    if stage == "prior":
        def ref_fn(x, r, pooled, text, img):
            return ref(x, r, clip_text_pooled=pooled, clip_text=text, clip_img=img).sample

        def ours_fn(x, r, pooled, text, img):
            return ours(x, r, pooled, text, img)
        shape = "2x16x24x24 (CFG) + 85 tokens"
    else:
        def ref_fn(x, r, pooled, effnet):
            return ref(x, r, clip_text_pooled=pooled, effnet=effnet).sample

        def ours_fn(x, r, pooled, effnet):
            return ours(x, r, pooled, effnet=effnet)
        shape = f"1x4x{DECODER_HW[0]}x{DECODER_HW[1]}"
    widths = "x".join(map(str, cfg.block_out_channels))
    _run(benchmark, measure, ref_fn, ours_fn, sets, provider,
         f"stable_cascade {stage} forward {shape} widths {widths} {SIZE} {str(DTYPE)[6:]}")


# ---------------------------------------------------------------------------------------------- blocks
def _gen(i):
    return torch.Generator(device=DEVICE).manual_seed(i)


def _pair(build_ref, build_ours):
    ref = randomize_(build_ref().to(DEVICE), 1).to(DTYPE).eval()
    ours = build_ours().to(device=DEVICE, dtype=DTYPE).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "diffusers-compile"])
@pytest.mark.parametrize("case", sorted(RESBLOCKS))
def test_resblock_stage_b(benchmark, measure, case, provider):
    """SDCascadeResBlock + SDCascadeTimestepBlock (sca, crp) vs ours (the modulation folded where fused)."""
    from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock, SDCascadeTimestepBlock

    B, C, H, W, cs = (RESBLOCKS if RELEASED else RESBLOCKS_SMALL)[case]
    conds = ["sca", "crp"] if case.startswith("prior") else ["sca"]
    ref_res, res = _pair(lambda: SDCascadeResBlock(C, cs), lambda: ResBlockStageB(C, cs))
    ref_t, t = _pair(lambda: SDCascadeTimestepBlock(C, 64, conds), lambda: TimestepBlock(C, 64, conds))
    sets = [(torch.randn(B, C, H, W, generator=_gen(i), device=DEVICE, dtype=DTYPE),
             torch.randn(B, cs, H, W, generator=_gen(i), device=DEVICE, dtype=DTYPE) if cs else None,
             torch.rand(B, 64 * (1 + len(conds)), generator=_gen(i), device=DEVICE, dtype=DTYPE)) for i in range(2)]

    def ref_fn(x, skip, r):
        return ref_t(ref_res(x, skip), r)

    def ours_fn(x, skip, r):
        return resblock_then_timestep(res, t, x, skip, r)

    m = B * H * W
    _run(benchmark, measure, ref_fn, ours_fn, sets, provider,
         f"stable_cascade resblock_stage_b+timestep C={C} M={m}" + (f" skip {cs}" if cs else "")
         + f" {SIZE} {str(DTYPE)[6:]}")


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "diffusers-compile"])
@pytest.mark.parametrize("case", sorted(ATTNS))
def test_attn_block(benchmark, measure, case, provider):
    from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock

    B, C, H, W, heads, T, cc = (ATTNS if RELEASED else ATTNS_SMALL)[case]
    ref, ours = _pair(lambda: SDCascadeAttnBlock(C, cc, heads), lambda: AttnBlock(C, cc, heads))
    sets = [(torch.randn(B, C, H, W, generator=_gen(i), device=DEVICE, dtype=DTYPE),
             torch.randn(B, T, cc, generator=_gen(i), device=DEVICE, dtype=DTYPE)) for i in range(2)]
    _run(benchmark, measure, ref, ours, sets, provider,
         f"stable_cascade attn_block C={C} N={H * W} T={T} heads={heads} B={B} {SIZE} {str(DTYPE)[6:]}")
