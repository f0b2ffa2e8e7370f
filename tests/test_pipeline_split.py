"""The split pipelines (`.prior_pipe`, `.decoder_pipe`) against diffusers' WuerstchenPriorPipeline and
WuerstchenDecoderPipeline on the same saved folders; embeddings in, embeddings out; outputs, callbacks."""
import numpy as np
import pytest
import torch

from _pipeline_folders import diffusers_split, tiny_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import (WuerstchenDecoderPipeline, WuerstchenPriorPipeline,
                                      WuerstchenPriorPipelineOutput, load_pipeline)

# Images: as the combined parity tests (float32 summation order in the models, ~1e-7 per call, grown
# by the chain). Embeddings are compared in the prior's latent units (embeddings / latent_mean, the
# unit-variance scale the chain runs at): the random tiny prior puts raw embeddings near ±350.
IMAGE_ATOL = 1e-4
LATENT_ATOL = 1e-4
LATENT_MEAN = 42.0


@pytest.fixture(scope="module")
def pipes(tiny_repos):
    ref_prior, ref_decoder = diffusers_split(*tiny_repos)
    return ref_prior, ref_decoder, load_pipeline(*tiny_repos, device="cpu")


def gen(seed):
    return torch.Generator().manual_seed(seed)


PRIOR_CASES = [
    dict(height=128, width=256, num_inference_steps=3, guidance_scale=4.0, negative_prompt="ugly",
         num_images_per_prompt=2, output_type="pt"),
    dict(height=256, width=128, timesteps=[1.0, 0.7, 0.2, 0.0], guidance_scale=1.0, num_images_per_prompt=1,
         output_type="np"),
]


@pytest.mark.parametrize("case", PRIOR_CASES, ids=["cfg-n2-pt", "nocfg-timesteps-np"])
def test_prior_parity_with_diffusers(pipes, case):
    ref, _, ours = pipes
    expected = ref("a tiny robot", generator=gen(0), **case).image_embeddings
    got = ours.prior_pipe("a tiny robot", generator=gen(0), progress=False, **case).image_embeddings
    assert type(got) is type(expected) and got.shape == expected.shape
    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    torch.testing.assert_close(got / LATENT_MEAN, expected / LATENT_MEAN, rtol=0, atol=LATENT_ATOL)


DECODER_CASES = [  # the cases diffusers' decoder runs: one prompt, num_images_per_prompt=1
    dict(rows=1, num_inference_steps=3, guidance_scale=0.0),
    dict(rows=2, num_inference_steps=2, guidance_scale=2.0, negative_prompt="blurry"),
    dict(rows=1, timesteps=[1.0, 0.5, 0.0], guidance_scale=0.0, own_latents=True),
]


@pytest.mark.parametrize("case", DECODER_CASES, ids=["one", "two-rows-cfg", "timesteps-latents"])
def test_decoder_parity_with_diffusers(pipes, case):
    ref_prior, ref, ours = pipes
    case = dict(case)
    rows, own_latents = case.pop("rows"), case.pop("own_latents", False)
    emb = ref_prior("a tiny robot", height=128, width=256, num_inference_steps=2, num_images_per_prompt=rows,
                    generator=gen(3)).image_embeddings
    if own_latents:
        case["latents"] = torch.randn(rows, 4, 32, 64, generator=gen(9))
    expected = ref(emb, "a tiny robot", generator=gen(1), output_type="pt", **case).images
    got = ours.decoder_pipe(emb, "a tiny robot", generator=gen(1), output_type="pt", progress=False, **case).images
    assert got.shape == expected.shape == (rows, 3, 128, 256)
    torch.testing.assert_close(got, expected, rtol=0, atol=IMAGE_ATOL)


def test_combined_is_prior_then_decoder(pipes):
    """The combined call hands one generator through both stages: the same as calling them in turn."""
    _, _, ours = pipes
    kw = dict(height=128, width=128, negative_prompt="dark")
    combined = ours(["a cat", "a dog"], prior_num_inference_steps=2, num_inference_steps=2, prior_guidance_scale=4.0,
                    decoder_guidance_scale=2.0, num_images_per_prompt=2, generator=gen(4), output_type="pt",
                    progress=False, **kw).images
    g = gen(4)
    emb = ours.prior_pipe(["a cat", "a dog"], num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2,
                          generator=g, progress=False, **kw).image_embeddings
    split = ours.decoder_pipe(emb, ["a cat", "a dog"], num_inference_steps=2, guidance_scale=2.0,
                              negative_prompt="dark", generator=g, output_type="pt", progress=False).images
    assert combined.shape == (4, 3, 128, 128) and torch.equal(combined, split)


