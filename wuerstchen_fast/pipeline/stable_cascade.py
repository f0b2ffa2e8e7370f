"""Stable Cascade (Würstchen v3) pipelines with diffusers' call signatures: the prior (text, optionally
reference images -> image embeddings), the decoder (image embeddings + pooled text -> images) and the
combined call.

They reproduce diffusers' `StableCascadePriorPipeline` / `StableCascadeDecoderPipeline` images for a seed:
the same random draws in the same order, the same schedule (`DDPMWuerstchenScheduler`, as diffusers' SC
pipelines use), the same conditioning. What differs from v2:

* one CLIP ViT-bigG text encoder with projection serves both stages; the prior reads its last layer's
  output before the final LayerNorm (`prompt_embeds`) and the projected pooled row (`prompt_embeds_pooled`),
  the decoder only the pooled row;
* the prior's latents go to the decoder unchanged (v2 rescales them by 42);
* image variation: `images=` (or `image_embeds=`) of the prior, CLIP ViT-L/14 image embeddings;
* the models take their conditioning through `prepare_conditioning` (CLIP tokens, and the decoder's
  effnet / pixels maps), computed once per call, then `denoise` per step.

Where diffusers is wrong or silent, these follow the v2 pipelines: several prompts work, `timesteps=`
is honoured (diffusers' prior overwrites it), sizes the decoder cannot run (an odd latent side) are
refused before any work, and NaN/Inf after a stage is reported with the stage and the dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .base import call_arguments, config_value, with_call_defaults
from .checks import check_finite
from .decoder import OUTPUT_TYPES, WuerstchenDecoderPipeline
from .outputs import _OutputAccess
from .prior import WuerstchenPriorPipeline
from .text import TextEncoder

__all__ = ["StableCascadePriorPipeline", "StableCascadeDecoderPipeline", "StableCascadePriorPipelineOutput",
           "CascadeTextEncoder"]

@dataclass(eq=False)
class StableCascadePriorPipelineOutput(_OutputAccess):
    """As diffusers' StableCascadePriorPipelineOutput: the image embeddings and the text conditioning used."""

    image_embeddings: Any
    prompt_embeds: Any = None
    prompt_embeds_pooled: Any = None
    negative_prompt_embeds: Any = None
    negative_prompt_embeds_pooled: Any = None


class CascadeTextEncoder(TextEncoder):
    """Tokenizer + CLIP text model with projection -> {prompt_embeds: the last layer's output before the final
    LayerNorm (B, 77, width), prompt_embeds_pooled: the projected end-of-text row (B, 1, proj)}.

    The model is ours (`CLIPTextEncoder` with a projection: `.encode`) or transformers'
    `CLIPTextModelWithProjection` (`output_hidden_states=True`: `hidden_states[-1]`, `text_embeds`)."""

    def fields(self, prompts: list[str], device, dtype) -> dict:
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)
        if hasattr(self.model, "encode"):
            out = self.model.encode(ids, mask)
            if out.text_embeds is None:
                raise ValueError("Stable Cascade needs a text encoder with a text projection (CLIP ViT-bigG-14 as "
                                 "CLIPTextModelWithProjection); this one has none")
            hidden, pooled = out.pre_norm_hidden_state, out.text_embeds
        else:
            out = self.model(ids, attention_mask=mask, output_hidden_states=True)
            hidden, pooled = out.hidden_states[-1], out.text_embeds
        return {"prompt_embeds": hidden.to(dtype), "prompt_embeds_pooled": pooled[:, None].to(dtype)}


class _CascadeStage:
    """What both Stable Cascade stage pipelines add to the v2 ones: the pooled text field and the split
    forward of `StableCascadeUNet` in the loop."""

    _text_fields = ("prompt_embeds", "prompt_embeds_pooled")

    def _encode(self, prompts: list[str]) -> dict:
        with self._placed("text_encoder"):
            fields = self.text.fields(prompts, self.device, self.dtype)
        for name, t in fields.items():
            check_finite(t, f"{type(self).__name__}'s text encoder ({name})")
        return fields

    @staticmethod
    def _denoiser(model):
        return model.denoise  # the per-step half of the UNet: the conditioning comes precomputed

    def _denoise(self, name: str, *args, **kwargs):
        # The conditioning runs the UNet's own mappers: one placement for it and the chain (offload moves once).
        with self._placed(name):
            return super()._denoise(name, *args, **kwargs)

    def _cfg_pair(self, named: dict, name: str, cfg: bool) -> torch.Tensor:
        """[cond; uncond] of a field as the denoiser sees it."""
        cond, uncond = named[name], named.get(f"negative_{name}")
        return torch.cat([cond, uncond]) if cfg else cond


