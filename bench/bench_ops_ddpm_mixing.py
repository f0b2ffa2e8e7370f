"""ddpm_step and the Stage A mixing block: per-op benches, every provider (bench/README.md).

ddpm_step (model head + CFG lerp + DDPM update, one kernel on triton): the Stage C step at 2x16x24x24
(model output 4x32x24x24: [cond, uncond], guidance 4, the |1 − b| head) and the Stage B step at
1x4x256x256 (model output 1x8x256x256, no guidance, the sigmoid head). Bytes: x, model output and
noise read once, x_prev written once. The shapes are the released ones on a CPU too (they are small).

Stage A mixing (MixingResidualBlock at 256²x192, the decoder's top level at 1024x1024, batch 1):
`norm_mod` (LayerNorm + scalar modulation, bytes: one read, one write), `mixing_mlp` (the block's second
branch: norm_mod + MLP 192 -> 768 -> 192 + gamma + residual, both triton variants "cublas" and
"triton_gemm"; FLOPs: the two GEMMs; bytes: x read once, out written once, the floor a fully fused
kernel would reach) and the whole block (two
norm_mods, the replication-padded depthwise conv, the MLP 192 -> 768 -> 192 and the gamma-scaled
residuals; FLOPs: the two GEMMs + the conv) with every op on the eager reference, under
torch.compile, and on the triton backend. On a CPU (`small`, float32) the mixing rows run at 64²x192
so the CPU suite stays short; the block's and mixing_mlp's compile rows are skipped there unless
WF_BENCH_CPU_COMPILE=1.
Triton rows skip on a CPU (interpreter timings mean nothing).
"""
import os

import pytest
import torch

import wuerstchen_fast
from bench.common import DEVICE, OP_PROVIDERS, skip_unless_backend_available
from wuerstchen_fast.models.stage_a import MixingResidualBlock
from wuerstchen_fast.ops import registry
from wuerstchen_fast.testing.random_models import randomize_

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
MIX_HW = 256 if DEVICE == "cuda" else 64
MIX_C = 192
DDPM = {  # name: (x shape, model-output batch factor, head, guidance, t, t_prev)
    "stage_c": ((2, 16, 24, 24), 2, "stage_c", 4.0, 0.6, 0.55),
    "stage_b": ((1, 4, 256, 256), 1, "stage_b", 1.0, 0.6, 0.5),
}


def _gen(i):
    return torch.Generator(device=DEVICE).manual_seed(i)


@pytest.mark.parametrize("case", sorted(DDPM))
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_ddpm_step(benchmark, measure, op_provider, n_input_sets, provider, case):
    shape, fb, head, guidance, t, tp = DDPM[case]
    B, C, H, W = shape
    mo_shape = (fb * B, 2 * C, H, W)

    def one(i):
        g = _gen(i)
        return (torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE),
                torch.randn(mo_shape, generator=g, device=DEVICE, dtype=DTYPE) * 0.3,
                torch.tensor(t, device=DEVICE), torch.tensor(tp, device=DEVICE),
                torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE))

    numel = torch.Size(shape).numel()
    nbytes = (3 * numel + torch.Size(mo_shape).numel()) * DTYPE.itemsize
    sets = [one(i) for i in range(n_input_sets(nbytes))]
    kw = dict(guidance=guidance, head=head)
    fn = op_provider("ddpm_step", provider, *sets[0], **kw)
    with torch.no_grad():
        out = measure(benchmark, lambda *a: fn(*a, **kw), sets,
                      group=f"ddpm_step {case} {'x'.join(map(str, shape))} {str(DTYPE)[6:]}",
                      provider=provider, baseline=provider == "eager", bytes=nbytes)
    assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_norm_mod(benchmark, measure, op_provider, n_input_sets, provider):
    shape = (1, MIX_C, MIX_HW, MIX_HW)
    numel = torch.Size(shape).numel()
    sets = [(torch.randn(shape, generator=_gen(i), device=DEVICE, dtype=DTYPE) * 2 + 0.5,
             torch.tensor(0.3, device=DEVICE, dtype=DTYPE), torch.tensor(-0.2, device=DEVICE, dtype=DTYPE), 1e-6)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    fn = op_provider("norm_mod", provider, *sets[0])
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"norm_mod fwd {'x'.join(map(str, shape))} {str(DTYPE)[6:]}",
                      provider=provider, baseline=provider == "eager", bytes=2 * numel * DTYPE.itemsize)
    assert torch.isfinite(out).all()


