"""ops.ddpm_step (model head + CFG + DDPM update) on every backend here, against the float64 reference.

Matrix: heads eps / stage_c / stage_b x with and without CFG x float32/bfloat16/float16, odd
shapes, strided and channels-last inputs, per-batch t, t warped by `scaler`, and the last step
(t_prev = 0: noise masked out). Error bound: the rule in wuerstchen_fast/testing/tolerance.py.
Then the sampler: DenoiseLoop with the fused op on Triton gives the torch backend's latents.
"""
import pytest
import torch

import wuerstchen_fast
from conftest import DEVICE
from wuerstchen_fast.diffusion import DenoiseLoop, make_timesteps
from wuerstchen_fast.ops import ddpm_step, reference, registry
from wuerstchen_fast.testing.tolerance import assert_close_to_reference

BACKENDS = [b for b in ("triton", "cpu", "cuda") if b in registry.get_op("ddpm_step").impls
            and not registry.get_op("ddpm_step").impls[b].available()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, head, cfg, dtype, layout="contiguous", t=0.6, t_prev=0.45, seed=0):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    nb, nc = (2 * B if cfg else B), (C if head == "eps" else 2 * C)
    x = torch.randn(B, C, H, W, generator=g)
    mo = torch.randn(nb, nc, H, W, generator=g)
    if head == "stage_c":  # keep |1 - b| away from 0: the head divides by it (eps=1e-5)
        mo[:, C:] = mo[:, C:].abs() + 1.5
    nz = torch.randn(B, C, H, W, generator=g)
    x, mo, nz = (v.to(DEVICE, dtype) for v in (x, mo, nz))
    if layout == "channels_last":
        x, mo, nz = (v.contiguous(memory_format=torch.channels_last) for v in (x, mo, nz))
    elif layout == "strided":  # non-dense views: every other column of wider tensors
        x, mo, nz = (torch.cat([v, v], dim=-1)[..., ::2] for v in (x, mo, nz))
    t = torch.as_tensor(t, dtype=torch.float32, device=DEVICE)
    t_prev = torch.as_tensor(t_prev, dtype=torch.float32, device=DEVICE)
    return x, mo, t, t_prev, nz


def _check(backend, shape, head, cfg, dtype, layout="contiguous", **kw):
    scaler = kw.pop("scaler", 1.0)
    x, mo, t, tp, nz = _inputs(shape, head, cfg, dtype, layout, **kw)
    w = 4.0 if cfg else 1.0
    # float64 throughout, the schedule too (alpha_cumprod keeps a float64 t in float64)
    exact = reference.ddpm_step_fused(x.double(), mo.double(), t.double(), tp.double(), nz.double(), w, head,
                                      scaler=scaler)
    eager = reference.ddpm_step_fused(x, mo, t, tp, nz, w, head, scaler=scaler)
    ours = ddpm_step(x, mo, t, tp, nz, guidance=w, head=head, scaler=scaler, backend=backend)
    assert_close_to_reference(ours, eager, exact.to(torch.float64), f"{backend} {shape} {head} cfg={cfg} {dtype} {layout}")
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["eps", "stage_c", "stage_b"])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, head, cfg, dtype):
    _check(backend, (2, 16, 5, 7), head, cfg, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (3, 5, 3, 9)], ids=lambda s: "x".join(map(str, s)))
def test_layouts_and_odd_shapes(backend, layout, shape):
    out = _check(backend, shape, "stage_c", True, torch.float32, layout)
    x = _inputs(shape, "stage_c", True, torch.float32, layout)[0]
    # The output layout rule (ops/layout.py): contiguous stays contiguous, channels-last stays it.
    assert out.stride() == wuerstchen_fast.ops.layout.empty_out_like(x).stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_batch_t_last_step_and_scaler(backend):
    _check(backend, (3, 4, 2, 3), "stage_b", False, torch.float32, t=[0.9, 0.5, 0.2], t_prev=[0.7, 0.3, 0.0])
    out = _check(backend, (1, 4, 2, 3), "eps", True, torch.float32, t=0.2, t_prev=0.0)  # no noise at the end
    x, mo, t, tp, _ = _inputs((1, 4, 2, 3), "eps", True, torch.float32, t=0.2, t_prev=0.0)
    torch.testing.assert_close(out, ddpm_step(x, mo, t, tp, torch.zeros_like(x), guidance=4.0, backend=backend))
    for scaler in (0.5, 2.0):
        _check(backend, (2, 3, 2, 2), "stage_c", False, torch.float32, scaler=scaler)