class StableCascadePriorPipeline(_CascadeStage, WuerstchenPriorPipeline):
    """Stable Cascade Stage C + the text encoder (`CascadeTextEncoder`), optionally the CLIP image encoder
    and its preprocessing (`feature_extractor`: a callable images -> pixel_values) for `images=`."""

    _components = ("image_encoder", "text_encoder", "prior")
    _callback_tensor_inputs = ("latents", "text_encoder_hidden_states", "negative_prompt_embeds")
    _callback_replaceable = ("latents", "text_encoder_hidden_states")
    # The latents go to the decoder as they are: x * 1 - 0.
    _default_config = dict(latent_mean=1.0, latent_std=0.0, resolution_multiple=42.67, c_in=16, s=0.008, scaler=1.0)
    stage = "Stage C (Stable Cascade prior)"

    def __init__(self, prior, text: CascadeTextEncoder, image_encoder=None, feature_extractor=None, **kwargs):
        super().__init__(prior, text, **kwargs)
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor

    def _modules(self):
        return [(n, m) for n, m in super()._modules() if m is not None]

    def _expected_text_widths(self) -> dict:
        return {"prompt_embeds": config_value(self.prior, "clip_text_in_channels", None),
                "prompt_embeds_pooled": config_value(self.prior, "clip_text_pooled_in_channels", None)}

    @torch.no_grad()
    @with_call_defaults
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images=None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 20,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_pooled: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_pooled: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
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
        """Image embeddings (the decoder's `image_embeddings=`) for the prompts. Arguments as diffusers'
        StableCascadePriorPipeline, plus `seed` and `progress`.

        `images`: reference images (PIL or (3, H, W) tensors) for image variation: each becomes 4 CLIP image
        tokens, shared by every prompt; `image_embeds` (1, n, 768) passes them precomputed. Without either
        the prior sees one zero image embedding, as in text-to-image. `timesteps` (t values from 1 to 0)
        replaces the step count. Returns StableCascadePriorPipelineOutput (the embeddings and the text
        conditioning, repeated per image), or its five fields as a tuple with `return_dict=False`.
        """
        args = call_arguments(locals())
        images, image_embeds = args.pop("images"), args.pop("image_embeds")
        req = self._prepare(**args)
        req.extra.update(self._check_images(images, image_embeds))
        return self._generate(req)

    def _check_images(self, images, image_embeds) -> dict:
        if images is not None and image_embeds is not None:
            raise ValueError("pass either images or image_embeds, not both")
        width = config_value(self.prior, "clip_image_in_channels", None)
        if images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if not images:
                raise ValueError("images is an empty list: pass reference images, or leave images out")
            if self.image_encoder is None or self.feature_extractor is None:
                raise ValueError("images= needs the prior's image encoder and its preprocessing: load the prior from "
                                 "a folder with image_encoder/ and feature_extractor/ (stabilityai/stable-cascade-prior)"
                                 " or pass image_encoder= to load_pipeline")
        if image_embeds is not None:
            if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or (
                    width is not None and image_embeds.shape[-1] != width):
                got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
                raise ValueError(f"image_embeds must be a (1, images, {width}) tensor (CLIP image embeddings), got {got}")
        return {"images": images, "image_embeds": image_embeds}

    def encode_image(self, images) -> torch.Tensor:
        """(1, len(images), proj) CLIP image embeddings of reference images, as diffusers' encode_image makes them."""
        embeds = []
        with self._placed("image_encoder"):
            for image in images:
                pixels = self.feature_extractor(image)
                pixels = getattr(pixels, "pixel_values", pixels).to(device=self.device, dtype=self.dtype)
                out = self.image_encoder(pixels)
                embeds.append(getattr(out, "image_embeds", out)[:, None])
        return torch.cat(embeds, dim=1)

    def encode_prompt(self, device=None, batch_size=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, prompt=None, negative_prompt=None,
                      prompt_embeds=None, prompt_embeds_pooled=None, negative_prompt_embeds=None,
                      negative_prompt_embeds_pooled=None):
        """(prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds, negative_prompt_embeds_pooled), each
        row repeated num_images_per_prompt times, as diffusers' encode_prompt (`device` / `batch_size` are
        accepted for its signature)."""
        return self._encode_prompt(
            prompt, negative_prompt, {"prompt_embeds": prompt_embeds, "prompt_embeds_pooled": prompt_embeds_pooled},
            {"prompt_embeds": negative_prompt_embeds, "prompt_embeds_pooled": negative_prompt_embeds_pooled},
            num_images_per_prompt, do_classifier_free_guidance)

    def _named_conditioning(self, req, cond: dict, uncond: dict | None) -> dict:
        named = self._text_states(cond, uncond)
        named.update(prompt_embeds=cond["prompt_embeds"], prompt_embeds_pooled=cond["prompt_embeds_pooled"],
                     negative_prompt_embeds_pooled=uncond["prompt_embeds_pooled"] if uncond else None)
        rows = req.batch * req.n
        if req.extra.get("images") is not None:
            img = self.encode_image(req.extra["images"]).repeat(rows, 1, 1)
        elif req.extra.get("image_embeds") is not None:
            img = req.extra["image_embeds"].to(device=self.device, dtype=self.dtype).repeat(rows, 1, 1)
        else:
            width = config_value(self.prior, "clip_image_in_channels", None)
            img = torch.zeros(rows, 1, width, device=self.device, dtype=self.dtype) if width else None
        named["image_embeds"] = img
        return named

    def _conds_of(self, named: dict, cfg: bool) -> list:
        img = named["image_embeds"]
        if img is not None and cfg:
            img = torch.cat([img, torch.zeros_like(img)])
        pooled = self._cfg_pair(named, "prompt_embeds_pooled", cfg)
        return list(self.prior.prepare_conditioning(pooled, named["text_encoder_hidden_states"], img))

    def _output(self, req, embeddings, named: dict):
        fields = [embeddings] + [named.get(k) for k in ("prompt_embeds", "prompt_embeds_pooled",
                                                         "negative_prompt_embeds", "negative_prompt_embeds_pooled")]
        if req.output_type == "np":  # as diffusers: the embeddings and the unpooled text states as numpy
            fields = [f.cpu().float().numpy() if isinstance(f, torch.Tensor) and i in (1, 3) else f
                      for i, f in enumerate(fields)]
        return StableCascadePriorPipelineOutput(*fields) if req.return_dict else tuple(fields)


