"""The schedule, the DDPM step and the denoising loop against diffusers' DDPMWuerstchenScheduler."""
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from wuerstchen_fast.diffusion import (
    DEFAULT_STAGE_C_TIMESTEPS,
    DenoiseLoop,
    add_noise,
    alpha_cumprod,
    ddpm_step,
    make_timesteps,
)


@pytest.mark.parametrize("scaler", [1.0, 0.5, 2.0])
def test_alpha_cumprod_matches_scheduler(scaler):
    sched = DDPMWuerstchenScheduler(scaler=scaler)
    t = torch.linspace(0, 1, 1001)
    torch.testing.assert_close(alpha_cumprod(t, scaler=scaler), sched._alpha_cumprod(t, "cpu"), rtol=0, atol=0)
    assert float(alpha_cumprod(torch.tensor(1.0))) == pytest.approx(1e-4)  # clamped at pure noise
    assert float(alpha_cumprod(torch.tensor(0.0))) == pytest.approx(0.9999)  # clamped at data


def test_default_stage_c_timesteps():
    assert len(DEFAULT_STAGE_C_TIMESTEPS) == 30  # 29 model evaluations + the final 0
    assert DEFAULT_STAGE_C_TIMESTEPS[0] == 1.0 and DEFAULT_STAGE_C_TIMESTEPS[-1] == 0.0
    assert DEFAULT_STAGE_C_TIMESTEPS[19] == pytest.approx(2 / 3)


def test_add_noise_matches_scheduler():
    sched = DDPMWuerstchenScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 3, 5, 6, generator=g)
    t = torch.tensor([0.0, 0.3, 0.77, 1.0])
    torch.testing.assert_close(add_noise(x0, noise, t), sched.add_noise(x0, noise, t), rtol=0, atol=0)


@pytest.mark.parametrize("t_idx", [0, 3, 4])  # 4 -> the last step: no noise added
def test_ddpm_step_matches_scheduler(t_idx):
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    t = sched.timesteps[t_idx].expand(2)
    ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ours = ddpm_step(x, eps, sched.timesteps[t_idx], sched.timesteps[t_idx + 1], noise)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    if t_idx == 4:  # deterministic final step
        torch.testing.assert_close(ddpm_step(x, eps, t[0], torch.tensor(0.0), torch.zeros_like(x)), ref)


class _ToyDenoiser(torch.nn.Module):
    """eps = tanh(W x + c·r) + mean(cond): depends on x, r and the conditioning like a real stage."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.3)

    def forward(self, x, r, cond):
        h = torch.einsum("oc,bchw->bohw", self.w, x) + r.view(-1, 1, 1, 1)
        return torch.tanh(h) + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _diffusers_loop(model, sched, x, cond, w, generator):
    do_cfg = w > 1
    for t in sched.timesteps[:-1]:
        r = t.expand(x.shape[0])
        eps = model(torch.cat([x, x]) if do_cfg else x, torch.cat([r, r]) if do_cfg else r, cond)
        if do_cfg:
            ec, eu = eps.chunk(2)
            eps = torch.lerp(eu, ec, w)
        x = sched.step(eps, r, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize(
    "steps,timesteps,w",
    [(6, None, 0.0), (6, None, 1.0), (4, None, 4.0), (None, DEFAULT_STAGE_C_TIMESTEPS, 4.0), (None, [1.0, 0.6, 0.2, 0.0], 2.5)],
)
def test_loop_matches_diffusers_scheduler_chain(steps, timesteps, w):
    model = _ToyDenoiser()
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(steps, timesteps=timesteps)
    B = 2
    cond = torch.randn(2 * B if w > 1 else B, 5, 8, generator=torch.Generator().manual_seed(5))
    x0 = torch.randn(B, 4, 3, 5, generator=torch.Generator().manual_seed(9))
    ref = _diffusers_loop(model, sched, x0, cond, w, torch.Generator().manual_seed(11))
    loop = DenoiseLoop(model, w)
    ours = loop(x0, make_timesteps(steps, timesteps), (cond,), torch.Generator().manual_seed(11), progress=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_generator_advances_like_diffusers():
    """The last step draws (and discards) noise, so the stream after the chain matches diffusers."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    model = _ToyDenoiser()
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(3)
    x0, cond = torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 8)
    _diffusers_loop(model, sched, x0, cond, 0.0, g1)
    DenoiseLoop(model)(x0, make_timesteps(3), (cond,), g2, progress=False)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


def test_callback_can_replace_latents():
    seen = []

    def cb(i, t, x):
        seen.append((i, float(t)))
        return torch.zeros_like(x)

    out = DenoiseLoop(_ToyDenoiser())(
        torch.randn(1, 4, 2, 2), make_timesteps(2), (torch.zeros(1, 3, 8),), callback=cb, progress=False
    )
    assert seen == [(0, 1.0), (1, 0.5)] and torch.equal(out, torch.zeros_like(out))


def test_compiled_step_equals_eager():
    model = _ToyDenoiser()
    x0, cond = torch.randn(1, 4, 3, 3), torch.randn(2, 3, 8)
    ts = make_timesteps(3)
    eager = DenoiseLoop(model, 3.0)(x0, ts, (cond,), torch.Generator().manual_seed(2), progress=False)
    compiled = DenoiseLoop(model, 3.0, compile=True)(x0, ts, (cond,), torch.Generator().manual_seed(2), progress=False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=0), "positive int"),
        (dict(num_steps=-3), "positive int"),
        (dict(num_steps=2.5), "positive int"),
        (dict(timesteps=[1.0]), "at least 2"),
        (dict(timesteps=[1.0, 0.5, 0.7, 0.0]), "strictly decreasing"),
        (dict(timesteps=[1.5, 0.0]), r"\[0, 1\]"),
    ],
)
def test_make_timesteps_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_timesteps(**kwargs)
