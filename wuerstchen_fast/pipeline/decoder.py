"""WuerstchenDecoderPipeline: image embeddings + text -> Stage B -> Stage A -> pixels.

The call mirrors diffusers' `WuerstchenDecoderPipeline` and draws the same random numbers in the same
order (start latents, one noise tensor per step). It differs where diffusers is wrong: several
prompts work (diffusers repeats each prompt's text once per embedding row of *all* prompts and
crashes), and embeddings whose grid the decoder cannot run are refused before any work.

Batch rule: with P prompts and E embedding rows (E a multiple of P, each prompt's rows consecutive,
as a prior returns them), every row is decoded num_images_per_prompt times with its prompt's text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..diffusion import make_timesteps
from .base import StagePipeline, StageRequest, call_arguments, config_value, with_call_defaults
from .checks import LatentGeometry, check_count, check_finite, check_guidance, check_output_type, check_steps
from .outputs import PipelineOutput
from .text import TextEncoder, check_text_inputs

__all__ = ["WuerstchenDecoderPipeline", "DecoderRequest", "OUTPUT_TYPES", "to_output_type"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def to_output_type(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [0, 1] -> the tensor, a (B, H, W, 3) float numpy array, or PIL images."""
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).cpu().float().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray(im) for im in (arr * 255).round().astype("uint8")]


@dataclass(frozen=True, kw_only=True)
class DecoderRequest(StageRequest):
    image_embeddings: torch.Tensor  # (E, C, h_c, w_c) on the pipeline's device and dtype
    text_repeat: int  # rows per prompt in the decoded batch: (E / P) * n
    latent_side: tuple[int, int]  # the Stage B latent's (h, w)


