"""Tiny random Würstchen repos saved by diffusers itself, for the pipeline and CLI tests.

`tiny_repos` (session fixture) -> (prior_dir, decoder_dir): `WuerstchenPriorPipeline` and
`WuerstchenDecoderPipeline` built from the random models of `_model_factories` (every parameter
randomized), small random CLIP text models, and CLIPTokenizers made offline from open_clip's BPE
vocabulary, written with `save_pretrained` (the warp-ai/wuerstchen-prior and warp-ai/wuerstchen
layouts). `diffusers_combined(prior_dir, decoder_dir)` loads them back as diffusers' combined pipeline,
`diffusers_split(prior_dir, decoder_dir)` as its prior and decoder pipelines.
"""
import pytest
import torch

from _model_factories import (make_clip_text_model, make_clip_tokenizer, make_diffusers_decoder,
                              make_diffusers_prior, make_diffusers_vqgan)


def make_decoder(seed):
    """The random decoder with its output head scaled down. Stage B returns (x - a) / b with
    b = sigmoid(.)·(1 − 2e-3) + 1e-3: fully random heads put b near 1e-3 somewhere, and that
    division turns float32 summation-order noise (1e-7) into 1e-3 image differences over a chain,
    hiding real bugs behind noise. Scaled by 0.1, b stays near 0.5; every parameter is still random."""
    m = make_diffusers_decoder(seed=seed)
    with torch.no_grad():
        m.clf[1].weight.mul_(0.1)
        m.clf[1].bias.mul_(0.1)
    return m


def build_repos(root):
    from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    prior = WuerstchenPriorPipeline(
        tokenizer=make_clip_tokenizer(root / "tok_prior"),
        text_encoder=make_clip_text_model(seed=1, hidden_size=48),  # = the prior's c_cond
        prior=make_diffusers_prior(seed=2),
        scheduler=DDPMWuerstchenScheduler(),
    )
    decoder = WuerstchenDecoderPipeline(
        tokenizer=make_clip_tokenizer(root / "tok_decoder"),
        text_encoder=make_clip_text_model(seed=3, hidden_size=40),  # = the decoder's clip_embd
        decoder=make_decoder(seed=4),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=make_diffusers_vqgan(seed=5),
    )
    prior.save_pretrained(root / "wuerstchen-prior")
    decoder.save_pretrained(root / "wuerstchen")
    return root / "wuerstchen-prior", root / "wuerstchen"


def _diffusers_parts(prior_dir, decoder_dir) -> dict:
    """Both saved repos reloaded component by component (diffusers' from_pretrained cannot resolve its
    deprecated Würstchen model classes from model_index.json)."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(decoder_dir / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(decoder_dir / "text_encoder").eval(),
        decoder=WuerstchenDiffNeXt.from_pretrained(decoder_dir / "decoder").eval(),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder_dir / "scheduler"),
        vqgan=PaellaVQModel.from_pretrained(decoder_dir / "vqgan").eval(),
        prior_tokenizer=CLIPTokenizer.from_pretrained(prior_dir / "tokenizer"),
        prior_text_encoder=CLIPTextModel.from_pretrained(prior_dir / "text_encoder").eval(),
        prior_prior=WuerstchenPrior.from_pretrained(prior_dir / "prior").eval(),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(prior_dir / "scheduler"),
    )


def diffusers_combined(prior_dir, decoder_dir):
    """The saved repos as diffusers' WuerstchenCombinedPipeline."""
    from diffusers import WuerstchenCombinedPipeline

    pipe = WuerstchenCombinedPipeline(**_diffusers_parts(prior_dir, decoder_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_split(prior_dir, decoder_dir):
    """The saved repos as diffusers' (WuerstchenPriorPipeline, WuerstchenDecoderPipeline)."""
    from diffusers import WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    c = _diffusers_parts(prior_dir, decoder_dir)
    prior = WuerstchenPriorPipeline(tokenizer=c["prior_tokenizer"], text_encoder=c["prior_text_encoder"],
                                    prior=c["prior_prior"], scheduler=c["prior_scheduler"])
    decoder = WuerstchenDecoderPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"],
                                        decoder=c["decoder"], scheduler=c["scheduler"], vqgan=c["vqgan"])
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    return prior, decoder


@pytest.fixture(scope="session")
def tiny_repos(tmp_path_factory):
    with torch.random.fork_rng():
        return build_repos(tmp_path_factory.mktemp("repos"))
