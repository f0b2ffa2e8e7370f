"""Tiny random Stable Cascade repos saved by diffusers itself, for the pipeline and CLI tests.

`tiny_sc_repos` (session fixture) -> (prior_dir, decoder_dir) in the layouts of stabilityai/stable-cascade-prior
(prior/, prior_lite/, text_encoder/, tokenizer/, scheduler/, image_encoder/, feature_extractor/) and
stabilityai/stable-cascade (decoder/, decoder_lite/, vqgan/, text_encoder/, tokenizer/, scheduler/), written with
`save_pretrained` from random models (every parameter randomized): a tiny CLIPTextModelWithProjection shared by
both stages as in the release, a tiny CLIPVisionModelWithProjection, CLIPTokenizers made offline from
open_clip's BPE vocabulary. `diffusers_sc_pipelines(prior_dir, decoder_dir, lite=False)` loads them back as
diffusers' (StableCascadePriorPipeline, StableCascadeDecoderPipeline).
"""
import pytest
import torch

from _model_factories import make_clip_tokenizer, make_diffusers_vqgan
from wuerstchen_fast.testing.random_stable_cascade import (make_clip_text_with_projection,
                                                           make_clip_vision_with_projection,
                                                           make_diffusers_stable_cascade)

LITE = dict(block_out_channels=[16, 16], conditioning_dim=16)  # the "lite" prior: narrower
LITE_DECODER = dict(up_blocks_repeat_mappers=[1, 1, 1])  # the "lite" decoder: fewer repeats


def build_sc_repos(root):
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline
    from transformers import CLIPImageProcessor

    text = make_clip_text_with_projection(seed=1)
    size = 28  # the tiny vision tower's input side
    prior = StableCascadePriorPipeline(
        tokenizer=make_clip_tokenizer(root / "tok"), text_encoder=text,
        prior=make_diffusers_stable_cascade("tiny_prior", seed=2), scheduler=DDPMWuerstchenScheduler(),
        image_encoder=make_clip_vision_with_projection(seed=6),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    decoder = StableCascadeDecoderPipeline(
        tokenizer=make_clip_tokenizer(root / "tok"), text_encoder=text,
        decoder=make_diffusers_stable_cascade("tiny_decoder", seed=4), scheduler=DDPMWuerstchenScheduler(),
        vqgan=make_diffusers_vqgan(seed=5))
    prior.save_pretrained(root / "stable-cascade-prior")
    decoder.save_pretrained(root / "stable-cascade")
    make_diffusers_stable_cascade("tiny_prior", seed=7, **LITE).save_pretrained(root / "stable-cascade-prior" / "prior_lite")
    make_diffusers_stable_cascade("tiny_decoder", seed=8, **LITE_DECODER).save_pretrained(
        root / "stable-cascade" / "decoder_lite")
    return root / "stable-cascade-prior", root / "stable-cascade"


def diffusers_sc_pipelines(prior_dir, decoder_dir, lite: bool = False):
    """Both saved repos reloaded component by component (diffusers' from_pretrained on the deprecated
    pipelines warns and may not resolve them) as (StableCascadePriorPipeline, StableCascadeDecoderPipeline)."""
    from diffusers import (DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline,
                           StableCascadeUNet)
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    sub = "_lite" if lite else ""
    prior = StableCascadePriorPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(prior_dir / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(prior_dir / "text_encoder").eval(),
        prior=StableCascadeUNet.from_pretrained(prior_dir / f"prior{sub}").eval(),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(prior_dir / "scheduler"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(prior_dir / "image_encoder").eval(),
        feature_extractor=CLIPImageProcessor.from_pretrained(prior_dir / "feature_extractor"))
    decoder = StableCascadeDecoderPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(decoder_dir / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(decoder_dir / "text_encoder").eval(),
        decoder=StableCascadeUNet.from_pretrained(decoder_dir / f"decoder{sub}").eval(),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder_dir / "scheduler"),
        vqgan=PaellaVQModel.from_pretrained(decoder_dir / "vqgan").eval())
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    return prior, decoder


@pytest.fixture(scope="session")
def tiny_sc_repos(tmp_path_factory):
    with torch.random.fork_rng():
        return build_sc_repos(tmp_path_factory.mktemp("sc_repos"))
