"""attn_block (LayerNorm2d + Q/K/V + kv_mapper + two-source attention + out-proj + residual): every provider.

Shapes from the released configs: Stage C v2 (c=1536, 24 heads of 64, 24x24 image tokens, 77 text
tokens of width c_cond=c, batch 2 for CFG) and Stage B v2 level 1 (c=640, 10 heads, 64x64 image tokens,
77 CLIP tokens of width 1024). On a CPU the suite runs the Stage C block at width 384 (6 heads) on a
12x12 grid: the released width costs seconds per call in eager there, and Triton's interpreter is
never timed. The triton provider runs both attention cores ("flash": our kernel; "sdpa": PyTorch's)
so that `ops.attention.record_variant` can be filled from a GPU run.

FLOPs counted in code: the projections (Q, K, V over image + text tokens, kv_mapper, out) and the
attention itself (QK^T and PV: 4·B·N_q·N_kv·C).
"""
import pytest
import torch

from bench.common import OP_PROVIDERS

CASES = {  # name: (B, C, H, W, heads, text tokens, c_cond)
    "stage_c": (2, 1536, 24, 24, 24, 77, 1536),
    "stage_b_l1": (2, 640, 64, 64, 10, 77, 1024),
}
SMALL = {"stage_c": (2, 384, 12, 12, 6, 77, 384)}


def _flops(B, C, N, T, c_cond):
    nkv = N + T
    proj = 2 * B * (N * C * C + 2 * nkv * C * C + T * c_cond * C + N * C * C)  # q, k+v, kv_mapper, out
    return proj + 4 * B * N * nkv * C


def _inputs(case, device, dtype, seed):
    B, C, H, W, heads, T, c_cond = case
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device, dtype=dtype) * scale  # noqa: E731
    w = C ** -0.5
    return (r(B, C, H, W), r(B, T, c_cond), r(C, C, scale=w), r(C), r(C, C, scale=w), r(C), r(C, C, scale=w), r(C),
            r(C, C, scale=w), r(C), r(C, c_cond, scale=c_cond ** -0.5), r(C), heads)


PROVIDERS = [p for p in OP_PROVIDERS if p != "triton"] + ["triton-flash", "triton-sdpa"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_attn_block_fwd(benchmark, measure, op_provider, n_input_sets, bench_device, bench_size, provider, case):
    shapes = CASES if bench_size == "released" else SMALL
    if case not in shapes:
        pytest.skip(f"{case}: released size only (bench size {bench_size})")
    B, C, H, W, heads, T, c_cond = shapes[case]
    dtype = torch.bfloat16 if bench_device == "cuda" else torch.float32
    first = _inputs(shapes[case], bench_device, dtype, 0)
    per_set = sum(t.numel() * t.element_size() for t in first[:2])
    sets = [first] + [_inputs(shapes[case], bench_device, dtype, s) for s in range(1, n_input_sets(per_set))]
    backend, _, variant = provider.partition("-")
    fn = op_provider("attn_block", backend, *first)
    if variant:
        base = fn
        fn = lambda *a: base(*a, variant=variant)  # noqa: E731
    with torch.no_grad():
        out = measure(benchmark, fn, sets, group=f"attn_block fwd {case} B{B} C{C} {H}x{W}+{T} {str(dtype)[6:]}",
                      provider=provider, baseline=provider == "eager", flops=_flops(B, C, H * W, T, c_cond))
    assert out.shape == (B, C, H, W) and torch.isfinite(out).all()
