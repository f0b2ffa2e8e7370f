"""The CPU extension against eager PyTorch at the released shapes (bench/README.md).

What it answers: on a CPU, does the compiled extension (`cpu` backend, csrc/cpu/*.cpp) beat the
pure-PyTorch sequence it replaces (`eager`: the op's reference, the registry's `torch` impl)? Rows,
forward only, float32 (what a CPU runs), at the released v2 shapes even on a CPU (they are what a
CPU user runs; each op is memory-bound and takes milliseconds, not minutes):

    layer_norm_2d, modulate  Stage B level 0 (1x320x128x128), level 1 (1x640x64x64), Stage C block
                             (2x1536x24x24); (B, C, H, W) contiguous, as the blocks produce it
    dwconv_ln                the same shapes: the blocks' depthwise 3x3 conv + bias + LayerNorm2d
    grn                      the same blocks' 4c-wide hidden activations, (B, H, W, 4C) row-major
    ddpm_step                the Stage C step 2x16x24x24 (CFG: model output 4x32x24x24, guidance 4)
                             and the Stage B step 1x4x256x256 (model output 1x8x256x256, no CFG)
    norm_mod, mixing_dwconv  Stage A's mixing block at its top level, 1x192x256x256

Threads: both providers run at one pinned torch thread count (torch.set_num_threads; the extension's
at::parallel_for uses the same pool), WF_BENCH_THREADS or the process default; each row records it
as extra_info["threads"] and the group name carries it, so rows of one group compare like for like.
Bytes (GB/s): the floor a fused kernel must move: layer_norm_2d / modulate / norm_mod / dwconv_ln one
read, one write; grn two reads (statistics, then scale) and one write; ddpm_step x, model output and noise
read, x_prev written; mixing_dwconv x and xn read, output written.

Rows whose op has no `cpu` implementation (or an extension not built) skip with the registry's
reasons. CPU only: the file skips on a GPU run (bench/bench_ops_*.py cover the GPU providers).
"""
import os

import pytest
import torch

from bench.common import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the CPU extension's bench; run with WF_BENCH_DEVICE=cpu")

DTYPE = torch.float32
PROVIDERS = ("eager", "cpu")
THREADS = int(os.environ.get("WF_BENCH_THREADS", "0")) or torch.get_num_threads()
BLOCKS = {"stage_b0": (1, 320, 128, 128), "stage_b1": (1, 640, 64, 64), "stage_c": (2, 1536, 24, 24)}
DDPM = {  # name: (x shape, model-output batch factor, head, guidance, t, t_prev)
    "stage_c": ((2, 16, 24, 24), 2, "stage_c", 4.0, 0.6, 0.55),
    "stage_b": ((1, 4, 256, 256), 1, "stage_b", 1.0, 0.6, 0.5),
}
STAGE_A = (1, 192, 256, 256)


