"""WuerstchenPipeline: text -> Stage C prior -> Stage B decoder -> Stage A VQGAN, as one call.

The call mirrors diffusers' `WuerstchenCombinedPipeline` argument for argument and reproduces
its images for a given seed (same random draws in the same order: prior latents, one noise
tensor per prior step, decoder latents, one per decoder step). It differs where diffusers is
wrong: a batch of several prompts works (diffusers' decoder repeats the text embeddings
batch² times and crashes), and sizes the decoder cannot run are refused before any work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..diffusion import DEFAULT_STAGE_C_TIMESTEPS, DenoiseLoop, make_timesteps
from ..diffusion.sampler import draw_noise
from .checks import (LatentGeometry, check_dtype, check_finite, check_generator, check_guidance, check_prompts,
                     check_steps)

__all__ = ["WuerstchenPipeline", "PipelineOutput", "DEFAULT_STAGE_C_TIMESTEPS"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) numpy array, (B, 3, H, W) tensor, or Stage B latents


class TextEncoder:
    """Tokenizer + text model -> last_hidden_state, padded to the tokenizer's max length with the
    attention mask applied (what the released models were trained on)."""

    def __init__(self, tokenizer, model: Callable[..., Any]):
        self.tokenizer = tokenizer
        self.model = model

    def __call__(self, prompts: list[str], device, dtype) -> torch.Tensor:
        tok = self.tokenizer
        if not hasattr(tok, "model_max_length"):  # our offline tokenizer (models.text.CLIPTokenizer)
            ids, mask = tok(prompts)
            out = self.model(ids.to(device), attention_mask=mask.to(device))
            return getattr(out, "last_hidden_state", out).to(dtype)
        max_len = tok.model_max_length
        enc = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        full = tok(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > max_len:
            import warnings

            dropped = tok.batch_decode(full[:, max_len - 1 : -1])
            warnings.warn(f"CLIP reads at most {max_len} tokens; this part of the prompt was cut: {dropped}",
                          stacklevel=4)
        out = self.model(enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))
        hidden = getattr(out, "last_hidden_state", out)
        return hidden.to(dtype)


class WuerstchenPipeline:
    """Holds the three stages and both text encoders; `__call__` generates images.

    prior: `(x, r, c) -> ε̂`; decoder: `(x, r, effnet, clip) -> ε̂`; vqgan: `.decode(latents)`;
    prior_text / decoder_text: `TextEncoder`s. `config` carries the pipeline constants
    (latent_mean, latent_std, resolution_multiple, latent_dim_scale, vq_scale_factor, decoder_multiple,
    pixels_per_latent, prior_c_in, and the schedulers' s / scaler).
    """

    def __init__(self, prior, decoder, vqgan, prior_text: TextEncoder, decoder_text: TextEncoder, *,
                 device="cpu", dtype=torch.float32, config: dict | None = None,
                 compile: bool = False, cuda_graphs: bool = False):
        self.device = torch.device(device)
        self.dtype = check_dtype(dtype)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs a CUDA device, but the pipeline runs on {self.device}; "
                "drop cuda_graphs or pass device='cuda'"
            )
        self.prior, self.decoder, self.vqgan = prior, decoder, vqgan
        self.prior_text, self.decoder_text = prior_text, decoder_text
        cfg = dict(latent_mean=42.0, latent_std=1.0, resolution_multiple=42.67, latent_dim_scale=10.67,
                   vq_scale_factor=0.3764, decoder_multiple=16, pixels_per_latent=4, prior_c_in=16,
                   prior_s=0.008, prior_scaler=1.0, decoder_s=0.008, decoder_scaler=1.0)
        cfg.update(config or {})
        self.config = cfg
        self.geometry = LatentGeometry(cfg["resolution_multiple"], cfg["latent_dim_scale"],
                                       cfg["decoder_multiple"], cfg["pixels_per_latent"])
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self._loops: dict[tuple, DenoiseLoop] = {}  # kept so compiled / captured steps are reused

    def _loop(self, stage: str, guidance: float) -> DenoiseLoop:
        key = (stage, guidance)
        if key not in self._loops:
            model = self.prior if stage == "prior" else self.decoder
            self._loops[key] = DenoiseLoop(model, guidance, s=self.config[f"{stage}_s"],
                                           scaler=self.config[f"{stage}_scaler"],
                                           compile=self.compile, cuda_graphs=self.cuda_graphs)
        return self._loops[key]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = 512,
        width: int = 512,
        prior_num_inference_steps: int = 60,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        callback_on_step_end: Callable | None = None,
        *,
        seed: int | None = None,
        progress: bool = True,
    ):
        """Generate images. Arguments as in diffusers' WuerstchenCombinedPipeline, plus `seed`
        (a CPU generator seeded with it) and `progress` (tqdm bars per stage).

        `prior_timesteps` / `decoder_timesteps` override the step counts (e.g.
        `DEFAULT_STAGE_C_TIMESTEPS`, the released 29-step prior schedule). Callbacks follow
        diffusers: `cb(pipe, i, t, {"latents": x}) -> dict`, a returned "latents" replaces them.
        Returns `PipelineOutput(images)`, or `(images,)` when `return_dict=False`.
        """
        # ---- every check before any work
        prompts, negatives = check_prompts(prompt, negative_prompt)
        check_steps("prior_num_inference_steps", prior_num_inference_steps, prior_timesteps)
        check_steps("num_inference_steps", num_inference_steps, decoder_timesteps)
        w_prior = check_guidance("prior_guidance_scale", prior_guidance_scale)
        w_dec = check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt <= 0:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        h_c, h_b = self.geometry.check("height", height)
        w_c, w_b = self.geometry.check("width", width)
        batch = len(prompts) * num_images_per_prompt
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either generator or seed, not both")
            generator = torch.Generator("cpu").manual_seed(int(seed))
        check_generator(generator, self.device, batch)
        prior_ts = make_timesteps(prior_num_inference_steps, prior_timesteps, self.device)
        dec_ts = make_timesteps(num_inference_steps, decoder_timesteps, self.device)
        prior_shape = (batch, self.config["prior_c_in"], h_c, w_c)
        if latents is not None and tuple(latents.shape) != prior_shape:
            raise ValueError(f"latents (the Stage C start noise) must have shape {prior_shape} for "
                             f"{len(prompts)} prompt(s) x {num_images_per_prompt} at {height}x{width}, "
                             f"got {tuple(latents.shape)}")
        device, dtype, n = self.device, self.dtype, num_images_per_prompt

        # ---- Stage C: text -> image embedding (the EfficientNet latent, rescaled)
        text = self._encode(self.prior_text, prompts, negatives, n, w_prior > 1, "the prior's text encoder")
        if latents is None:
            x = draw_noise(prior_shape, generator, device, dtype)
        else:
            x = latents.to(device=device, dtype=dtype)
        x = self._loop("prior", w_prior)(
            x, prior_ts, (text,), generator, progress=progress, desc="Stage C (prior)",
            callback=self._wrap_callback(prior_callback_on_step_end))
        check_finite(x, "Stage C (prior)")
        effnet = x * self.config["latent_mean"] - self.config["latent_std"]

        # ---- Stage B: image embedding + text -> VQGAN latents
        text = self._encode(self.decoder_text, prompts, negatives, n, w_dec > 1, "the decoder's text encoder")
        cond_effnet = torch.cat([effnet, torch.zeros_like(effnet)]) if w_dec > 1 else effnet
        x = draw_noise((batch, 4, h_b, w_b), generator, device, dtype)
        x = self._loop("decoder", w_dec)(
            x, dec_ts, (cond_effnet, text), generator, progress=progress, desc="Stage B (decoder)",
            callback=self._wrap_callback(callback_on_step_end))
        check_finite(x, "Stage B (decoder)")

        # ---- Stage A: latents -> pixels
        if output_type == "latent":
            images = x
        else:
            out = self.vqgan.decode(self.config["vq_scale_factor"] * x)
            images = getattr(out, "sample", out)
            check_finite(images, "Stage A (VQGAN decoder)")
            images = images.clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().float().numpy()
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(im) for im in (images * 255).round().astype("uint8")]
        return PipelineOutput(images) if return_dict else (images,)

    def _encode(self, encoder: TextEncoder, prompts, negatives, n: int, cfg: bool, what: str) -> torch.Tensor:
        """[cond (each prompt n times); uncond (each negative, or "", n times)] when cfg, else cond."""
        cond = encoder(prompts, self.device, self.dtype)
        check_finite(cond, what)
        cond = cond.repeat_interleave(n, dim=0)
        if not cfg:
            return cond
        uncond = encoder(negatives if negatives is not None else [""] * len(prompts), self.device, self.dtype)
        return torch.cat([cond, uncond.repeat_interleave(n, dim=0)])

    def _wrap_callback(self, cb):
        if cb is None:
            return None

        def call(i, t, x):
            out = cb(self, i, t, {"latents": x})
            return out.get("latents", x) if out else x

        return call
