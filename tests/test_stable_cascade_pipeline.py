"""The Stable Cascade pipeline against diffusers' StableCascadePriorPipeline + StableCascadeDecoderPipeline on the
same saved folders (tiny random components): seed parity of the combined call and of the split pipelines, the
lite subfolders, image variation, prompt embeddings, callbacks, defaults and the float16 message.

Parity runs with every op on the reference backend ("torch"): there ours is the same float32 arithmetic as
diffusers, step for step, and the images agree to the last bit (asserted to 1e-4, the bound). Random tiny
weights are a badly conditioned sampler — ε̂ is not the noise, so the first steps divide by sqrt(ᾱ(1)) = 0.01 and
the latents grow to ~500 — which turns any float32 reordering (the CPU extension's LayerNorm under "auto") into
~1e-4 image differences; the auto case is checked relative to the latents' size instead.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import wuerstchen_fast
from _stable_cascade_folders import diffusers_sc_pipelines, tiny_sc_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import (StableCascadeCombinedPipeline, StableCascadeDecoderPipeline,
                                      StableCascadePriorPipeline, load_pipeline)

IMAGE_ATOL = 1e-4
PROMPTS = ["a tiny robot reading a book", "a red fox"]
SIZE = dict(height=128, width=170)  # Stage C 3 x 4, Stage B 32 x 42: 42 halves to 21, the up path is resized


@pytest.fixture(scope="module")
def pipes(tiny_sc_repos):
    prior_dir, decoder_dir = tiny_sc_repos
    return diffusers_sc_pipelines(prior_dir, decoder_dir), load_pipeline(prior_dir, decoder_dir, device="cpu")


def _diffusers(ref, seed, n, w_prior, w_dec, negative=None, prior_steps=3, steps=2, output_type="pt", **kw):
    prior, decoder = ref
    g = torch.Generator().manual_seed(seed)
    emb = prior(PROMPTS, num_inference_steps=prior_steps, guidance_scale=w_prior, negative_prompt=negative,
                num_images_per_prompt=n, generator=g, **SIZE, **kw).image_embeddings
    return decoder(emb, PROMPTS, num_inference_steps=steps, guidance_scale=w_dec, negative_prompt=negative,
                   generator=g, output_type=output_type).images


def _ours(pipe, seed, n, w_prior, w_dec, negative=None, prior_steps=3, steps=2, output_type="pt", **kw):
    return pipe(PROMPTS, prior_num_inference_steps=prior_steps, prior_guidance_scale=w_prior,
                num_inference_steps=steps, decoder_guidance_scale=w_dec, negative_prompt=negative,
                num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type=output_type,
                progress=False, **SIZE, **kw).images


CASES = [  # seed, images per prompt, prior guidance, decoder guidance, negative prompt
    (0, 2, 4.0, 0.0, None),
    (1, 2, 4.0, 2.5, ["blurry", "dark"]),
    (2, 1, 1.0, 3.0, ["ugly", "ugly"]),  # diffusers wants a list negative for a list of prompts
]


@pytest.mark.parametrize("seed,n,w_prior,w_dec,negative", CASES,
                         ids=[f"seed{c[0]}-n{c[1]}-prior{c[2]}-decoder{c[3]}" for c in CASES])
def test_seed_parity_with_diffusers(pipes, seed, n, w_prior, w_dec, negative):
    ref, ours = pipes
    assert isinstance(ours, StableCascadeCombinedPipeline)
    assert ours.prior_pipe.text is ours.decoder_pipe.text  # both repos carry the same encoder: one copy
    expected = _diffusers(ref, seed, n, w_prior, w_dec, negative)
    with wuerstchen_fast.backend("torch"):
        got = _ours(ours, seed, n, w_prior, w_dec, negative)
    assert got.shape == expected.shape == (2 * n, 3, 128, 168)
    assert (got - expected).abs().max().item() <= IMAGE_ATOL
    if n == 2:
        assert (got[0] - got[1]).abs().max() > 1e-3  # the two images of a prompt differ


def test_auto_backend_agrees_relative_to_the_latents(pipes):
    ref, ours = pipes
    expected = _diffusers(ref, 0, 2, 4.0, 2.5, output_type="latent")
    got = _ours(ours, 0, 2, 4.0, 2.5, output_type="latent")
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_split_pipelines_match_diffusers(pipes):
    """prior_pipe / decoder_pipe alone, as diffusers users run them: the prior's five outputs, then a decode of
    another seed from the same embeddings."""
    (d_prior, d_decoder), ours = pipes
    assert isinstance(ours.prior_pipe, StableCascadePriorPipeline)
    assert isinstance(ours.decoder_pipe, StableCascadeDecoderPipeline)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2, negative_prompt=["x", "y"], **SIZE)
    expected = d_prior(PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    with wuerstchen_fast.backend("torch"):
        got = ours.prior_pipe(PROMPTS, generator=torch.Generator().manual_seed(5), progress=False, **kw)
    for field in ("image_embeddings", "prompt_embeds", "prompt_embeds_pooled", "negative_prompt_embeds",
                  "negative_prompt_embeds_pooled"):
        a, b = getattr(got, field), getattr(expected, field)
        assert a.shape == b.shape and torch.equal(a, b), field
    assert len(ours.prior_pipe(PROMPTS, num_inference_steps=1, return_dict=False, progress=False, **SIZE)) == 5
    emb = expected.image_embeddings
    ref = d_decoder(emb, PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(6), output_type="np")
    with wuerstchen_fast.backend("torch"):
        out = ours.decoder_pipe(emb, PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(6),
                                output_type="np", progress=False)
    assert isinstance(out.images, np.ndarray) and out.images.shape == ref.images.shape == (4, 128, 168, 3)
    assert np.abs(out.images - ref.images).max() <= IMAGE_ATOL
    # the decoder reads the prior's latents as they are (v2 rescales them by 42)
    assert ours.prior_pipe.config["latent_mean"] == 1.0 and ours.prior_pipe.config["latent_std"] == 0.0


def test_prompt_embeds_path_equals_the_prompt_path(pipes):
    _, ours = pipes
    pe, pooled, ne, npooled = ours.prior_pipe.encode_prompt(prompt=PROMPTS, do_classifier_free_guidance=True,
                                                            negative_prompt=["x", "y"])
    assert pe.shape[:2] == (2, 77) and pooled.shape[:2] == (2, 1)
    kw = dict(prior_num_inference_steps=2, num_inference_steps=2, decoder_guidance_scale=2.0, output_type="pt",
              progress=False, **SIZE)
    a = ours(PROMPTS, negative_prompt=["x", "y"], seed=3, **kw).images
    b = ours(prompt_embeds=pe, prompt_embeds_pooled=pooled, negative_prompt_embeds=ne,
             negative_prompt_embeds_pooled=npooled, seed=3, **kw).images
    assert torch.equal(a, b)


def test_lite_variant_selects_the_lite_subfolders(tiny_sc_repos):
    prior_dir, decoder_dir = tiny_sc_repos
    lite = load_pipeline(prior_dir, decoder_dir, device="cpu", variant="lite")
    assert lite.prior.config.block_out_channels == [16, 16]
    assert lite.decoder.config.up_blocks_repeat_mappers == [1, 1, 1]
    ref = diffusers_sc_pipelines(prior_dir, decoder_dir, lite=True)
    expected = _diffusers(ref, 4, 1, 4.0, 0.0)
    with wuerstchen_fast.backend("torch"):
        got = _ours(lite, 4, 1, 4.0, 0.0)
    assert (got - expected).abs().max().item() <= IMAGE_ATOL


def test_image_variation_matches_diffusers(pipes):
    """images= of the prior: CLIP ViT-L/14-style embeddings of reference images, 4 tokens each."""
    (d_prior, _), ours = pipes
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    kw = dict(num_inference_steps=2, guidance_scale=4.0, **SIZE)
    expected = d_prior(PROMPTS, images=images, generator=torch.Generator().manual_seed(7), **kw).image_embeddings
    with wuerstchen_fast.backend("torch"):
        got = ours.prior_pipe(PROMPTS, images=images, generator=torch.Generator().manual_seed(7), progress=False,
                              **kw).image_embeddings
        plain = ours.prior_pipe(PROMPTS, generator=torch.Generator().manual_seed(7), progress=False,
                                **kw).image_embeddings
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert (got - plain).abs().max() > 1e-3  # the images condition the prior
    with pytest.raises(ValueError, match="either images or image_embeds"):
        ours.prior_pipe(PROMPTS, images=images, image_embeds=torch.zeros(1, 1, 20), **kw)


def test_defaults_are_diffusers_and_callbacks_see_each_step(pipes):
    _, ours = pipes
    sig = inspect.signature(type(ours).__call__).parameters
    assert (sig["height"].default, sig["width"].default) == (1024, 1024)
    assert (sig["prior_num_inference_steps"].default, sig["prior_guidance_scale"].default) == (20, 4.0)
    assert (sig["num_inference_steps"].default, sig["decoder_guidance_scale"].default) == (10, 0.0)
    seen = []

    def cb(pipe, i, t, kwargs):
        seen.append((type(pipe).__name__, i, tuple(kwargs)))
        return kwargs

    ours("x", prior_num_inference_steps=2, num_inference_steps=3, prior_callback_on_step_end=cb,
         prior_callback_on_step_end_tensor_inputs=["latents", "text_encoder_hidden_states"], callback_on_step_end=cb,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds_pooled"], output_type="latent",
         progress=False, **SIZE)
    assert [s[:2] for s in seen] == [("StableCascadePriorPipeline", 0), ("StableCascadePriorPipeline", 1),
                                     ("StableCascadeDecoderPipeline", 0), ("StableCascadeDecoderPipeline", 1),
                                     ("StableCascadeDecoderPipeline", 2)]
    assert seen[0][2] == ("latents", "text_encoder_hidden_states") and seen[-1][2] == ("latents", "prompt_embeds_pooled")
    assert ours.decoder_pipe.num_timesteps == 3


def test_odd_decoder_sides_are_refused_before_any_work(pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="width=192 cannot be generated.*multiple of 2"):
        ours("x", width=192, height=128)  # Stage C 5 -> Stage B int(5 * 10.67) = 53


def test_float16_overflow_names_the_stage_and_dtype(tiny_sc_repos):
    prior_dir, decoder_dir = tiny_sc_repos
    pipe = load_pipeline(prior_dir, decoder_dir, device="cpu", dtype=torch.float16)
    huge = torch.full((1, 16, 3, 4), 6e4, dtype=torch.float16)
    with pytest.raises(FloatingPointError, match=r"Stage C \(Stable Cascade prior\).*float16.*bfloat16"):
        pipe.prior_pipe("x", latents=huge, num_inference_steps=2, progress=False, **SIZE)


def test_cli_samples_from_the_stable_cascade_folders(tiny_sc_repos, tmp_path, capsys):
    from wuerstchen_fast.cli import main

    prior_dir, decoder_dir = tiny_sc_repos
    out = tmp_path / "fox.png"
    rc = main(["sample", "a red fox", "--out", str(out), "--prior", str(prior_dir), "--decoder", str(decoder_dir),
               "--variant", "lite", "--height", "128", "--width", "170", "--prior-steps", "2", "--steps", "2",
               "--seed", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (168, 128) and im.mode == "RGB"


def test_decoder_with_its_own_text_encoder_gives_the_same_images(pipes):
    """The combined call reuses the prior's pooled rows when the encoder is shared; a separate decoder encoder
    (the same weights here) encodes the prompts again and must give the same images."""
    from wuerstchen_fast.pipeline.stable_cascade import CascadeTextEncoder

    _, ours = pipes
    p, d = ours.prior_pipe, ours.decoder_pipe
    apart = StableCascadeCombinedPipeline(p.prior, d.decoder, d.vqgan, p.text, CascadeTextEncoder(p.tokenizer,
                                                                                                 p.text_encoder),
                                          device="cpu", config=dict(ours.config))
    kw = dict(prior_num_inference_steps=2, num_inference_steps=2, decoder_guidance_scale=2.0, num_images_per_prompt=2,
              negative_prompt=["x", "y"], output_type="pt", progress=False, **SIZE)
    assert torch.equal(apart(PROMPTS, seed=8, **kw).images, ours(PROMPTS, seed=8, **kw).images)


def test_original_single_files_with_the_repo_parts(tiny_sc_repos, tmp_path):
    """prior= / decoder= as the original Stability files (attention as MultiheadAttention, Stage B's clip_mapper,
    no config: inferred from the shapes, so the heads here are 64 wide as released), the other parts from the
    repos' folders: the same images as the same weights in diffusers folders. The original stage_a.safetensors
    brings its own 0.43 latent scale."""
    from safetensors.torch import save_file

    from wuerstchen_fast.models import to_original_layout, to_original_stable_cascade
    from wuerstchen_fast.testing.random_stable_cascade import make_diffusers_stable_cascade

    prior_dir, decoder_dir = tiny_sc_repos
    unets = dict(prior=make_diffusers_stable_cascade("tiny_prior", seed=9, block_out_channels=[64, 64],
                                                     conditioning_dim=64, num_attention_heads=[1, 1]),
                 decoder=make_diffusers_stable_cascade("tiny_decoder", seed=10, block_out_channels=[16, 24, 64],
                                                       num_attention_heads=[0, 0, 1]))
    for stage, name in (("prior", "stage_c"), ("decoder", "stage_b")):
        unets[stage].save_pretrained(tmp_path / f"{stage}_diffusers")
        save_file(to_original_stable_cascade(unets[stage].state_dict()), tmp_path / f"{name}.safetensors")
    parts = dict(vqgan=decoder_dir / "vqgan", text_encoder=decoder_dir / "text_encoder",
                 tokenizer=decoder_dir / "tokenizer", device="cpu")
    originals = load_pipeline(tmp_path / "stage_c.safetensors", tmp_path / "stage_b.safetensors", **parts)
    folders = load_pipeline(tmp_path / "prior_diffusers", tmp_path / "decoder_diffusers", **parts)
    assert originals.prior.config == folders.prior.config and originals.decoder.config == folders.decoder.config
    kw = dict(prior_num_inference_steps=2, num_inference_steps=2, output_type="latent", progress=False, seed=2,
              **SIZE)
    # Equal weights read from another file layout: the outputs agree to float32 rounding (seen: not bit for bit
    # on a CPU), which the badly conditioned random chain grows to ~2e-7 of the latents.
    got, expected = originals("a fox", **kw).images, folders("a fox", **kw).images
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5

    vq = load_pipeline(tmp_path / "prior_diffusers", tmp_path / "decoder_diffusers", **parts).vqgan
    save_file(to_original_layout(vq.state_dict()), tmp_path / "stage_a.safetensors")
    with_a = load_pipeline(tmp_path / "prior_diffusers", tmp_path / "decoder_diffusers",
                           **{**parts, "vqgan": tmp_path / "stage_a.safetensors"})
    assert with_a.config["vq_scale_factor"] == 0.43 and folders.config["vq_scale_factor"] == 0.3764
