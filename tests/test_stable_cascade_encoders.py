"""Stable Cascade's encoders against transformers: the bigG-style text tower with projection (the pre-final-LN
hidden state, the pooled end-of-text row, text_embeds) and the ViT-L/14-style image tower (image_embeds) with
CLIPImageProcessor's preprocessing; loaded from transformers folders, open_clip checkpoints and our format."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _model_factories import PARITY_RTOL, make_clip_tokenizer, make_open_clip_model, relative_error
from wuerstchen_fast.models import load_text_encoder, load_tokenizer, save_stage
from wuerstchen_fast.models.clip_vision import (CLIPImagePreprocessor, CLIPVisionEncoder, VisionEncoderConfig,
                                                load_image_encoder, save_image_encoder)
from wuerstchen_fast.models.text import TextEncoderConfig
from wuerstchen_fast.testing.random_stable_cascade import (make_clip_text_with_projection,
                                                           make_clip_vision_with_projection)

PROMPTS = ["", "a photo of a cat", " ".join(["word"] * 100)]  # empty, short, truncated to 77 (EOS kept last)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_clip_tokenizer(folder)
    return load_tokenizer(folder)(PROMPTS)


@pytest.mark.parametrize("cfg", [{}, dict(eos_token_id=2), dict(projection_dim=16, hidden_act="quick_gelu")],
                         ids=["eos_first", "eos_legacy_argmax", "proj16_quickgelu"])
def test_text_with_projection_matches_transformers(cfg, tmp_path, tokens):
    ref = make_clip_text_with_projection(**cfg)
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = load_text_encoder(tmp_path / "text_encoder")
    assert ours.config.projection_dim == ref.config.projection_dim
    ids, mask = tokens
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = ours.encode(ids, mask)
        assert relative_error(out.pre_norm_hidden_state, theirs.hidden_states[-1]) <= PARITY_RTOL
        assert relative_error(out.last_hidden_state, theirs.last_hidden_state) <= PARITY_RTOL
        assert relative_error(out.text_embeds, theirs.text_embeds) <= PARITY_RTOL
        # hidden_states[-1] really is before the final LayerNorm (what Stable Cascade's prior reads)
        assert relative_error(theirs.hidden_states[-1], theirs.last_hidden_state) > 1e-2
        assert torch.equal(ours(ids, mask), out.last_hidden_state)
        save_stage(ours, tmp_path / "own")
        assert torch.equal(load_text_encoder(tmp_path / "own").encode(ids, mask).text_embeds, out.text_embeds)


def test_text_projection_from_a_full_clip_folder_and_open_clip(tmp_path, tokens):
    """transformers CLIPModel (text + vision, text_projection) and an open_clip CLIP checkpoint both load with
    their text projection; open_clip's own encode_text is the reference for the latter."""
    from transformers import CLIPConfig, CLIPModel

    from wuerstchen_fast.testing.random_models import randomize_
    from wuerstchen_fast.testing.random_stable_cascade import TINY_SC_TEXT, TINY_SC_VISION

    full = randomize_(CLIPModel(CLIPConfig(text_config=TINY_SC_TEXT, vision_config=TINY_SC_VISION,
                                           projection_dim=12)), 3).eval()
    full.save_pretrained(tmp_path / "clip")
    ours = load_text_encoder(tmp_path / "clip")
    ids, mask = tokens
    with torch.no_grad():
        expected = full.text_projection(full.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        assert relative_error(ours.encode(ids, mask).text_embeds, expected) <= PARITY_RTOL

    oc = make_open_clip_model(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16,
                                                            head_width=32),
                              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    torch.save(oc.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    ours = load_text_encoder(tmp_path / "open_clip_pytorch_model.bin")
    assert ours.config.projection_dim == 16
    with torch.no_grad():
        assert relative_error(ours.encode(ids).text_embeds, oc.encode_text(ids)) <= PARITY_RTOL


def test_bigg_with_projection_builds_on_meta():
    cfg = TextEncoderConfig.vit_bigg_14(projection=True)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.projection_dim) == (1280, 32, 20, 1280)
    from wuerstchen_fast.models import CLIPTextEncoder

    with torch.device("meta"):
        n = sum(p.numel() for p in CLIPTextEncoder(cfg).parameters())
        n_plain = sum(p.numel() for p in CLIPTextEncoder(TextEncoderConfig.vit_bigg_14()).parameters())
    assert n - n_plain == 1280 * 1280 and n == pytest.approx(694.7e6, rel=1e-3)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (31, 29), (20, 64))]


@pytest.mark.parametrize("cfg", [{}, dict(hidden_act="gelu", projection_dim=8, image_size=42)],
                         ids=["vitl_like", "gelu_proj8_42px"])
def test_vision_tower_matches_transformers(cfg, tmp_path):
    from transformers import CLIPImageProcessor

    ref = make_clip_vision_with_projection(**cfg)
    ref.save_pretrained(tmp_path / "image_encoder")
    ours = load_image_encoder(tmp_path / "image_encoder")
    assert isinstance(ours, CLIPVisionEncoder) and ours.config.projection_dim == ref.config.projection_dim
    size = ref.config.image_size
    hf = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    hf.save_pretrained(tmp_path / "feature_extractor")
    pre = CLIPImagePreprocessor.from_folder(tmp_path / "feature_extractor")
    images = _images()
    pixels = pre(images)
    expected_pixels = hf(images, return_tensors="pt").pixel_values
    assert pixels.shape == expected_pixels.shape == (3, 3, size, size)
    torch.testing.assert_close(pixels, expected_pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        theirs = ref(pixel_values=expected_pixels)
        out = ours.encode(expected_pixels)
        assert relative_error(out.image_embeds, theirs.image_embeds) <= PARITY_RTOL
        assert relative_error(out.last_hidden_state, theirs.last_hidden_state) <= PARITY_RTOL
        save_image_encoder(ours, tmp_path / "own")
        assert torch.equal(load_image_encoder(tmp_path / "own")(expected_pixels), out.image_embeds)


def test_vision_tower_from_open_clip(tmp_path):
    oc = make_open_clip_model(embed_dim=12, quick_gelu=True, vision_cfg=dict(image_size=28, layers=2, width=64,
                                                                             patch_size=14),
                              text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=1))
    torch.save(oc.state_dict(), tmp_path / "open_clip.bin")
    ours = load_image_encoder(tmp_path / "open_clip.bin")
    assert (ours.config.width, ours.config.layers, ours.config.image_size, ours.config.projection_dim) == (64, 2, 28, 12)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(pixels), oc.encode_image(pixels)) <= PARITY_RTOL
    assert VisionEncoderConfig.vit_l_14().projection_dim == 768
