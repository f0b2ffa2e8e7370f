"""layer_norm_2d forward at Stage B level 0 (1 x 320 x 128 x 128, 1024x1024 images): every provider.

The example per-op bench (bench/README.md): providers from bench.common.OP_PROVIDERS, the eager
reference as the baseline, bytes written in code. The op is memory-bound (a few FLOPs per element),
so the figure of merit is GB/s against the measured copy bandwidth: the floor is one read of x and
one write of y.
"""
import pytest
import torch

from bench.common import OP_PROVIDERS

SHAPE = (1, 320, 128, 128)  # Stage B v2, level 0, at 1024x1024 (256x256 latents, patch 2)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_layer_norm_2d_fwd(benchmark, measure, op_provider, n_input_sets, bench_device, provider, layout):
    dtype = torch.bfloat16 if bench_device == "cuda" else torch.float32
    numel = torch.Size(SHAPE).numel()
    nbytes = 2 * numel * dtype.itemsize  # read x once, write y once

    g = torch.Generator(device=bench_device).manual_seed(0)
    sets = [((torch.randn(SHAPE, generator=g, device=bench_device, dtype=dtype) * 2 + 0.5)
             .contiguous(memory_format=LAYOUTS[layout]), 1e-6)
            for _ in range(n_input_sets(numel * dtype.itemsize))]
    fn = op_provider("layer_norm_2d", provider, *sets[0])
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"layer_norm_2d fwd {'x'.join(map(str, SHAPE))} "
                      f"{str(dtype)[6:]} {layout}", provider=provider, baseline=provider == "eager", bytes=nbytes)
    assert out.shape == SHAPE and torch.isfinite(out).all()
