"""StableCascadeCombinedPipeline: text (and reference images) -> Stage C -> Stage B -> Stage A, as one call.

The call mirrors diffusers' `StableCascadeCombinedPipeline` argument for argument; it runs `.prior_pipe`
(`StableCascadePriorPipeline`) then `.decoder_pipe` (`StableCascadeDecoderPipeline`) with one generator, so
the random draws come in diffusers' order and a seed gives the images of diffusers' prior + decoder
pipelines. The defaults are those of the prior and decoder pipelines and of Stability's demo (1024x1024,
prior 20 steps at guidance 4, decoder 10 steps without guidance), not the combined class's stale 512x512 /
60 / 12. When both stages share one text encoder (as released) the decoder reuses the prior's pooled
embeddings instead of encoding the prompts again.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import with_call_defaults
from .checks import check_guidance, check_steps
from .core import WuerstchenPipeline
from .stable_cascade import StableCascadeDecoderPipeline, StableCascadePriorPipeline

__all__ = ["StableCascadeCombinedPipeline"]


class StableCascadeCombinedPipeline(WuerstchenPipeline):
    """Stable Cascade's stages as `.prior_pipe` and `.decoder_pipe`. prior / decoder: `StableCascadeUNet`s;
    vqgan: Stage A; prior_text / decoder_text: `CascadeTextEncoder`s (the same one, as released);
    `image_encoder` / `feature_extractor`: the prior's CLIP image tower and preprocessing (for `images=`)."""

    prior_pipeline_class = StableCascadePriorPipeline
    decoder_pipeline_class = StableCascadeDecoderPipeline

    image_encoder = property(lambda self: self.prior_pipe.image_encoder)

    @property
    def components(self) -> dict:
        """Every part by the names of diffusers' StableCascadeCombinedPipeline."""
        p, d = self.prior_pipe, self.decoder_pipe
        return dict(tokenizer=d.tokenizer, text_encoder=d.text_encoder, decoder=d.decoder, vqgan=d.vqgan,
                    prior_prior=p.prior, prior_text_encoder=p.text_encoder, prior_tokenizer=p.tokenizer,
                    prior_image_encoder=p.image_encoder, prior_feature_extractor=p.feature_extractor)

    @torch.no_grad()
    @with_call_defaults
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images=None,
        height: int = 1024,
        width: int = 1024,
        prior_num_inference_steps: int = 20,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 10,
        decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_pooled: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_pooled: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        prior_callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        prior_timesteps: Sequence[float] | None = None,
        decoder_timesteps: Sequence[float] | None = None,
        image_embeds: torch.Tensor | None = None,
        seed: int | None = None,
        progress: bool = True,
    ):
        """Generate images. Arguments as diffusers' StableCascadeCombinedPipeline, plus `prior_timesteps` /
        `decoder_timesteps` (t values replacing the step counts), `image_embeds` (precomputed CLIP image
        embeddings instead of `images`), `seed` (a CPU generator seeded with it) and `progress`.

        `prompt_embeds` & co. are the shared text encoder's outputs (the prior's `encode_prompt` makes them);
        they condition both stages. Callbacks follow diffusers: `cb(pipe, i, t, kwargs) -> dict` with `pipe` the
        running stage pipeline. Returns `PipelineOutput(images)`, or the images themselves with
        `return_dict=False` (as diffusers).
        """
        # ---- every check of both stages before any work, in this call's argument names
        check_steps("prior_num_inference_steps", prior_num_inference_steps, prior_timesteps)
        check_steps("num_inference_steps", num_inference_steps, decoder_timesteps)
        check_guidance("prior_guidance_scale", prior_guidance_scale)
        w_dec, _ = self.decoder_pipe._check_args(num_inference_steps, decoder_timesteps, decoder_guidance_scale,
                                                 output_type, callback_on_step_end_tensor_inputs,
                                                 guidance_name="decoder_guidance_scale")
        self.geometry.check("height", height)
        self.geometry.check("width", width)
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either generator or seed, not both")
            generator = torch.Generator("cpu").manual_seed(int(seed))
        prior = self.prior_pipe
        req = prior._prepare(
            prompt=prompt, height=height, width=width, num_inference_steps=prior_num_inference_steps,
            timesteps=prior_timesteps, guidance_scale=prior_guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents, output_type="pt",
            return_dict=True, callback_on_step_end=prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs, progress=progress,
            prompt_embeds=prompt_embeds, prompt_embeds_pooled=prompt_embeds_pooled,
            negative_prompt_embeds=negative_prompt_embeds, negative_prompt_embeds_pooled=negative_prompt_embeds_pooled)
        req.extra.update(prior._check_images(images, image_embeds))
        out = prior._generate(req)

        # ---- the decoder: the prior's pooled text rows (one per image) when the text encoder is shared and they
        # cover what the decoder needs, else its own encoder on the prompts
        shared = self.decoder_pipe.text is prior.text
        have_negatives = out.negative_prompt_embeds_pooled is not None or w_dec <= 1
        if (shared and have_negatives) or prompt is None:
            negatives = None if have_negatives else _per_image(negative_prompt, num_images_per_prompt)
            text = dict(prompt_embeds_pooled=out.prompt_embeds_pooled,
                        negative_prompt_embeds_pooled=out.negative_prompt_embeds_pooled if w_dec > 1 else None)
            texts = dict(prompt=None, negative_prompt=negatives)
        else:
            text, texts = {}, dict(prompt=prompt, negative_prompt=negative_prompt)
        return self.decoder_pipe(
            out.image_embeddings, num_inference_steps=num_inference_steps, guidance_scale=decoder_guidance_scale,
            num_images_per_prompt=1, generator=generator, output_type=output_type, return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, timesteps=decoder_timesteps,
            progress=progress, **texts, **text)


def _per_image(negative_prompt, n: int):
    """A negative prompt list repeated to one entry per image (the rows of the prior's output)."""
    if isinstance(negative_prompt, (list, tuple)):
        return [p for p in negative_prompt for _ in range(n)]
    return negative_prompt
