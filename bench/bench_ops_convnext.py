"""ConvNeXt family per-op benches: grn, modulate, dwconv_ln (depthwise conv + LayerNorm2d), resblock (Stage C, with the folded modulation) and
resblock_stage_b, each at the released shapes, every provider (bench/README.md).

Shapes (`released`, on a GPU, bfloat16): the Stage C block, c = 1536 at 24x24, batch 2 (CFG); the
Stage B levels at 1024x1024 (batch 1: the decoder runs without guidance), 128²x320, 64²x640 (+ the
1024-wide effnet skip), 32²x1280 (+ skip). grn runs on the blocks' 4c-wide hidden activations
(channels-last), modulate and dwconv_ln on the block inputs/outputs.

On a CPU (`small`, float32) the same layouts run scaled down (Stage C c = 256; Stage B 64²x32,
32²x64, 16²x128 with a 64-wide skip) so the eager and compile rows keep the CPU suite short, and the
compile rows of resblock are skipped unless WF_BENCH_CPU_COMPILE=1. Triton rows skip on a CPU (the
interpreter's timings mean nothing); cuda / cpu rows skip with the registry's reasons where the
extension lacks the op.

Providers: eager (the reference), compile (the reference under torch.compile(fullgraph=True)), and
per backend; the triton resblock appears twice, once per GEMM choice (`triton-cublas`: cuBLAS GEMMs
with fused Triton kernels around them; `triton-triton_gemm`: Triton GEMMs with fused prologue /
epilogues), so the registry's choice can be read off the table. Forward only.
Counts: resblock FLOPs = the two GEMMs + the depthwise conv; bytes = the floor a fused block must
move (x, skip, output, both weight matrices once); grn bytes = 3 passes over the hidden (two reads:
statistics then scale, one write); modulate and dwconv_ln bytes = one read and one write.
"""
import os

import pytest
import torch

from bench.common import DEVICE, OP_PROVIDERS
from wuerstchen_fast.ops import reference, registry
from wuerstchen_fast.ops.resblock import VARIANTS, _make_args

RELEASED = {"stage_c": [(2, 1536, 24, 24, 0)],
            "stage_b": [(1, 320, 128, 128, 0), (1, 640, 64, 64, 1024), (1, 1280, 32, 32, 1024)]}
SMALL = {"stage_c": [(2, 256, 24, 24, 0)],
         "stage_b": [(1, 32, 64, 64, 0), (1, 64, 32, 32, 64), (1, 128, 16, 16, 64)]}
SHAPES = RELEASED if DEVICE == "cuda" else SMALL
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ALL = [("stage_c",) + s for s in SHAPES["stage_c"]] + [("stage_b",) + s for s in SHAPES["stage_b"]]
IDS = [f"{st}-{B}x{C}x{H}x{W}" + (f"+{cs}" if cs else "") for st, B, C, H, W, cs in ALL]
RES_PROVIDERS = [p for p in OP_PROVIDERS if p != "triton"] + [f"triton-{v}" for v in VARIANTS]


def _name(B, C, H, W):
    return f"{B}x{C}x{H}x{W} {str(DTYPE)[6:]}"


def _gen(i):
    return torch.Generator(device=DEVICE).manual_seed(i)