class StableCascadeDecoderPipeline(_CascadeStage, WuerstchenDecoderPipeline):
    """Stable Cascade Stage B + Stage A (the VQGAN) + the text encoder (`CascadeTextEncoder`)."""

    _text_fields = ("prompt_embeds_pooled",)  # the decoder reads the pooled row only
    _callback_tensor_inputs = ("latents", "prompt_embeds_pooled", "negative_prompt_embeds", "image_embeddings")
    _callback_replaceable = ("latents", "prompt_embeds_pooled", "image_embeddings")
    _default_config = dict(latent_dim_scale=10.67, vq_scale_factor=0.3764, decoder_multiple=2, pixels_per_latent=4,
                           c_in=4, s=0.008, scaler=1.0, resolution_multiple=42.67)
    output_types = OUTPUT_TYPES
    stage = "Stage B (Stable Cascade decoder)"

    def _expected_text_widths(self) -> dict:
        return {"prompt_embeds_pooled": config_value(self.decoder, "clip_text_pooled_in_channels", None)}

    @torch.no_grad()
    @with_call_defaults
    def __call__(
        self,
        image_embeddings: torch.Tensor | list[torch.Tensor] | np.ndarray,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 10,
        guidance_scale: float = 0.0,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        timesteps: Sequence[float] | None = None,
        seed: int | None = None,
        progress: bool = True,
    ):
        """Decode image embeddings (the prior's output, as they are) to images. Arguments as diffusers'
        StableCascadeDecoderPipeline (positionally too), plus `timesteps`, `seed` and `progress`.

        The decoder is conditioned on the pooled text only: `prompt_embeds_pooled` /
        `negative_prompt_embeds_pooled` replace the text encoder; `prompt_embeds` / `negative_prompt_embeds`
        are accepted (diffusers' combined pipeline passes them) and not used. Returns PipelineOutput(images),
        or the images themselves with `return_dict=False`.
        """
        if prompt_embeds is not None and prompt_embeds_pooled is None and prompt is None:
            raise ValueError("the Stable Cascade decoder reads the pooled text embedding only: pass "
                             "prompt_embeds_pooled= (the prior's output has it), or prompt=")
        return self._generate(self._prepare(
            image_embeddings, prompt, num_inference_steps, timesteps, guidance_scale, negative_prompt,
            num_images_per_prompt, generator, latents, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs, seed, progress, prompt_embeds_pooled=prompt_embeds_pooled,
            negative_prompt_embeds_pooled=negative_prompt_embeds_pooled))

    def encode_prompt(self, device=None, batch_size=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = False, prompt=None, negative_prompt=None, **_embeds):
        """(None, prompt_embeds_pooled, None, negative_prompt_embeds_pooled or None), as diffusers' decoder
        returns them (it computes the pooled embeddings only)."""
        pooled, negative = self._encode_prompt(prompt, negative_prompt, {"prompt_embeds_pooled": None},
                                               {"prompt_embeds_pooled": None}, num_images_per_prompt,
                                               do_classifier_free_guidance)
        return None, pooled, None, negative

    def _named_conditioning(self, req, cond: dict, uncond: dict | None) -> dict:
        return {"prompt_embeds_pooled": cond["prompt_embeds_pooled"],
                "negative_prompt_embeds_pooled": uncond["prompt_embeds_pooled"] if uncond else None,
                "negative_prompt_embeds": None,
                "image_embeddings": req.image_embeddings.repeat_interleave(req.n, dim=0)}

    def _conds_of(self, named: dict, cfg: bool) -> list:
        effnet = named["image_embeddings"]
        if cfg:
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])
        ls = self.config["latent_dim_scale"]
        size = (int(effnet.shape[-2] * ls), int(effnet.shape[-1] * ls))
        return list(self.decoder.prepare_conditioning(self._cfg_pair(named, "prompt_embeds_pooled", cfg),
                                                      effnet=effnet, sample_size=size))