def test_decoder_repeats_each_embedding_row_per_image(pipes):
    """num_images_per_prompt=2 on one row is that row decoded twice (diffusers crashes here)."""
    _, _, ours = pipes
    emb = torch.randn(1, 16, 3, 3, generator=gen(5)) * 40
    kw = dict(num_inference_steps=2, output_type="pt", progress=False)
    twice = ours.decoder_pipe(emb, "x", num_images_per_prompt=2, generator=gen(6), **kw).images
    stacked = ours.decoder_pipe(torch.cat([emb, emb]), "x", generator=gen(6), **kw).images
    assert torch.equal(twice, stacked) and (twice[0] - twice[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ embeddings
def test_prompt_embeds_equal_the_prompt_path(pipes):
    _, _, ours = pipes
    prior, decoder = ours.prior_pipe, ours.decoder_pipe
    prompts, negatives = ["a red square", "a blue circle"], ["green", "yellow"]
    kw = dict(height=128, width=128, num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2,
              progress=False)
    pe, ne = prior.encode_prompt(prompt=prompts, negative_prompt=negatives, do_classifier_free_guidance=True)
    assert pe.shape == ne.shape == (2, 77, 48)
    by_text = prior(prompts, negative_prompt=negatives, generator=gen(0), **kw).image_embeddings
    by_embeds = prior(prompt_embeds=pe, negative_prompt_embeds=ne, generator=gen(0), **kw).image_embeddings
    assert torch.equal(by_text, by_embeds)

    dkw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", progress=False)
    dpe, dne = decoder.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt=negatives)
    images = decoder(by_text, prompts, negative_prompt=negatives, generator=gen(1), **dkw).images
    images_e = decoder(by_text, prompt_embeds=dpe, negative_prompt_embeds=dne, generator=gen(1), **dkw).images
    assert images.shape == (4, 3, 128, 128) and torch.equal(images, images_e)

    # combined: the embeddings are the prior's; the decoder still reads the prompt
    ckw = dict(height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, output_type="pt",
               progress=False)
    a = ours(prompts, negative_prompt=negatives, generator=gen(2), **ckw).images
    b = ours(prompts, prompt_embeds=pe, negative_prompt_embeds=ne, negative_prompt=negatives, generator=gen(2),
             **ckw).images
    assert torch.equal(a, b)


def test_bad_embeddings_are_refused_before_any_work(pipes):
    _, _, ours = pipes
    prior, decoder = ours.prior_pipe, ours.decoder_pipe
    pe = torch.zeros(1, 77, 48)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        prior("x", prompt_embeds=pe)
    with pytest.raises(ValueError, match="pass prompt .* or prompt_embeds"):
        prior()
    with pytest.raises(ValueError, match="prompt_embeds has 40 channels but .* has 48"):
        prior(prompt_embeds=torch.zeros(1, 77, 40))
    with pytest.raises(ValueError, match="negative_prompt_embeds must have the shape of prompt_embeds"):
        prior(prompt_embeds=pe, negative_prompt_embeds=torch.zeros(1, 70, 48))
    with pytest.raises(ValueError, match='pass prompt="" to decode without text'):
        decoder(torch.zeros(1, 16, 3, 3))
    with pytest.raises(ValueError, match=r"image_embeddings must have shape \(batch, 16, h, w\)"):
        decoder(torch.zeros(1, 8, 3, 3), "x")
    with pytest.raises(ValueError, match=r"image_embeddings height 5 .* int\(5\*10.67\) = 53, .* 3 or 6"):
        decoder(torch.zeros(1, 16, 5, 3), "x")
    with pytest.raises(ValueError, match="3 rows for 2 prompts"):
        decoder(torch.zeros(3, 16, 3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="output_type must be one of \\('pt', 'np'\\)"):
        prior("x", output_type="pil")


# ------------------------------------------------------------------------------------ outputs, callbacks
def test_outputs_behave_like_diffusers(pipes):
    ref_prior, ref_decoder, ours = pipes
    kw = dict(height=128, width=128, num_inference_steps=1)
    out = ours.prior_pipe("x", generator=gen(0), progress=False, **kw)
    assert isinstance(out, WuerstchenPriorPipelineOutput)
    assert out[0] is out.image_embeddings is out["image_embeddings"] and out.keys() == ["image_embeddings"]
    bare = ours.prior_pipe("x", generator=gen(0), return_dict=False, progress=False, **kw)
    theirs = ref_prior("x", generator=gen(0), return_dict=False, **kw)
    assert type(bare) is type(theirs) is tuple and len(bare) == len(theirs) == 1
    assert torch.equal(bare[0], out.image_embeddings)

    emb = out.image_embeddings
    images = ours.decoder_pipe(emb, "x", num_inference_steps=1, generator=gen(1), progress=False)
    assert images[0] is images.images and images.to_tuple() == (images.images,)
    bare = ours.decoder_pipe(emb, "x", num_inference_steps=1, generator=gen(1), return_dict=False, progress=False)
    theirs = ref_decoder(emb, "x", num_inference_steps=1, generator=gen(1), return_dict=False)
    assert type(bare) is type(theirs) is list and len(bare) == len(theirs) == 1
    assert np.array_equal(np.asarray(bare[0]), np.asarray(images.images[0]))


def test_callback_tensor_inputs_and_replacements_match_diffusers(pipes):
    """Every tensor a callback may ask for, and what replacing latents / text states does, as diffusers."""
    ref, _, ours = pipes
    names = ["latents", "text_encoder_hidden_states", "negative_prompt_embeds"]
    seen = {"ref": [], "ours": []}

    def callback(key):
        def f(pipe, i, t, kw):
            seen[key].append((i, float(t), pipe.num_timesteps, {k: v.clone() for k, v in kw.items()}))
            if i == 0:
                return {"latents": kw["latents"] * 0.9, "text_encoder_hidden_states": kw["text_encoder_hidden_states"] * 0.5}
            return kw
        return f

    kw = dict(height=128, width=128, num_inference_steps=3, guidance_scale=4.0, callback_on_step_end_tensor_inputs=names)
    expected = ref("a cat", generator=gen(0), callback_on_step_end=callback("ref"), **kw).image_embeddings
    got = ours.prior_pipe("a cat", generator=gen(0), callback_on_step_end=callback("ours"), progress=False,
                          **kw).image_embeddings
    torch.testing.assert_close(got / LATENT_MEAN, expected / LATENT_MEAN, rtol=0, atol=LATENT_ATOL)
    assert [s[:3] for s in seen["ours"]] == [s[:3] for s in seen["ref"]]  # step, t, num_timesteps
    assert [(s[0], s[2]) for s in seen["ours"]] == [(0, 3), (1, 3), (2, 3)] and seen["ours"][0][1] == 1.0
    for (_, _, _, a), (_, _, _, b) in zip(seen["ours"], seen["ref"]):
        assert list(a) == names
        for k in names:
            assert a[k].shape == b[k].shape
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=LATENT_ATOL * LATENT_MEAN)

    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs may name"):
        ours.prior_pipe("a cat", callback_on_step_end=callback("ours"), callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="returned a new 'negative_prompt_embeds', which does not feed"):
        ours.prior_pipe("a cat", height=128, width=128, num_inference_steps=2, progress=False,
                        callback_on_step_end=lambda p, i, t, k: {"negative_prompt_embeds": k["negative_prompt_embeds"] + 1},
                        callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])


