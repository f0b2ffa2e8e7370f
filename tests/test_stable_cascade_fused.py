"""Stable Cascade on the fused backends: whole tiny prior and decoder (every parameter random) on the triton
backend (the interpreter on CPU) and on the extension's cpu backend equal the torch reference, forward and
backward, by the model-level tolerance rule (tests/_fused_check.py); the TimestepBlock modulation with its
summed `mapper_sca` / `mapper_crp` folds into the ResBlock ops; `torch.compile(fullgraph=True)` traces both
stages and the denoising loop's step without a break and never recompiles."""
import pytest
import torch
import torch._dynamo

import wuerstchen_fast
from _fused_check import assert_model_grad, run_model
from conftest import DEVICE
from wuerstchen_fast.diffusion import DenoiseLoop, make_timesteps
from wuerstchen_fast.models import StableCascadeConfig, StableCascadeUNet
from wuerstchen_fast.models.blocks import ResBlockStageB, TimestepBlock
from wuerstchen_fast.ops import registry
from wuerstchen_fast.testing.random_models import randomize_

HAS_TRITON = not registry.get_op("resblock_stage_b").impls["triton"].available()
HAS_CPU_EXT = not registry.get_op("resblock_stage_b").impls["cpu"].available()
# The cpu extension has no attention kernel: that op stays on the reference (a priority list, not "cpu" alone).
BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")),
            pytest.param("cpu,torch", marks=pytest.mark.skipif(not HAS_CPU_EXT or DEVICE != "cpu",
                                                               reason="cpu extension unavailable"))]


def _model(stage, seed=1):
    cfg = StableCascadeConfig.tiny_prior() if stage == "prior" else StableCascadeConfig.tiny_decoder()
    return randomize_(StableCascadeUNet(cfg), seed=seed).eval().to(DEVICE)