class WuerstchenDecoderPipeline(StagePipeline):
    """Stage B decoder + Stage A VQGAN + the decoder's text encoder.

    `decoder(x, r, effnet, clip) -> ε̂`; `vqgan.decode(latents)`; `text`: a `TextEncoder`. `config`:
    latent_dim_scale, vq_scale_factor, decoder_multiple (Stage B latent sides must be multiples of it),
    pixels_per_latent, c_in (latent channels), the schedule's s / scaler, and the prior's resolution_multiple
    (for the messages on embedding sizes).
    """

    _components = ("text_encoder", "decoder", "vqgan")
    _callback_tensor_inputs = ("latents", "text_encoder_hidden_states", "negative_prompt_embeds", "image_embeddings")
    _callback_replaceable = ("latents", "text_encoder_hidden_states", "image_embeddings")
    _default_config = dict(latent_dim_scale=10.67, vq_scale_factor=0.3764, decoder_multiple=16, pixels_per_latent=4,
                           c_in=4, s=0.008, scaler=1.0, resolution_multiple=42.67)
    output_types = OUTPUT_TYPES
    stage = "Stage B (decoder)"

    def __init__(self, decoder, vqgan, text: TextEncoder, **kwargs):
        super().__init__(text, **kwargs)
        self.decoder, self.vqgan = decoder, vqgan

    @property
    def geometry(self) -> LatentGeometry:
        c = self.config
        return LatentGeometry(c["resolution_multiple"], c["latent_dim_scale"], c["decoder_multiple"],
                              c["pixels_per_latent"])

    def _expected_text_widths(self) -> dict:
        return {"prompt_embeds": config_value(self.decoder, "clip_embd", None)}

    @torch.no_grad()
    @with_call_defaults
    def __call__(
        self,
        image_embeddings: torch.Tensor | list[torch.Tensor] | np.ndarray,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 12,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        seed: int | None = None,
        progress: bool = True,
    ):
        """Decode image embeddings (a prior's output) to images. Arguments as diffusers'
        WuerstchenDecoderPipeline (positionally too), plus `prompt_embeds` / `negative_prompt_embeds`
        (this decoder's text encoder's hidden states, one row per prompt), `seed` and `progress`.

        `latents`: the Stage B start noise, (E * num_images_per_prompt, 4, h, w). Callbacks as the prior's;
        "latents", "text_encoder_hidden_states" and "image_embeddings" (repeated per image) may be replaced.
        Returns `PipelineOutput(images)`, or the images themselves with `return_dict=False` (as diffusers).
        """
        return self._generate(self._prepare(**call_arguments(locals())))

    def _check_args(self, num_inference_steps, timesteps, guidance_scale, output_type,
                    callback_on_step_end_tensor_inputs, guidance_name: str = "guidance_scale"):
        """The checks that need no image embeddings (a combined pipeline runs them before its prior)."""
        check_steps("num_inference_steps", num_inference_steps, timesteps)
        guidance = check_guidance(guidance_name, guidance_scale)
        check_output_type(output_type, self.output_types)
        return guidance, self._check_callback_inputs(callback_on_step_end_tensor_inputs)

    def _prepare(self, image_embeddings, prompt=None, num_inference_steps=12, timesteps=None, guidance_scale=0.0,
                 negative_prompt=None, num_images_per_prompt=1, generator=None, latents=None, output_type="pil",
                 return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 seed=None, progress=True, **text_fields) -> DecoderRequest:
        """Every check of a call, before any model runs. `text_fields` as the prior's."""
        guidance, inputs = self._check_args(num_inference_steps, timesteps, guidance_scale, output_type,
                                            callback_on_step_end_tensor_inputs)
        embeds, negative_embeds = self._text_field_args(text_fields)
        prompts, negatives, batch = check_text_inputs(
            prompt, negative_prompt, embeds, negative_embeds, self._expected_text_widths(),
            prompt_required='pass prompt="" to decode without text')
        n = check_count("num_images_per_prompt", num_images_per_prompt)
        emb = self._check_embeddings(image_embeddings)
        rows = emb.shape[0]
        if rows % batch:
            raise ValueError(f"image_embeddings has {rows} rows for {batch} prompts: pass a number of rows that is a "
                             "multiple of the prompts, each prompt's rows consecutive (as the prior returns them)")
        side = (self.geometry.check_grid("height", emb.shape[2]), self.geometry.check_grid("width", emb.shape[3]))
        generator = self._generator(generator, seed, rows * n)
        shape = (rows * n, self.config["c_in"], *side)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents (the Stage B start noise) must have shape {shape} for {rows} image embedding(s) "
                             f"x {n}, got {got}")
        return DecoderRequest(image_embeddings=emb, prompts=prompts, negatives=negatives, embeds=embeds,
                              negative_embeds=negative_embeds, text_repeat=(rows // batch) * n, n=n, latent_side=side,
                              timesteps=make_timesteps(num_inference_steps, timesteps, self.device),
                              guidance=guidance, generator=generator, latents=latents, output_type=output_type,
                              return_dict=return_dict, callback=callback_on_step_end, tensor_inputs=inputs,
                              progress=progress)

    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = False, negative_prompt=None):
        """(prompt_embeds, negative_prompt_embeds or None) of this decoder's text encoder, each row repeated
        num_images_per_prompt times (diffusers' signature; `device` is accepted, the pipeline's is used)."""
        return self._encode_prompt(prompt, negative_prompt, {"prompt_embeds": None}, {"prompt_embeds": None},
                                   num_images_per_prompt, do_classifier_free_guidance)

    def _check_embeddings(self, emb) -> torch.Tensor:
        if isinstance(emb, (list, tuple)):
            if not emb or not all(isinstance(e, torch.Tensor) for e in emb):
                raise TypeError("image_embeddings as a list must hold torch.Tensors (they are concatenated)")
            emb = torch.cat(list(emb), dim=0)
        if isinstance(emb, np.ndarray):
            emb = torch.from_numpy(emb)
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"image_embeddings must be a torch.Tensor, a list of them or a numpy array (a prior's "
                            f"output), got {type(emb).__name__}")
        channels = config_value(self.decoder, "effnet_embd", None)
        if emb.dim() != 4 or (channels is not None and emb.shape[1] != channels):
            want = f"(batch, {channels if channels is not None else 'C'}, h, w)"
            raise ValueError(f"image_embeddings must have shape {want} (a prior's output), got {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"image_embeddings must be floating point, got {emb.dtype}")
        return emb.to(device=self.device, dtype=self.dtype)

    # The steps a family changes: what a callback sees, what the denoiser gets.
    def _named_conditioning(self, req: DecoderRequest, cond: dict, uncond: dict | None) -> dict:
        return {**self._text_states(cond, uncond),
                "image_embeddings": req.image_embeddings.repeat_interleave(req.n, dim=0)}

    def _conds_of(self, named: dict, cfg: bool) -> list:
        """(effnet, clip) for the decoder; with guidance the unconditional half sees zero embeddings."""
        effnet = named["image_embeddings"]
        return [torch.cat([effnet, torch.zeros_like(effnet)]) if cfg else effnet, named["text_encoder_hidden_states"]]

    def _generate(self, req: DecoderRequest):
        cfg = req.guidance > 1
        cond, uncond = self._text_conditioning(req.prompts, req.negatives, req.embeds, req.negative_embeds,
                                               req.text_repeat, cfg)
        named = self._named_conditioning(req, cond, uncond)
        shape = (req.image_embeddings.shape[0] * req.n, self.config["c_in"], *req.latent_side)
        x = self._prepare_latents(req.latents, shape, req.generator, self.device, self.dtype, "the Stage B start noise")
        x = self._denoise("decoder", x, req.timesteps, req.generator, req.guidance, named,
                          lambda nm: self._conds_of(nm, cfg), req.callback, req.tensor_inputs,
                          progress=req.progress, desc=self.stage)
        check_finite(x, self.stage)
        if req.output_type == "latent":
            images = x
        else:
            with self._placed("vqgan"):
                out = self.vqgan.decode(self.config["vq_scale_factor"] * x)
            images = getattr(out, "sample", out)
            check_finite(images, "Stage A (VQGAN decoder)")
            images = to_output_type(images.clamp(0, 1), req.output_type)
        return PipelineOutput(images) if req.return_dict else images
