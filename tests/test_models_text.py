"""CLIP text encoder parity with transformers CLIPTextModel, open_clip checkpoints, and the offline tokenizer."""
from __future__ import annotations

import pytest
import torch

from _model_factories import (PARITY_RTOL, make_clip_text_model, make_clip_tokenizer, make_open_clip_model,
                              relative_error)
from wuerstchen_fast.models import (CheckpointError, CLIPTextEncoder, TextEncoderConfig, load_text_encoder,
                                    load_tokenizer, save_stage)

PROMPTS = ["", "a photo of a cat", "an astronaut riding a horse on the moon, highly detailed, 4k",
           " ".join(["word"] * 100)]  # > 77 tokens: truncated, EOS kept last

TEXT_CONFIGS = {
    "w32_l2_h4_gelu": {},
    "w48_l3_h3_quickgelu": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                                hidden_act="quick_gelu"),
    "w64_l1_h2_eps1e-6": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                              layer_norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_clip_tokenizer(folder)
    return folder


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_encoder_matches_transformers(name, tmp_path, hf_tokenizer_folder):
    ref = make_clip_text_model(**TEXT_CONFIGS[name])
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = load_text_encoder(tmp_path / "text_encoder")
    assert isinstance(ours, CLIPTextEncoder)
    ids, mask = load_tokenizer(hf_tokenizer_folder)(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and mask[0].sum() == 2 and mask[-1].sum() == 77
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert relative_error(ours(ids, mask), expected) <= PARITY_RTOL
        # shorter (padded-to-longest) batches and no mask at all
        short = ids[:3, :20]
        assert relative_error(ours(short, mask[:3, :20]), ref(input_ids=short, attention_mask=mask[:3, :20]).last_hidden_state) <= PARITY_RTOL
        assert relative_error(ours(ids), ref(input_ids=ids).last_hidden_state) <= PARITY_RTOL
        save_stage(ours, tmp_path / "own")
        assert torch.equal(load_text_encoder(tmp_path / "own")(ids, mask), ours(ids, mask))


def test_padding_mask_is_applied(tmp_path):
    """With the padding mask the EOS state cannot see the pad tokens' content: changing a pad id changes nothing
    at the valid positions."""
    ref = make_clip_text_model()
    ref.save_pretrained(tmp_path / "te")
    ours = load_text_encoder(tmp_path / "te")
    ids, mask = load_tokenizer()(["a cat"])
    # causal attention alone already hides later pads from earlier tokens; the key mask matters for pad queries
    with torch.no_grad():
        out = ours(ids, mask)
        ref_out = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        no_mask = ours(ids)
    assert relative_error(out, ref_out) <= PARITY_RTOL
    n = int(mask.sum())
    assert not torch.allclose(out[:, n:], no_mask[:, n:])  # pad positions differ when the mask is applied
    assert torch.allclose(out[:, :n], no_mask[:, :n], atol=1e-6)


def test_offline_open_clip_tokenizer_matches_transformers_tokenizer(hf_tokenizer_folder):
    hf = load_tokenizer(hf_tokenizer_folder)
    oc = load_tokenizer()
    ids_hf, mask_hf = hf(PROMPTS)
    ids_oc, mask_oc = oc(PROMPTS)
    assert torch.equal(ids_oc, ids_hf) and torch.equal(mask_oc, mask_hf)
    assert ids_oc[0, :2].tolist() == [49406, 49407] and ids_oc[0, 2:].eq(0).all()  # pads with id 0
    assert ids_oc[-1, -1].item() == 49407  # truncated prompt keeps EOS last


def test_open_clip_checkpoint_loads_and_matches_open_clip_text_tower(tmp_path):
    """An open_clip CLIP checkpoint (full model: visual tower, logit_scale, text_projection) loads; our
    hidden states without padding equal open_clip's own text transformer."""
    clip = make_open_clip_model(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16,
                                                              head_width=32),
                                text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    ours = load_text_encoder(tmp_path / "open_clip_pytorch_model.bin")
    assert ours.config.heads == 2 and ours.config.layers == 2 and ours.config.act == "gelu"
    ids, _ = load_tokenizer()(["a photo of a dog", "x"])
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        expected = clip.ln_final(x)
        assert relative_error(ours(ids), expected) <= PARITY_RTOL


def test_named_text_configs_build_on_meta():
    for cfg, (width, layers, heads) in [(TextEncoderConfig.vit_h_14(), (1024, 24, 16)),
                                        (TextEncoderConfig.vit_bigg_14(), (1280, 32, 20))]:
        assert (cfg.width, cfg.layers, cfg.heads, cfg.act) == (width, layers, heads, "gelu")
        with torch.device("meta"):
            m = CLIPTextEncoder(cfg)
        n = sum(p.numel() for p in m.parameters())
        print(f"CLIP text {width}: {n / 1e6:.1f}M params")
        assert n == pytest.approx({1024: 354.0e6, 1280: 694.7e6}[width], rel=0.01)


def test_broken_text_checkpoints(tmp_path):
    ref = make_clip_text_model()
    ref.save_pretrained(tmp_path / "te")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "te" / "model.safetensors")
    sd.pop(next(k for k in sd if k.endswith("final_layer_norm.weight")))
    save_file(sd, tmp_path / "te" / "model.safetensors")
    with pytest.raises(CheckpointError, match="final_layer_norm.weight"):
        load_text_encoder(tmp_path / "te")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="first bytes match neither"):
        load_text_encoder(tmp_path / "junk.bin")
