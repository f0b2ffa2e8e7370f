"""Parity of Stage C / Stage B / Stage A with diffusers at small random configs, through every loader path:
diffusers folder (save_pretrained), original dome272 .pt layout, and our own format (save_stage)."""
from __future__ import annotations

import pytest
import torch

from _model_factories import (PARITY_RTOL, make_diffusers_decoder, make_diffusers_prior, make_diffusers_vqgan,
                              relative_error)
from wuerstchen_fast.models import (StageA, StageB, StageC, load_stage_a, load_stage_b, load_stage_c, save_stage,
                                    to_original_layout)

PRIOR_CONFIGS = {
    "c64_d2_h4": dict(c=64, c_cond=48, depth=2, nhead=4),
    "c96_d3_h2_cr32": dict(c=96, c_cond=40, c_r=32, depth=3, nhead=2),
    "c128_d1_h2_head64": dict(c=128, c_cond=64, c_in=8, depth=1, nhead=2),
}
DECODER_CONFIGS = {
    "3lvl_inject_lower": {},
    "2lvl_inject_all_CTA_top": dict(c_hidden=[16, 24], nhead=[2, 3], blocks=[2, 1], level_config=["CTA", "CTA"],
                                    inject_effnet=[True, True], c_cond=24, clip_embd=16, c_r=32),
    "4lvl_mixed_injection_k5": dict(c_hidden=[8, 16, 16, 32], nhead=[-1, 2, 4, 4], blocks=[1, 1, 1, 1],
                                    level_config=["CT", "CT", "CTA", "CTA"], inject_effnet=[False, True, False, True],
                                    kernel_size=5, effnet_embd=8),
    "patch1_c8": dict(patch_size=1, c_in=8, c_out=8, c_hidden=[16, 32], nhead=[-1, 4], blocks=[1, 2],
                          level_config=["CT", "CTA"], inject_effnet=[False, True]),
}
VQGAN_CONFIGS = {
    "2lvl": {},
    "3lvl_c48_lat8": dict(levels=3, embed_dim=48, bottleneck_blocks=1, latent_channels=8, num_vq_embeddings=32),
    "1lvl": dict(levels=1, embed_dim=16, bottleneck_blocks=3),
}


