"""WuerstchenPriorPipeline: text -> Stage C -> image embeddings, with diffusers' call signature.

Same random draws as diffusers' `WuerstchenPriorPipeline` for a seed (the start latents, then one
noise tensor per step), so a seed gives its embeddings. The embeddings come out denormalised
(`latents * latent_mean - latent_std`), ready for a decoder's `image_embeddings=`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..diffusion import make_timesteps
from .base import StagePipeline, StageRequest, call_arguments, config_value, with_call_defaults
from .checks import check_count, check_finite, check_guidance, check_output_type, check_side, check_steps
from .outputs import WuerstchenPriorPipelineOutput
from .text import TextEncoder, check_text_inputs

__all__ = ["WuerstchenPriorPipeline", "PriorRequest"]


@dataclass(frozen=True, kw_only=True)
class PriorRequest(StageRequest):
    batch: int  # prompts (or embedding rows); the chain runs batch * n images
    grid: tuple[int, int]  # the Stage C latent's (h, w)


class WuerstchenPriorPipeline(StagePipeline):
    """Stage C prior + its text encoder. `prior(x, r, c) -> ε̂`; `text`: a `TextEncoder`.

    `config`: latent_mean, latent_std, resolution_multiple, c_in (latent channels) and the
    schedule's s / scaler.
    """

    _components = ("text_encoder", "prior")
    _callback_tensor_inputs = ("latents", "text_encoder_hidden_states", "negative_prompt_embeds")
    _callback_replaceable = ("latents", "text_encoder_hidden_states")
    _default_config = dict(latent_mean=42.0, latent_std=1.0, resolution_multiple=42.67, c_in=16, s=0.008, scaler=1.0)
    output_types = ("pt", "np")
    stage = "Stage C (prior)"

    def __init__(self, prior, text: TextEncoder, **kwargs):
        super().__init__(text, **kwargs)
        self.prior = prior

    def _expected_text_widths(self) -> dict:
        return {"prompt_embeds": config_value(self.prior, "c_cond", None)}

    @torch.no_grad()
    @with_call_defaults
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 60,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 8.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        seed: int | None = None,
        progress: bool = True,
    ):
        """Image embeddings for the prompts. Arguments as diffusers' WuerstchenPriorPipeline, plus `seed`
        (a CPU generator seeded with it) and `progress` (a tqdm bar).

        `prompt_embeds` / `negative_prompt_embeds` (batch, 77, C) replace the text encoder (one row per
        prompt; `encode_prompt` makes them). Callbacks: `cb(pipe, i, t, kwargs) -> dict`, with the tensors
        named in `callback_on_step_end_tensor_inputs`; a returned "latents" or "text_encoder_hidden_states"
        replaces it for the remaining steps. Returns `WuerstchenPriorPipelineOutput(image_embeddings)`, or
        `(image_embeddings,)` with `return_dict=False`.
        """
        return self._generate(self._prepare(**call_arguments(locals())))

    def _prepare(self, prompt=None, height=1024, width=1024, num_inference_steps=60, timesteps=None,
                 guidance_scale=8.0, negative_prompt=None, num_images_per_prompt=1, generator=None, latents=None,
                 output_type="pt", return_dict=True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), seed=None, progress=True,
                 **text_fields) -> PriorRequest:
        """Every check of a call, before any model runs. `text_fields`: `prompt_embeds=`,
        `negative_prompt_embeds=` (and a family's other fields, e.g. the pooled ones)."""
        embeds, negative_embeds = self._text_field_args(text_fields)
        prompts, negatives, batch = check_text_inputs(prompt, negative_prompt, embeds, negative_embeds,
                                                      self._expected_text_widths())
        check_steps("num_inference_steps", num_inference_steps, timesteps)
        guidance = check_guidance("guidance_scale", guidance_scale)
        n = check_count("num_images_per_prompt", num_images_per_prompt)
        check_output_type(output_type, self.output_types)
        rm = self.config["resolution_multiple"]
        grid = (math.ceil(check_side("height", height) / rm), math.ceil(check_side("width", width) / rm))
        generator = self._generator(generator, seed, batch * n)
        inputs = self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        shape = (batch * n, self.config["c_in"], *grid)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents (the Stage C start noise) must have shape {shape} for {batch} prompt(s) x "
                             f"{n} at {height}x{width}, got {got}")
        return PriorRequest(prompts=prompts, negatives=negatives, embeds=embeds, negative_embeds=negative_embeds,
                            batch=batch, n=n, grid=grid, timesteps=make_timesteps(num_inference_steps, timesteps,
                                                                                   self.device),
                            guidance=guidance, generator=generator, latents=latents, output_type=output_type,
                            return_dict=return_dict, callback=callback_on_step_end, tensor_inputs=inputs,
                            progress=progress)

    def encode_prompt(self, device=None, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None):
        """(prompt_embeds, negative_prompt_embeds or None), each row repeated num_images_per_prompt times, as
        diffusers' `encode_prompt`; pass them back as `prompt_embeds=` / `negative_prompt_embeds=` (with
        num_images_per_prompt=1). `device` is accepted for diffusers' signature; the pipeline's is used."""
        return self._encode_prompt(prompt, negative_prompt, {"prompt_embeds": prompt_embeds},
                                   {"prompt_embeds": negative_prompt_embeds}, num_images_per_prompt,
                                   do_classifier_free_guidance)

    # The three steps a family changes: what a callback sees, what the denoiser gets, what comes out.
    def _named_conditioning(self, req: PriorRequest, cond: dict, uncond: dict | None) -> dict:
        """The conditioning tensors by the names callbacks use."""
        return self._text_states(cond, uncond)

    def _conds_of(self, named: dict, cfg: bool) -> list:
        """The denoiser's arguments after (x, r), from the named tensors."""
        return [named["text_encoder_hidden_states"]]

    def _output(self, req: PriorRequest, embeddings, named: dict):
        return WuerstchenPriorPipelineOutput(embeddings) if req.return_dict else (embeddings,)

    def _generate(self, req: PriorRequest):
        cfg = req.guidance > 1
        cond, uncond = self._text_conditioning(req.prompts, req.negatives, req.embeds, req.negative_embeds, req.n, cfg)
        named = self._named_conditioning(req, cond, uncond)
        shape = (req.batch * req.n, self.config["c_in"], *req.grid)
        x = self._prepare_latents(req.latents, shape, req.generator, self.device, self.dtype, "the Stage C start noise")
        x = self._denoise("prior", x, req.timesteps, req.generator, req.guidance, named,
                          lambda nm: self._conds_of(nm, cfg), req.callback, req.tensor_inputs,
                          progress=req.progress, desc=self.stage)
        check_finite(x, self.stage)
        # Denormalised for the decoder (a family whose decoder takes the latents as they are sets 1 and 0).
        embeddings = x * self.config["latent_mean"] - self.config["latent_std"]
        if req.output_type == "np":
            embeddings = embeddings.cpu().float().numpy()
        return self._output(req, embeddings, named)