@pytest.mark.parametrize("shape", ALL, ids=IDS)
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_grn(benchmark, measure, op_provider, n_input_sets, provider, shape):
    _, B, C, H, W, _ = shape
    N = 4 * C
    numel = B * H * W * N
    sets = [(torch.randn(B, H, W, N, generator=_gen(i), device=DEVICE, dtype=DTYPE),
             torch.randn(1, 1, 1, N, generator=_gen(i), device=DEVICE, dtype=DTYPE) * 0.3,
             torch.randn(1, 1, 1, N, generator=_gen(i), device=DEVICE, dtype=DTYPE) * 0.3)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    fn = op_provider("grn", provider, *sets[0])
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"grn fwd {B}x{H}x{W}x{N} {str(DTYPE)[6:]} channels_last",
                      provider=provider, baseline=provider == "eager", bytes=3 * numel * DTYPE.itemsize)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", ALL, ids=IDS)
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_modulate(benchmark, measure, op_provider, n_input_sets, provider, shape):
    _, B, C, H, W, _ = shape
    numel = B * C * H * W
    sets = [(torch.randn(B, C, H, W, generator=_gen(i), device=DEVICE, dtype=DTYPE),
             torch.randn(B, C, generator=_gen(i), device=DEVICE, dtype=DTYPE) * 0.3,
             torch.randn(B, C, generator=_gen(i), device=DEVICE, dtype=DTYPE) * 0.3)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    fn = op_provider("modulate", provider, *sets[0])
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"modulate fwd {_name(B, C, H, W)}", provider=provider,
                      baseline=provider == "eager", bytes=2 * numel * DTYPE.itemsize)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", ALL, ids=IDS)
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_dwconv_ln(benchmark, measure, op_provider, n_input_sets, provider, shape):
    _, B, C, H, W, _ = shape
    numel = B * C * H * W
    sets = [(torch.randn(B, C, H, W, generator=_gen(i), device=DEVICE, dtype=DTYPE),
             torch.randn(C, 1, 3, 3, generator=_gen(i), device=DEVICE, dtype=DTYPE) / 3,
             torch.randn(C, generator=_gen(i), device=DEVICE, dtype=DTYPE) * 0.3)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    fn = op_provider("dwconv_ln", provider, *sets[0])
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"dwconv_ln fwd {_name(B, C, H, W)}", provider=provider,
                      baseline=provider == "eager", flops=2 * 9 * numel, bytes=2 * numel * DTYPE.itemsize)
    assert torch.isfinite(out).all()


def _resblock_sets(stage_b, B, C, H, W, cs, n_sets_for):
    """Input sets (x, skip, 8 weights[, mod_a, mod_b]): Stage C carries its folded modulation."""
    def one(i):
        g = torch.Generator().manual_seed(i)
        args = [t.detach() if t is not None else None
                for t in _make_args(g, B, C, H, W, cs, DTYPE, False, stage_b, DEVICE)]
        if not stage_b:
            args += list((torch.randn(B, 2 * C, generator=g) * 0.3).to(DEVICE, DTYPE).chunk(2, dim=1))
        return tuple(args)

    first = one(0)
    nbytes = sum(t.numel() * t.element_size() for t in first if t is not None)
    return [first] + [one(i) for i in range(1, n_sets_for(nbytes))], nbytes


def _resblock_fn(stage_b, provider, op_provider, args):
    op = "resblock_stage_b" if stage_b else "resblock"
    ref = reference.resblock_stage_b if stage_b else reference.resblock
    if stage_b:
        def eager(*a):
            return ref(*a)
    else:
        def eager(*a):  # the block, then the TimestepBlock that follows it
            return reference.modulate(ref(*a[:10]), a[10], a[11])
    if provider == "eager":
        return eager
    if provider == "compile":
        if DEVICE != "cuda" and not os.environ.get("WF_BENCH_CPU_COMPILE"):
            pytest.skip("compile rows of resblock run on a GPU; set WF_BENCH_CPU_COMPILE=1 for them on a CPU")
        return torch.compile(eager, fullgraph=True, dynamic=False)
    backend, _, variant = provider.partition("-")
    kw = {} if stage_b else {"mod": args[10:12]}
    call = op_provider(op, backend, *args[:10], **kw)  # skips with the registry's reasons
    extra = {"variant": variant} if variant else {}
    if stage_b:
        return lambda *a: call(*a, **extra)
    return lambda *a: call(*a[:10], mod=a[10:12], **extra)


@pytest.mark.parametrize("shape", ALL, ids=IDS)
@pytest.mark.parametrize("provider", RES_PROVIDERS)
def test_resblock(benchmark, measure, op_provider, n_input_sets, provider, shape):
    stage, B, C, H, W, cs = shape
    stage_b = stage == "stage_b"
    sets, nbytes = _resblock_sets(stage_b, B, C, H, W, cs, n_input_sets)
    fn = _resblock_fn(stage_b, provider, op_provider, sets[0])
    M, K1 = B * H * W, (C + cs if stage_b else C)
    flops = 2 * M * K1 * 4 * C + 2 * M * 4 * C * C + 2 * M * C * 9 * ((C + cs) // C if not stage_b else 1)
    floor = nbytes + B * C * H * W * DTYPE.itemsize  # every input once (weights included), output once
    name = "resblock (+ modulation)" if not stage_b else "resblock_stage_b"
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"{name} fwd {_name(B, C, H, W)}" + (f" skip {cs}" if cs else ""),
                      provider=provider, baseline=provider == "eager", flops=flops, bytes=floor)
    assert out.shape == (B, C, H, W) and torch.isfinite(out).all()
