"""Stable Cascade through the diffusers-user entry points: Hub repo ids resolved offline from a pre-populated
cache, `from_pretrained` of the stage pipelines, the split loaders, and model CPU offload (each module visits
the execution device once per use, in the call's order)."""
import shutil

import pytest
import torch

from _hub_cache import add_repo
from _stable_cascade_folders import tiny_sc_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import (StableCascadeCombinedPipeline, StableCascadeDecoderPipeline,
                                      StableCascadePriorPipeline, load_decoder_pipeline, load_pipeline,
                                      load_prior_pipeline, offload)

PRIOR_ID, DECODER_ID = "stabilityai/stable-cascade-prior", "stabilityai/stable-cascade"
KW = dict(prompt="a fox", height=128, width=170, prior_num_inference_steps=2, num_inference_steps=2, seed=0,
          output_type="pt", progress=False)


@pytest.fixture(scope="module")
def hub_cache(tiny_sc_repos, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sc_hub")
    prior_dir, decoder_dir = tiny_sc_repos
    card = tmp_path_factory.mktemp("sc_card") / "stable-cascade"
    shutil.copytree(decoder_dir, card)
    (card / "README.md").write_text(f"---\nprior:\n- {PRIOR_ID}\nlicense: other\n---\n# card\n")
    add_repo(cache, PRIOR_ID, prior_dir, "c" * 40)
    add_repo(cache, DECODER_ID, card, "d" * 40)
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_repo_ids_and_from_pretrained(tiny_sc_repos, hub_cache, offline):
    from_hub = load_pipeline(PRIOR_ID, DECODER_ID, cache_dir=hub_cache, device="cpu")
    local = load_pipeline(*tiny_sc_repos, device="cpu")
    assert isinstance(from_hub, StableCascadeCombinedPipeline)
    expected = local(**KW).images
    assert torch.equal(from_hub(**KW).images, expected)
    combined = StableCascadeCombinedPipeline.from_pretrained(DECODER_ID, cache_dir=hub_cache)  # prior from the card
    assert isinstance(combined, StableCascadeCombinedPipeline) and torch.equal(combined(**KW).images, expected)
    lite = load_pipeline(PRIOR_ID, DECODER_ID, cache_dir=hub_cache, device="cpu", variant="lite")
    assert lite.prior.config.block_out_channels == [16, 16]

    prior = StableCascadePriorPipeline.from_pretrained(PRIOR_ID, cache_dir=hub_cache)
    decoder = StableCascadeDecoderPipeline.from_pretrained(DECODER_ID, cache_dir=hub_cache)
    assert isinstance(prior, StableCascadePriorPipeline) and isinstance(decoder, StableCascadeDecoderPipeline)
    g = torch.Generator().manual_seed(0)
    emb = prior("a fox", height=128, width=170, num_inference_steps=2, generator=g, progress=False).image_embeddings
    split = decoder(emb, "a fox", num_inference_steps=2, generator=g, output_type="pt", progress=False).images
    assert torch.equal(split, expected)


def test_split_loaders_from_folders(tiny_sc_repos):
    prior_dir, decoder_dir = tiny_sc_repos
    prior = load_prior_pipeline(prior_dir, device="cpu", variant="lite")
    decoder = load_decoder_pipeline(decoder_dir, device="cpu")
    assert isinstance(prior, StableCascadePriorPipeline) and prior.prior.config.block_out_channels == [16, 16]
    assert prior.image_encoder is not None and isinstance(decoder, StableCascadeDecoderPipeline)
    with pytest.raises(TypeError, match="lite: Stable Cascade arguments, but these sources are Würstchen v2"):
        load_pipeline(lite=True)  # the bundled default model is Würstchen v2


def test_offload_moves_each_module_once_per_use_in_order(tiny_sc_repos, monkeypatch):
    moves = []
    real = offload.move_module
    monkeypatch.setattr(offload, "move_module", lambda m, d: (moves.append((m, torch.device(d))), real(m, d)))
    plain = load_pipeline(*tiny_sc_repos, device="cpu")
    pipe = load_pipeline(*tiny_sc_repos, device="cpu")
    gpu = torch.device("cpu", 0)  # stands in for cuda:0
    names = {id(m): n for n, m in [("text encoder", pipe.prior_text.model), ("Stage C", pipe.prior),
                                   ("Stage B", pipe.decoder), ("Stage A", pipe.vqgan),
                                   ("image encoder", pipe.image_encoder)]}
    pipe.enable_model_cpu_offload(device=gpu)
    moves.clear()
    images = pipe(**{**KW, "decoder_guidance_scale": 2.0}).images
    events = [(names[id(m)], "in" if d == gpu else "out") for m, d in moves]
    assert events == [("text encoder", "in"), ("text encoder", "out"),  # the prompt
                      ("text encoder", "in"), ("text encoder", "out"),  # the negative (prior guidance 4)
                      ("Stage C", "in"), ("Stage C", "out"),  # its conditioning and the chain: one visit
                      ("Stage B", "in"), ("Stage B", "out"),  # the prior's pooled text reused: no encoder visit
                      ("Stage A", "in"), ("Stage A", "out")]
    assert torch.equal(images, plain(**{**KW, "decoder_guidance_scale": 2.0}).images)
