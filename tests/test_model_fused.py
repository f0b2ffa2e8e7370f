"""Whole tiny models on the fused (triton) backend == the torch backend, forward and backward.

Stage C and Stage B (`.tiny()` configs, every parameter random, the zero-initialized GRN gammas /
betas, TimestepBlock mappers and Stage A `gammas` included) run forward and backward with every
registered op on backend "triton" (the interpreter on CPU), and Stage A decodes (both mixing branches
fused: norm_mod + mixing_dwconv, and mixing_mlp). Checked: the output
and the gradient of the input and of every parameter.

Tolerance: the kernel tests' rule (wuerstchen_fast/testing/tolerance.py) applied to the whole model.
The exact answer is the torch backend in float64; "eager" is the torch backend in float32; ours is
the triton backend in float32. Ours may be at most FACTOR = 2 times eager's error plus the float32
floor, per tensor (max abs error): a fused model may reorder sums, as any equally valid float32
program does, but may not be less accurate than eager PyTorch. A comparison ours-vs-eager with a
fixed atol would either hide real errors in small gradients or fail on tensors whose eager error is
itself large (deep products of random weights), which is why the float64 model is the referee.

Also here: the TimestepBlock modulation folded into the preceding ResBlock op (Stage C's ResBlock and
Stage B's ResBlockStageB; `fold_modulation` on both models) equals the unfolded path, is really folded
(no separate modulate op in the graph), is not folded on the torch backend (diffusers' order, bit-exact
parity in tests/test_models_stages.py), and `torch.compile(fullgraph=True)` traces the folded Stage C
and Stage B and a Stage A decode with no graph break.
"""
import importlib

import pytest
import torch
import torch._dynamo

import wuerstchen_fast
from _fused_check import assert_model_grad, run_model
from conftest import DEVICE
from wuerstchen_fast.models.blocks import ResBlock, ResBlockStageB, TimestepBlock
from wuerstchen_fast.models.configs import StageAConfig, StageBConfig, StageCConfig
from wuerstchen_fast.models.stage_a import StageA
from wuerstchen_fast.models.stage_b import StageB
from wuerstchen_fast.models.stage_c import StageC
from wuerstchen_fast.ops import registry
from wuerstchen_fast.testing.random_models import randomize_
from wuerstchen_fast.testing.tolerance import assert_close_to_reference

HAS_TRITON = not registry.get_op("resblock").impls["triton"].available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")


def _stage_c(seed=1):
    m = randomize_(StageC(StageCConfig.tiny()), seed=seed)
    with torch.no_grad():  # keep b of the head (x − a)/(|1 − b| + 1e-5) away from 1 (still random)
        m.out[1].weight.mul_(0.1)
        m.out[1].bias.mul_(0.1)
    return m.eval().to(DEVICE)


def _stage_b(seed=2):
    m = randomize_(StageB(StageBConfig.tiny()), seed=seed)
    with torch.no_grad():  # keep sigmoid(b) of the head away from 1e-3 (still random)
        m.clf[1].weight.mul_(0.1)
        m.clf[1].bias.mul_(0.1)
    return m.eval().to(DEVICE)


def _stage_a(seed=3):
    return randomize_(StageA(StageAConfig.tiny()), seed=seed).eval().to(DEVICE)


def _inputs(stage, seed=0):
    g = torch.Generator().manual_seed(seed)
    if stage == "stage_c":
        cfg = StageCConfig.tiny()
        args = (torch.randn(2, cfg.c_in, 3, 5, generator=g), torch.rand(2, generator=g),
                torch.randn(2, 4, cfg.c_cond, generator=g))
    elif stage == "stage_b":
        cfg = StageBConfig.tiny()
        args = (torch.randn(2, cfg.c_in, 8, 12, generator=g), torch.rand(2, generator=g),
                torch.randn(2, cfg.effnet_embd, 3, 3, generator=g), torch.randn(2, 4, cfg.clip_embd, generator=g))
    else:
        args = (torch.randn(1, StageAConfig.tiny().latent_channels, 5, 3, generator=g),)
    return tuple(a.to(DEVICE) for a in args)


_BUILD = {"stage_c": _stage_c, "stage_b": _stage_b, "stage_a": _stage_a}


