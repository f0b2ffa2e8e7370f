"""torch.compile over whole models and the denoising loop: compiled == eager, no recompiles, no breaks.

* the r embedding's frequencies are an eager constant, so compiled r embeddings equal eager ones;
* every DenoiseLoop compiles its step in a frame of its own per input signature: a pipeline that runs
  the prior and the decoder at several resolutions never recompiles (error_on_recompile holds it);
* `torch.compile(fullgraph=True)` traces whole tiny Stage C and Stage B forwards with every op on
  the triton backend (the interpreter runs underneath on CPU): the registered ops are seen, no breaks.
"""
import pytest
import torch
import torch._dynamo

import wuerstchen_fast
from conftest import DEVICE
from wuerstchen_fast.diffusion import DenoiseLoop, make_timesteps
from wuerstchen_fast.models.configs import StageBConfig, StageCConfig
from wuerstchen_fast.models.stage_b import StageB
from wuerstchen_fast.models.stage_c import StageC
from wuerstchen_fast.testing.random_models import TINY_DECODER, TINY_PRIOR, randomize_


def _prior():
    return randomize_(StageC(StageCConfig(**TINY_PRIOR)), seed=1).eval().to(DEVICE)


def _decoder():
    m = randomize_(StageB(StageBConfig(**TINY_DECODER)), seed=2).eval().to(DEVICE)
    with torch.no_grad():  # keep sigmoid(b) of the head away from 1e-3 (see tests/_pipeline_folders.py)
        m.clf[1].weight.mul_(0.1)
        m.clf[1].bias.mul_(0.1)
    return m


def test_r_embedding_compiled_equals_eager():
    torch._dynamo.reset()
    m = _prior()
    r = torch.rand(4, device=DEVICE)
    eager = m.gen_r_embedding(r)
    compiled = torch.compile(m.gen_r_embedding, fullgraph=True)(r)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    # and the frequencies follow the model's device and stay float32 under .to(dtype)
    assert m.to(torch.bfloat16).r_freqs.freqs.dtype == torch.float32


def test_denoise_loops_never_recompile():
    torch._dynamo.reset()
    prior, decoder = _prior(), _decoder()
    g = torch.Generator().manual_seed(0)
    text_c = torch.randn(4, 5, TINY_PRIOR["c_cond"], generator=g).to(DEVICE)
    text_b = torch.randn(2, 5, TINY_DECODER["clip_embd"], generator=g).to(DEVICE)
    loops = (DenoiseLoop(prior, 4.0, compile="aot_eager"), DenoiseLoop(decoder, 0.0, compile="aot_eager"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for hw in ((2, 3), (3, 2)):  # two resolutions through both loops
            lat = loops[0](torch.randn(2, 16, *hw, generator=g).to(DEVICE), make_timesteps(2), (text_c,),
                           torch.Generator().manual_seed(1), progress=False)
            effnet = lat[:, :16]
            loops[1](torch.randn(2, 4, 16 * hw[0], 16 * hw[1], generator=g).to(DEVICE), make_timesteps(2),
                     (effnet, text_b), torch.Generator().manual_seed(2), progress=False)
    assert all(len(loop._compiled) == 2 for loop in loops)


def _capture_ops(fn, *args):
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return out, seen


@pytest.mark.parametrize("stage", ["stage_c", "stage_b"])
def test_fullgraph_whole_model_on_triton(stage):
    g = torch.Generator().manual_seed(3)
    if stage == "stage_c":
        m = _prior()
        args = (torch.randn(2, 16, 3, 3, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 48, generator=g))
    else:
        m = _decoder()
        args = (torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g),
                torch.randn(2, 16, 3, 3, generator=g), torch.randn(2, 5, 40, generator=g))
    args = tuple(a.to(DEVICE) for a in args)
    # forward_raw: the output before the ε head, whose 1/(|1 − b| + 1e-5) would turn float32 noise
    # of the fused kernels into large absolute differences wherever a random b lands near 1.
    with torch.no_grad(), wuerstchen_fast.backend("triton"):
        out, seen = _capture_ops(m.forward_raw, *args)
    with torch.no_grad(), wuerstchen_fast.backend("torch"):
        ref = m.forward_raw(*args)
    assert any("wuerstchen_fast.layer_norm_2d" in t for t in seen), seen
    # Every TimestepBlock follows a ResBlock in these layouts: all fold into the ResBlock ops.
    assert any("wuerstchen_fast.resblock" in t for t in seen), seen
    assert not any("wuerstchen_fast.modulate" in t for t in seen), seen
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