@pytest.fixture(autouse=True)
def pinned_threads():
    """Every row at THREADS torch threads, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)


def _gen(i):
    return torch.Generator().manual_seed(i)


def _shape(s):
    return "x".join(map(str, s))


def _run(benchmark, measure, op_provider, op, provider, sets, what, nbytes, **kw):
    fn = op_provider(op, provider, *sets[0], **kw)
    with torch.no_grad():
        out = measure(benchmark, lambda *a: fn(*a, **kw), sets,
                      group=f"{op} fwd {what} {str(DTYPE)[6:]} {THREADS}t", provider=provider,
                      baseline=provider == "eager", bytes=nbytes, threads=torch.get_num_threads())
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer_norm_2d(benchmark, measure, op_provider, n_input_sets, provider, block):
    shape = BLOCKS[block]
    numel = torch.Size(shape).numel()
    sets = [(torch.randn(shape, generator=_gen(i), dtype=DTYPE) * 2 + 0.5, 1e-6)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    _run(benchmark, measure, op_provider, "layer_norm_2d", provider, sets, f"{block} {_shape(shape)}",
         2 * numel * DTYPE.itemsize)


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_modulate(benchmark, measure, op_provider, n_input_sets, provider, block):
    B, C, H, W = shape = BLOCKS[block]
    numel = torch.Size(shape).numel()
    sets = [(torch.randn(shape, generator=_gen(i), dtype=DTYPE), torch.randn(B, C, generator=_gen(i)) * 0.3,
             torch.randn(B, C, generator=_gen(i)) * 0.3) for i in range(n_input_sets(numel * DTYPE.itemsize))]
    _run(benchmark, measure, op_provider, "modulate", provider, sets, f"{block} {_shape(shape)}",
         2 * numel * DTYPE.itemsize)


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dwconv_ln(benchmark, measure, op_provider, n_input_sets, provider, block):
    B, C, H, W = shape = BLOCKS[block]
    numel = torch.Size(shape).numel()
    sets = [(torch.randn(shape, generator=_gen(i), dtype=DTYPE), torch.randn(C, 1, 3, 3, generator=_gen(i)) / 3,
             torch.randn(C, generator=_gen(i)) * 0.3) for i in range(n_input_sets(numel * DTYPE.itemsize))]
    _run(benchmark, measure, op_provider, "dwconv_ln", provider, sets, f"{block} {_shape(shape)}",
         2 * numel * DTYPE.itemsize)


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_grn(benchmark, measure, op_provider, n_input_sets, provider, block):
    B, C, H, W = BLOCKS[block]
    N = 4 * C
    numel = B * H * W * N
    sets = [(torch.randn(B, H, W, N, generator=_gen(i), dtype=DTYPE),
             torch.randn(1, 1, 1, N, generator=_gen(i), dtype=DTYPE) * 0.3,
             torch.randn(1, 1, 1, N, generator=_gen(i), dtype=DTYPE) * 0.3)
            for i in range(n_input_sets(numel * DTYPE.itemsize))]
    _run(benchmark, measure, op_provider, "grn", provider, sets, f"{block} {B}x{H}x{W}x{N}",
         3 * numel * DTYPE.itemsize)


@pytest.mark.parametrize("case", sorted(DDPM))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ddpm_step(benchmark, measure, op_provider, n_input_sets, provider, case):
    shape, fb, head, guidance, t, tp = DDPM[case]
    B, C, H, W = shape
    mo_shape = (fb * B, 2 * C, H, W)

    def one(i):
        g = _gen(i)
        return (torch.randn(shape, generator=g, dtype=DTYPE), torch.randn(mo_shape, generator=g, dtype=DTYPE) * 0.3,
                torch.tensor(t), torch.tensor(tp), torch.randn(shape, generator=g, dtype=DTYPE))

    nbytes = (3 * torch.Size(shape).numel() + torch.Size(mo_shape).numel()) * DTYPE.itemsize
    out = _run(benchmark, measure, op_provider, "ddpm_step", provider, [one(i) for i in range(n_input_sets(nbytes))],
               f"{case} {_shape(shape)}", nbytes, guidance=guidance, head=head)
    assert out.shape == shape


@pytest.mark.parametrize("provider", PROVIDERS)
def test_norm_mod(benchmark, measure, op_provider, n_input_sets, provider):
    numel = torch.Size(STAGE_A).numel()
    sets = [(torch.randn(STAGE_A, generator=_gen(i), dtype=DTYPE) * 2 + 0.5, torch.tensor(0.3, dtype=DTYPE),
             torch.tensor(-0.2, dtype=DTYPE), 1e-6) for i in range(n_input_sets(numel * DTYPE.itemsize))]
    _run(benchmark, measure, op_provider, "norm_mod", provider, sets, f"stage_a {_shape(STAGE_A)}",
         2 * numel * DTYPE.itemsize)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_mixing_dwconv(benchmark, measure, op_provider, n_input_sets, provider):
    C = STAGE_A[1]
    numel = torch.Size(STAGE_A).numel()

    def one(i):
        g = _gen(i)
        return (torch.randn(STAGE_A, generator=g, dtype=DTYPE), torch.randn(STAGE_A, generator=g, dtype=DTYPE),
                torch.randn(C, 1, 3, 3, generator=g, dtype=DTYPE) / 3, torch.randn(C, generator=g, dtype=DTYPE) * 0.3,
                torch.tensor(0.7, dtype=DTYPE))

    _run(benchmark, measure, op_provider, "mixing_dwconv", provider,
         [one(i) for i in range(n_input_sets(2 * numel * DTYPE.itemsize))], f"stage_a {_shape(STAGE_A)}",
         3 * numel * DTYPE.itemsize)