def _run(model, stage, args, backend, dtype):
    """(output, {name: grad}) of a fixed random projection of the output, on `backend` in `dtype`."""
    call = (lambda m, *a: m.decode(*a)) if stage == "stage_a" else (lambda m, *a: m(*a))
    return run_model(model, call, args, backend, dtype)


@pytest.mark.parametrize("stage", ["stage_c", "stage_b", "stage_a"])
def test_whole_model_triton_equals_torch(stage):
    model, args = _BUILD[stage](), _inputs(stage)
    exact_out, exact_g = _run(model, stage, [a.double() for a in args], "torch", torch.float64)
    eager_out, eager_g = _run(model, stage, args, "torch", torch.float32)
    out, g = _run(model, stage, args, "triton", torch.float32)
    assert_close_to_reference(out, eager_out, exact_out, f"{stage} output")
    assert set(g) == set(eager_g) == set(exact_g), sorted(set(g) ^ set(eager_g))
    assert len(g) > 10, sorted(g)  # every parameter took part
    for name in g:
        assert_model_grad(g[name], eager_g[name], exact_g[name], f"{stage} grad {name}")


def _graph_ops(fn, *args):
    """Run fn under torch.compile(fullgraph=True) and return (output, call_function targets seen)."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return torch.compile(fn, fullgraph=True, backend=backend)(*args), seen


def _foldable_pairs(model):
    """How many ResBlocks (either stage) are directly followed by a TimestepBlock in the model's block lists."""
    return sum(isinstance(a, (ResBlock, ResBlockStageB)) and isinstance(b, TimestepBlock)
               for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for a, b in zip(lst, lst[1:]))


@pytest.mark.parametrize("stage", ["stage_c", "stage_b"])
def test_folded_modulation_equals_unfolded(stage):
    m, args = _BUILD[stage](), _inputs(stage, seed=4)
    n_pairs = _foldable_pairs(m)
    assert n_pairs == (StageCConfig.tiny().depth if stage == "stage_c" else sum(StageBConfig.tiny().blocks) * 2)
    with torch.no_grad(), wuerstchen_fast.backend("triton"):
        folded, seen = _graph_ops(m.forward_raw, *args)
        m.fold_modulation = False
        unfolded, seen_unfolded = _graph_ops(m.forward_raw, *args)
    # Folded: the modulation runs in the ResBlock op's epilogue (float32 arithmetic on the same
    # values in the same order as the standalone modulate kernel), so the two paths agree to a few ulps.
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)
    assert sum("wuerstchen_fast.resblock" in t for t in seen) == n_pairs, seen
    assert not any("wuerstchen_fast.modulate" in t for t in seen), seen
    assert sum("wuerstchen_fast.modulate" in t for t in seen_unfolded) == n_pairs, seen_unfolded


@pytest.mark.parametrize("stage", ["stage_c", "stage_b"])
def test_torch_backend_never_folds(stage, monkeypatch):
    """The reference path keeps the separate modulate op (diffusers' order, bit-exact parity)."""
    R = importlib.import_module("wuerstchen_fast.ops.resblock")
    calls, real = [], R._call

    def spy(stage_b, name, *args):  # _call(stage_b, name, x, ..., b2, dropout, training, mod, eps, variant)
        calls.append((name, args[12]))
        return real(stage_b, name, *args)

    monkeypatch.setattr(R, "_call", spy)
    m, args = _BUILD[stage](), _inputs(stage)
    with torch.no_grad(), wuerstchen_fast.backend("torch"):
        out = m(*args)
        m.fold_modulation = False
        ref = m(*args)
    assert calls and all(name == "torch" and mod is None for name, mod in calls), calls
    assert torch.equal(out, ref)


def test_stage_a_decode_compiles_fullgraph_on_triton():
    m, (lat,) = _stage_a(), _inputs("stage_a")
    with torch.no_grad(), wuerstchen_fast.backend("triton"):
        out, seen = _graph_ops(m.decode, lat)
    with torch.no_grad(), wuerstchen_fast.backend("torch"):
        ref = m.decode(lat)
    assert any("wuerstchen_fast.norm_mod" in t for t in seen), seen
    assert any("wuerstchen_fast.mixing_dwconv" in t for t in seen), seen
    assert any("wuerstchen_fast.mixing_mlp" in t for t in seen), seen
    assert not any("gelu" in t or "linear" in t for t in seen), seen  # the MLP runs inside the op
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