def _prior_inputs(m, b=2, h=5, w=7, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = m.config
    return (torch.randn(b, cfg.c_in, h, w, generator=g), torch.rand(b, generator=g),
            torch.randn(b, t, cfg.c_cond, generator=g))


def _decoder_inputs(m, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = m.config
    f = cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)
    h, w = 2 * f, 3 * f  # non-square
    return (torch.randn(b, cfg.c_in, h, w, generator=g), torch.rand(b, generator=g),
            torch.randn(b, cfg.effnet_embd, 3, 5, generator=g), torch.randn(b, 6, cfg.clip_embd, generator=g))


def _save_original(model, path):
    torch.save({"state_dict": to_original_layout(model.state_dict())}, path)
    return path


@pytest.mark.parametrize("name", sorted(PRIOR_CONFIGS))
def test_stage_c_matches_diffusers_through_every_format(name, tmp_path):
    ref = make_diffusers_prior(**PRIOR_CONFIGS[name])
    ref.save_pretrained(tmp_path / "prior")
    inputs = _prior_inputs(ref)
    with torch.no_grad():
        expected = ref(*inputs)
        ours = load_stage_c(tmp_path / "prior")
        assert isinstance(ours, StageC)
        assert relative_error(ours(*inputs), expected) <= PARITY_RTOL

        # Original .pt layout: no config inside, so the head count must be given (shapes cannot tell it).
        orig = load_stage_c(_save_original(ours, tmp_path / "model_v2_stage_c.pt"), nhead=ref.config.nhead)
        assert orig.config == ours.config
        assert relative_error(orig(*inputs), expected) <= PARITY_RTOL

        save_stage(ours, tmp_path / "own")
        own = load_stage_c(tmp_path / "own")
        assert torch.equal(own(*inputs), ours(*inputs))


@pytest.mark.parametrize("name", sorted(DECODER_CONFIGS))
def test_stage_b_matches_diffusers_through_every_format(name, tmp_path):
    ref = make_diffusers_decoder(**DECODER_CONFIGS[name])
    ref.save_pretrained(tmp_path / "decoder")
    with torch.no_grad():
        ours = load_stage_b(tmp_path / "decoder")
        assert isinstance(ours, StageB)
        inputs = _decoder_inputs(ours)
        expected = ref(*inputs)
        assert relative_error(ours(*inputs), expected) <= PARITY_RTOL
        nhead = list(ref.config.nhead)
        orig = load_stage_b(_save_original(ours, tmp_path / "model_v2_stage_b.pt"), nhead=nhead,
                            patch_size=ref.config.patch_size)
        assert orig.config == ours.config
        assert relative_error(orig(*inputs), expected) <= PARITY_RTOL
        save_stage(ours, tmp_path / "own")
        assert torch.equal(load_stage_b(tmp_path / "own")(*inputs), ours(*inputs))


@pytest.mark.parametrize("name", sorted(VQGAN_CONFIGS))
def test_stage_a_matches_diffusers_through_every_format(name, tmp_path):
    ref = make_diffusers_vqgan(**VQGAN_CONFIGS[name])
    ref.save_pretrained(tmp_path / "vqgan")
    f = 2 ** ref.config.levels
    images = torch.rand(2, 3, 4 * f, 3 * f, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_lat = ref.encode(images).latents
        ref_q, ref_loss, (_, _, ref_idx) = ref.vquantizer(ref_lat)
        ref_dec = ref.decode(ref_lat).sample
        ref_dec_q = ref.decode(ref_lat, force_not_quantize=False).sample
        for model in (load_stage_a(tmp_path / "vqgan"),
                      load_stage_a(_save_original(ref, tmp_path / "vqgan_f4_v1_500k.pt"))):
            assert isinstance(model, StageA)
            lat = model.encode(images)
            assert relative_error(lat, ref_lat) <= PARITY_RTOL
            codes, idx, loss = model.quantize(lat)
            assert torch.equal(idx.flatten(), ref_idx.flatten())
            assert idx.shape == lat.shape[:1] + lat.shape[2:]
            assert relative_error(codes, ref_q) <= PARITY_RTOL
            assert relative_error(loss, ref_loss) <= PARITY_RTOL
            assert relative_error(model.decode(ref_lat), ref_dec) <= PARITY_RTOL
            assert relative_error(model.decode(ref_lat, quantize=True), ref_dec_q) <= PARITY_RTOL
        save_stage(model, tmp_path / "own")
        assert torch.equal(load_stage_a(tmp_path / "own").decode(ref_lat), model.decode(ref_lat))


def test_original_layout_key_conversion_is_exact(tmp_path):
    """The original checkpoints name attention as nn.MultiheadAttention and the codebook `codebook`."""
    ref = make_diffusers_prior(depth=1)
    sd = to_original_layout(ref.state_dict())
    assert "blocks.2.attention.attn.in_proj_weight" in sd and "blocks.2.attention.to_q.weight" not in sd
    c = ref.config.c
    assert sd["blocks.2.attention.attn.in_proj_weight"].shape == (3 * c, c)
    assert torch.equal(sd["blocks.2.attention.attn.in_proj_weight"][c:2 * c], ref.state_dict()["blocks.2.attention.to_k.weight"])
    assert "blocks.2.attention.attn.out_proj.weight" in sd
    vq = to_original_layout(make_diffusers_vqgan().state_dict())
    assert "vquantizer.codebook.weight" in vq and "vquantizer.embedding.weight" not in vq


def test_original_pt_prefers_ema_and_infers_head_dim_64(tmp_path):
    ref = make_diffusers_prior(c=128, c_cond=32, depth=1, nhead=2)  # head dim 64, as in the releases
    other = make_diffusers_prior(c=128, c_cond=32, depth=1, nhead=2, seed=5)
    torch.save({"state_dict": to_original_layout(other.state_dict()), "ema_state_dict": to_original_layout(ref.state_dict()),
                "optimizer": {"step": torch.tensor(3)}}, tmp_path / "stage_c.pt")
    model = load_stage_c(tmp_path / "stage_c.pt")
    assert model.config.nhead == 2 and model.config.depth == 1 and model.config.c_cond == 32
    inputs = _prior_inputs(model)
    with torch.no_grad():
        assert relative_error(model(*inputs), ref(*inputs)) <= PARITY_RTOL


def test_stage_b_config_inferred_from_original_shapes(tmp_path):
    ref = make_diffusers_decoder(c_hidden=[64, 128], nhead=[-1, 2], blocks=[2, 3], level_config=["CT", "CTA"],
                                 inject_effnet=[False, True])
    _save_original(ref, tmp_path / "b.pt")
    cfg = load_stage_b(tmp_path / "b.pt").config
    expected = {k: v for k, v in ref.config.items() if not k.startswith("_") and k != "dropout"}
    got = {k: v for k, v in cfg.to_dict().items() if k != "dropout"}
    assert got == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}


def test_loaded_models_are_plain_eval_modules_with_tensor_outputs(tmp_path):
    ref = make_diffusers_prior()
    ref.save_pretrained(tmp_path / "p")
    m = load_stage_c(tmp_path / "p", dtype=torch.float64)
    assert not m.training and next(m.parameters()).dtype == torch.float64
    x, r, c = (t.double() for t in _prior_inputs(m))
    out = m(x, r, c)
    assert type(out) is torch.Tensor and out.shape == x.shape and out.dtype == torch.float64


def test_pipeline_folder_picks_the_stage_subfolder(tmp_path):
    make_diffusers_prior().save_pretrained(tmp_path / "pipe" / "prior")
    make_diffusers_vqgan().save_pretrained(tmp_path / "pipe" / "vqgan")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert isinstance(load_stage_c(tmp_path / "pipe"), StageC)
    assert isinstance(load_stage_a(tmp_path / "pipe"), StageA)


def test_diffusers_bin_weights_load(tmp_path):
    ref = make_diffusers_vqgan()
    ref.save_pretrained(tmp_path / "vq", safe_serialization=False)
    assert (tmp_path / "vq" / "diffusion_pytorch_model.bin").is_file()
    images = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(load_stage_a(tmp_path / "vq").encode(images), ref.encode(images).latents) <= PARITY_RTOL


def test_explicit_config_overrides_inference(tmp_path):
    from wuerstchen_fast.models import StageCConfig

    ref = make_diffusers_prior(c=64, nhead=4, depth=1)
    _save_original(ref, tmp_path / "c.pt")
    inputs = _prior_inputs(ref)
    cfg = StageCConfig(c_in=16, c=64, c_cond=48, c_r=64, depth=1, nhead=4)
    with torch.no_grad():
        assert relative_error(load_stage_c(tmp_path / "c.pt", config=cfg)(*inputs), ref(*inputs)) <= PARITY_RTOL
        # inferred head count (64 / 64 = 1 head) is a different model: the output must differ
        assert load_stage_c(tmp_path / "c.pt").config.nhead == 1
        assert relative_error(load_stage_c(tmp_path / "c.pt")(*inputs), ref(*inputs)) > 1e-3
