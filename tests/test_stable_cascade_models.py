"""Stable Cascade UNet parity with diffusers' StableCascadeUNet (every parameter random) through every format:
a diffusers folder (save_pretrained), an original Stability file (MultiheadAttention, Stage B `clip_mapper`),
and our own format; the four released configs counted on the meta device."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from _model_factories import PARITY_RTOL, relative_error
from wuerstchen_fast.models import (StableCascadeConfig, StableCascadeUNet, infer_stable_cascade_config,
                                    load_stable_cascade, save_stage, to_original_stable_cascade)
from wuerstchen_fast.testing.random_stable_cascade import make_diffusers_stable_cascade, sc_config

CONFIGS = {
    "prior_tiny": ("tiny_prior", {}),
    # Stage C transitions that resize (switch_level True), repeats on both paths, cross-attention only
    "prior_resizing_repeats_cross_attn": ("tiny_prior", dict(switch_level=[True], down_blocks_repeat_mappers=[2, 1],
                                                             up_blocks_repeat_mappers=[1, 2], self_attn=False)),
    "decoder_tiny": ("tiny_decoder", {}),
    # 4 levels like the release (CT, CT, CTA, CTA), kernel 5, a down-path repeat
    "decoder_4lvl_k5": ("tiny_decoder", dict(block_out_channels=[8, 16, 16, 24], num_attention_heads=[0, 0, 2, 3],
                                             down_num_layers_per_block=[1, 1, 1, 2], up_num_layers_per_block=[2, 1, 1, 1],
                                             down_blocks_repeat_mappers=[1, 2, 1, 1],
                                             up_blocks_repeat_mappers=[3, 1, 2, 2],
                                             block_types_per_layer=[["SDCascadeResBlock", "SDCascadeTimestepBlock"]] * 2
                                             + [["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2,
                                             dropout=0.0, kernel_size=5)),
}
# Decoder sample sides: multiples of 8 (no resize), and 26 x 38 (13 x 19 after the patch: the k2 s2 levels
# floor to 6 x 9 and 3 x 4, so the up path is resized to the skips' sizes, as for Stage C sides not a multiple of 3).
DECODER_SIZES = {"even": (16, 24), "resize_path": (26, 38)}


def _inputs(cfg: StableCascadeConfig, size, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, *size, generator=g)
    kw = dict(clip_text_pooled=torch.randn(b, 1, cfg.clip_text_pooled_in_channels, generator=g))
    if cfg.clip_text_in_channels:
        kw["clip_text"] = torch.randn(b, 7, cfg.clip_text_in_channels, generator=g)
    if cfg.clip_image_in_channels:
        kw["clip_img"] = torch.randn(b, 2, cfg.clip_image_in_channels, generator=g)
    if cfg.effnet_in_channels:
        kw["effnet"] = torch.randn(b, cfg.effnet_in_channels, 3, 4, generator=g)
    if cfg.pixel_mapper_in_channels:
        kw["pixels"] = torch.randn(b, cfg.pixel_mapper_in_channels, 8, 8, generator=g)
    return x, torch.rand(b, generator=g), kw


def _cases():
    for name, (preset, over) in CONFIGS.items():
        sizes = DECODER_SIZES if preset == "tiny_decoder" else {"5x7": (5, 7)}
        for size_name, size in sizes.items():
            yield pytest.param(preset, over, size, id=f"{name}-{size_name}")


@pytest.mark.parametrize("preset,over,size", list(_cases()))
def test_matches_diffusers_through_every_format(preset, over, size, tmp_path):
    ref = make_diffusers_stable_cascade(preset, **over)
    cfg = sc_config(preset, **over)
    x, r, kw = _inputs(cfg, size)
    with torch.no_grad():
        expected = ref(x, r, **kw).sample
        ref.save_pretrained(tmp_path / "diffusers")
        ours = load_stable_cascade(tmp_path / "diffusers")
        assert isinstance(ours, StableCascadeUNet) and not ours.training
        assert ours.config == cfg
        assert relative_error(ours(x, r, **kw), expected) <= PARITY_RTOL

        # Original file: no config inside; the head counts and Stage C's resizing cannot be read from shapes.
        name = "stage_b.safetensors" if cfg.effnet_in_channels else "stage_c.safetensors"
        save_file(to_original_stable_cascade(ref.state_dict()), tmp_path / name)
        orig = load_stable_cascade(tmp_path / name, num_attention_heads=cfg.num_attention_heads,
                                   switch_level=cfg.switch_level, dropout=cfg.dropout, self_attn=cfg.self_attn)
        assert orig.config == cfg
        assert relative_error(orig(x, r, **kw), expected) <= PARITY_RTOL

        save_stage(ours, tmp_path / "own")
        own = load_stable_cascade(tmp_path / "own")
        assert own.config == cfg and torch.equal(own(x, r, **kw), ours(x, r, **kw))


def test_prepared_conditioning_equals_forward():
    """The pipeline's split (conditioning once, then denoise per step) is the same math as forward."""
    for preset, size in (("tiny_prior", (5, 7)), ("tiny_decoder", (26, 38))):
        ref = make_diffusers_stable_cascade(preset, seed=3)
        ours = StableCascadeUNet(sc_config(preset)).eval()
        ours.load_state_dict(ref.state_dict())
        x, r, kw = _inputs(ours.config, size)
        with torch.no_grad():
            conds = ours.prepare_conditioning(**kw, sample_size=x.shape[-2:])
            assert torch.equal(ours.denoise(x, r, *conds), ours(x, r, **kw))
            if preset == "tiny_prior":  # 7 text + 4 pooled + 2 images x 4 tokens
                assert conds[0].shape == (2, 7 + 4 + 8, ours.config.conditioning_dim) and len(conds) == 1
            else:  # pooled tokens, then the effnet and pixels maps at the embedded size
                assert conds[0].shape == (2, 4, ours.config.conditioning_dim) and len(conds) == 3
                assert conds[1].shape == conds[2].shape == (2, ours.config.block_out_channels[0], 13, 19)