def _inputs(stage, seed=0):
    """(x, r), conditioning kwargs: the decoder at 18 x 22 (9 x 11 after the patch; the k2 s2 levels floor to 4 x 5
    and 2 x 2), whose up path is resized to the skips."""
    g = torch.Generator().manual_seed(seed)
    if stage == "prior":
        x = torch.randn(2, 16, 3, 5, generator=g)
        kw = dict(clip_text_pooled=torch.randn(2, 1, 24, generator=g), clip_text=torch.randn(2, 5, 24, generator=g),
                  clip_img=torch.randn(2, 1, 20, generator=g))
    else:
        x = torch.randn(2, 4, 18, 22, generator=g)
        kw = dict(clip_text_pooled=torch.randn(2, 1, 24, generator=g), effnet=torch.randn(2, 16, 3, 4, generator=g))
    return (x.to(DEVICE), torch.rand(2, generator=g).to(DEVICE)), {k: v.to(DEVICE) for k, v in kw.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_whole_model_fused_equals_torch(stage, backend):
    model, (args, kw) = _model(stage), _inputs(stage)

    def call(m, x, r, **k):
        return m(x, r, **k)

    exact_out, exact_g = run_model(model, call, [a.double() for a in args], "torch", torch.float64,
                                   {k: v.double() for k, v in kw.items()})
    eager_out, eager_g = run_model(model, call, args, "torch", torch.float32, kw)
    out, g = run_model(model, call, args, backend, torch.float32, kw)
    from wuerstchen_fast.testing.tolerance import assert_close_to_reference

    assert_close_to_reference(out, eager_out, exact_out, f"{stage} output")
    assert set(g) == set(eager_g) == set(exact_g), sorted(set(g) ^ set(eager_g))
    assert len(g) == sum(1 for _ in model.parameters()) + 1  # every parameter took part
    for name in g:
        assert_model_grad(g[name], eager_g[name], exact_g[name], f"{stage} grad {name}")


def _graph_ops(fn, *args, **kwargs):
    """Run fn under torch.compile(fullgraph=True) (a graph break raises) -> (output, call_function targets)."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return torch.compile(fn, fullgraph=True, backend=backend)(*args, **kwargs), seen


def _resblock_runs(model) -> tuple:
    """(ResBlock runs per forward, how many of them are followed by a TimestepBlock): levels run 1 + repeats times."""
    runs = pairs = 0
    for levels, repeats in ((model.down_blocks, model.down_repeat_mappers), (model.up_blocks, model.up_repeat_mappers)):
        for level, rep in zip(levels, repeats):
            n = len(rep) + 1
            runs += n * sum(isinstance(b, ResBlockStageB) for b in level)
            pairs += n * sum(isinstance(a, ResBlockStageB) and isinstance(b, TimestepBlock) for a, b in zip(level, level[1:]))
    return runs, pairs


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_folded_modulation_and_fullgraph_compile(stage):
    m, ((x, r), kw) = _model(stage, seed=4), _inputs(stage, seed=4)
    runs, pairs = _resblock_runs(m)
    assert pairs == runs > 0
    with torch.no_grad():
        conds = m.prepare_conditioning(**kw, sample_size=x.shape[-2:])
        with wuerstchen_fast.backend("triton"):
            folded, seen = _graph_ops(m.denoise, x, r, *conds)
            m.fold_modulation = False
            unfolded, seen_unfolded = _graph_ops(m.denoise, x, r, *conds)
        with wuerstchen_fast.backend("torch"):
            ref = m.denoise(x, r, *conds)
            whole, seen_whole = _graph_ops(m, x, r, **kw)  # the whole forward, conditioning included
    # The folded modulation (a, b summed over mapper, mapper_sca, mapper_crp) runs in the ResBlock op's epilogue.
    assert sum("wuerstchen_fast.resblock" in t for t in seen) == runs, seen
    assert not any("wuerstchen_fast.modulate" in t for t in seen), seen
    assert sum("wuerstchen_fast.modulate" in t for t in seen_unfolded) == pairs
    assert any("wuerstchen_fast.attn_block" in t for t in seen) and any("layer_norm_2d" in t for t in seen)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-4)
    # The whole forward (the conditioning included) traces too; on the reference backend the ops are inlined.
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    assert any("layer_norm" in t for t in seen_whole)


def test_denoise_loop_compiles_the_stable_cascade_step_once_per_signature():
    """The sampler runs `model.denoise` with the conditioning computed once; compiled, a second resolution
    is a second compile and a repeated one none (error_on_recompile)."""
    torch._dynamo.reset()
    m = _model("prior")
    loop = DenoiseLoop(m.denoise, 4.0, compile="aot_eager")
    g = torch.Generator().manual_seed(0)
    _, kw = _inputs("prior")
    kw = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in kw.items()}  # [cond, uncond]
    with torch.no_grad():
        conds = m.prepare_conditioning(**kw, sample_size=(3, 5))
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = [loop(torch.randn(2, 16, *hw, generator=g).to(DEVICE), make_timesteps(2), conds,
                         torch.Generator().manual_seed(1), progress=False) for hw in ((3, 5), (4, 2), (3, 5))]
        eager = DenoiseLoop(m.denoise, 4.0)(torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(0)).to(DEVICE),
                                            make_timesteps(2), conds, torch.Generator().manual_seed(1), progress=False)
    assert len(loop._compiled) == 2
    torch.testing.assert_close(outs[0], eager, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_step_accepts_stable_cascade():
    m = _model("decoder")
    (x, r), kw = _inputs("decoder")
    with torch.no_grad():
        conds = m.prepare_conditioning(**kw, sample_size=x.shape[-2:])
        ts = make_timesteps(3, device=DEVICE)
        graphed = DenoiseLoop(m.denoise, 0.0, cuda_graphs=True)(x, ts, conds, torch.Generator().manual_seed(2),
                                                                  progress=False)
        eager = DenoiseLoop(m.denoise, 0.0)(x, ts, conds, torch.Generator().manual_seed(2), progress=False)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