def test_decoder_callback_can_replace_image_embeddings(pipes):
    """A callback's image_embeddings drive the remaining steps: replacing them after step 0 of two equals
    one step on the old embeddings, then one step on the new from there (same generator)."""
    _, _, ours = pipes
    decoder, emb = ours.decoder_pipe, torch.randn(1, 16, 3, 3, generator=gen(5)) * 40
    kw = dict(output_type="latent", progress=False)

    def swap(pipe, i, t, k):
        assert set(k) == {"latents", "image_embeddings"} and pipe.num_timesteps == 2
        return {"image_embeddings": k["image_embeddings"] * 0.5} if i == 0 else k

    swapped = decoder(emb, "x", num_inference_steps=2, generator=gen(7), callback_on_step_end=swap,
                      callback_on_step_end_tensor_inputs=["latents", "image_embeddings"], **kw).images
    g = gen(7)
    half_way = decoder(emb, "x", timesteps=[1.0, 0.5], generator=g, **kw).images
    by_hand = decoder(emb * 0.5, "x", timesteps=[0.5, 0.0], latents=half_way, generator=g, **kw).images
    assert torch.equal(swapped, by_hand)
    echoed = decoder(emb, "x", num_inference_steps=2, generator=gen(7), callback_on_step_end=lambda p, i, t, k: k,
                     callback_on_step_end_tensor_inputs=["image_embeddings"], **kw).images
    assert torch.equal(echoed, decoder(emb, "x", num_inference_steps=2, generator=gen(7), **kw).images)
    assert not torch.equal(echoed, swapped)


def test_to_moves_and_casts_every_module(tiny_repos):
    pipe = load_pipeline(*tiny_repos, device="cpu")
    assert pipe.to("cpu", torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    for module in (pipe.prior, pipe.decoder, pipe.vqgan, pipe.prior_text.model, pipe.decoder_text.model):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    emb = pipe.prior_pipe("x", height=128, width=128, num_inference_steps=1, progress=False).image_embeddings
    assert emb.dtype == torch.bfloat16 and torch.isfinite(emb).all()
    assert pipe.decoder_pipe.to(dtype=torch.float32).dtype == torch.float32
    assert {p.dtype for p in pipe.decoder.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        pipe.to(torch.float64)


def test_split_pipelines_are_the_public_classes(pipes):
    _, _, ours = pipes
    assert isinstance(ours.prior_pipe, WuerstchenPriorPipeline)
    assert isinstance(ours.decoder_pipe, WuerstchenDecoderPipeline)
    assert ours.prior_pipe.prior is ours.prior and ours.decoder_pipe.vqgan is ours.vqgan
    assert ours.config["prior_c_in"] == ours.prior_pipe.config.c_in == 16
    assert set(ours.components) == {"tokenizer", "text_encoder", "decoder", "vqgan", "prior_tokenizer",
                                    "prior_text_encoder", "prior_prior"}