def test_prior_without_image_uses_one_zero_image_embedding():
    """Text-to-image passes zeros as the image embedding; ours does the same when clip_img is left out."""
    model = StableCascadeUNet(StableCascadeConfig.tiny_prior()).eval()
    x, r, kw = _inputs(model.config, (3, 4))
    zeros = torch.zeros(2, 1, model.config.clip_image_in_channels)
    with torch.no_grad():
        assert torch.equal(model(x, r, kw["clip_text_pooled"], kw["clip_text"]),
                           model(x, r, kw["clip_text_pooled"], kw["clip_text"], zeros))
    with pytest.raises(ValueError, match="no effnet_mapper"):
        model(x, r, **kw, effnet=torch.zeros(2, 16, 3, 3))


# (parameters, state-dict keys): 3.589B, 1.031B, 1.563B and 0.699B, as published for the four releases.
RELEASED = {"prior": (3_589_103_632, 1550), "prior_lite": (1_030_785_040, 782), "decoder": (1_562_941_136, 1726),
            "decoder_lite": (699_471_248, 970)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_parameter_counts_and_keys(name):
    from diffusers import StableCascadeUNet as DiffusersUNet

    cfg = getattr(StableCascadeConfig, name)()
    with torch.device("meta"):
        ours, theirs = StableCascadeUNet(cfg), DiffusersUNet(**cfg.to_dict())
    n = sum(p.numel() for p in ours.parameters())
    params, keys = RELEASED[name]
    assert (n, len(ours.state_dict())) == (params, keys)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    # The original checkpoints carry no config: the shapes alone give back exactly the released config.
    original = to_original_stable_cascade(theirs.state_dict())
    assert ("clip_mapper.weight" in original) == name.startswith("decoder")
    from wuerstchen_fast.models import from_original_stable_cascade

    assert infer_stable_cascade_config(from_original_stable_cascade(original)) == cfg