def test_torch_backend_is_the_unfused_chain_bit_for_bit():
    """head -> lerp -> diffusion.ddpm_step exactly as the models and the loop used to run it."""
    from wuerstchen_fast.diffusion import ddpm_step as plain_step
    from wuerstchen_fast.models.stage_c import StageC  # noqa: F401  (the head lives in the reference)

    x, mo, t, tp, nz = _inputs((2, 4, 3, 3), "stage_c", True, torch.float32)
    xx = torch.cat([x, x])
    a, b = mo.chunk(2, dim=1)
    eps_c, eps_u = ((xx - a) / ((1 - b).abs() + 1e-5)).chunk(2)
    expected = plain_step(x, torch.lerp(eps_u, eps_c, 4.0), t, tp, nz)
    assert torch.equal(ddpm_step(x, mo, t, tp, nz, guidance=4.0, head="stage_c", backend="torch"), expected)


def test_rejects_bad_input():
    x, mo, t, tp, nz = _inputs((2, 4, 3, 3), "stage_b", False, torch.float32)
    with pytest.raises(ValueError, match=r"model_out must be \(2 or 4, 8, 3, 3\)"):
        ddpm_step(x, mo[:, :4], t, tp, nz, head="stage_b")
    with pytest.raises(registry.BackendUnavailableError, match="one value or one per batch"):
        ddpm_step(x, mo, torch.zeros(3), tp, nz, head="stage_b", backend="triton")


# ------------------------------------------------------------------------------ the sampler


class _HeadDenoiser(torch.nn.Module):
    """A toy stage with an output head: forward_raw gives (B, 2C, H, W), forward applies the head."""

    def __init__(self, head):
        super().__init__()
        self.eps_head = head
        self.w = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(3)) * 0.3)

    def forward_raw(self, x, r, cond):
        h = torch.einsum("oc,bchw->bohw", self.w, x) + r.view(-1, 1, 1, 1) + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        a, b = torch.tanh(h).chunk(2, dim=1)  # bounded heads: |1 - b| >= 0.5, sigmoid(b) >= 0.5
        return torch.cat([a, b * 0.5 if self.eps_head == "stage_c" else b + 1], dim=1)

    def forward(self, x, r, cond):
        return reference.ddpm.apply_head(self.eps_head, x, self.forward_raw(x, r, cond))


@pytest.mark.parametrize("head,w", [("stage_c", 4.0), ("stage_b", 0.0), ("stage_b", 2.5)])
def test_sampler_with_fused_step_equals_torch_backend(head, w):
    model = _HeadDenoiser(head).to(DEVICE)
    B = 2
    cond = torch.randn(2 * B if w > 1 else B, 5, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x0 = torch.randn(B, 4, 3, 5, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ts = make_timesteps(4, device=DEVICE)
    runs = {}
    for name in ("torch", "triton"):
        with wuerstchen_fast.backend(name):
            loop = DenoiseLoop(model, w)
            assert loop._head == head
            runs[name] = loop(x0, ts, (cond,), torch.Generator().manual_seed(11), progress=False)
    # fp32 through 4 steps: the fused head and lerp round once instead of per op (~1e-7 relative per
    # step), and the early steps' α^-½ (up to ~100 at t = 1) scales that up to a few 1e-6 relative.
    torch.testing.assert_close(runs["triton"], runs["torch"], rtol=1e-5, atol=1e-5)
    # and without the fused head (the plain callable path) the torch backend gives the same bits
    with wuerstchen_fast.backend("torch"):
        plain = DenoiseLoop(model.forward, w)(x0, ts, (cond,), torch.Generator().manual_seed(11), progress=False)
    assert torch.equal(plain, runs["torch"])