MLP_PROVIDERS = [p for p in OP_PROVIDERS if p != "triton"] + ["triton-cublas", "triton-triton_gemm"]


@pytest.mark.parametrize("provider", MLP_PROVIDERS)
def test_mixing_mlp(benchmark, measure, op_provider, n_input_sets, provider):
    """The block's second branch alone: x + MLP(LN(x)·(1 + s) + t)·g at 256²x192, hidden 768. Both
    triton variants are timed so that `ops.mixing_mlp.record_variant` can be filled from a GPU run."""
    if provider == "compile" and DEVICE != "cuda" and not os.environ.get("WF_BENCH_CPU_COMPILE"):
        pytest.skip("mixing_mlp's compile row runs on a GPU; set WF_BENCH_CPU_COMPILE=1 for it on a CPU")
    from wuerstchen_fast.ops.mixing_mlp import _make_args

    shape = (1, MIX_C, MIX_HW, MIX_HW)
    numel = torch.Size(shape).numel()
    sets = [_make_args(torch.Generator().manual_seed(i), *shape, DTYPE, False, DEVICE)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    backend, _, variant = provider.partition("-")
    call = op_provider("mixing_mlp", backend, *sets[0])
    fn = (lambda *a: call(*a, variant=variant)) if variant else call
    M, N = MIX_HW * MIX_HW, 4 * MIX_C
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"mixing_mlp fwd {'x'.join(map(str, shape))} {str(DTYPE)[6:]}",
                      provider=provider, baseline=provider == "eager", flops=2 * (2 * M * MIX_C * N),
                      bytes=2 * numel * DTYPE.itemsize)
    assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("provider", ["eager", "compile", "triton", "cuda", "cpu"])
def test_mixing_block(benchmark, measure, n_input_sets, provider):
    """The whole MixingResidualBlock; every registered op inside runs on `provider` where it has that backend,
    else on the reference (`provider,torch`: e.g. mixing_mlp has no cpu or cuda kernel, only Triton)."""
    if provider in ("triton", "cuda", "cpu"):
        if provider not in registry.get_op("norm_mod").impls:
            pytest.skip(f"norm_mod has no {provider} implementation")
        skip_unless_backend_available(provider, "norm_mod")
    if provider == "compile" and DEVICE != "cuda" and not os.environ.get("WF_BENCH_CPU_COMPILE"):
        pytest.skip("the mixing block's compile row runs on a GPU; set WF_BENCH_CPU_COMPILE=1 for it on a CPU")
    block = randomize_(MixingResidualBlock(MIX_C, 4 * MIX_C), seed=0).eval().to(DEVICE, DTYPE)
    shape = (1, MIX_C, MIX_HW, MIX_HW)
    numel = torch.Size(shape).numel()
    sets = [(torch.randn(shape, generator=_gen(i), device=DEVICE, dtype=DTYPE),)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    backend = "torch" if provider in ("eager", "compile") else f"{provider},torch"

    def run(x):
        with wuerstchen_fast.backend(backend):
            return block(x)

    fn = torch.compile(run, fullgraph=True, dynamic=False) if provider == "compile" else run
    M = MIX_HW * MIX_HW
    flops = 2 * (2 * M * MIX_C * 4 * MIX_C) + 2 * M * MIX_C * 9
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"mixing block fwd {'x'.join(map(str, shape))} {str(DTYPE)[6:]}",
                      provider=provider, baseline=provider == "eager", flops=flops, bytes=2 * numel * DTYPE.itemsize)
    assert out.shape == shape and torch.isfinite(out).all()
