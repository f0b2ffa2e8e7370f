"""WuerstchenPipeline: text -> Stage C prior -> Stage B decoder -> Stage A VQGAN, as one call.

The call mirrors diffusers' `WuerstchenCombinedPipeline` argument for argument and reproduces its
images for a given seed: it runs `.prior_pipe` (a `WuerstchenPriorPipeline`) and hands the image
embeddings to `.decoder_pipe` (a `WuerstchenDecoderPipeline`) with the same generator, so the random
draws come in diffusers' order (prior latents, one noise tensor per prior step, decoder latents, one
per decoder step). It differs where diffusers is wrong: a batch of several prompts works, and sizes
the decoder cannot run are refused before any work.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..diffusion import DEFAULT_STAGE_C_TIMESTEPS
from .base import PipelineConfig, with_call_defaults
from .checks import LatentGeometry, check_guidance, check_steps
from .decoder import OUTPUT_TYPES, WuerstchenDecoderPipeline
from .outputs import PipelineOutput
from .prior import WuerstchenPriorPipeline
from .text import TextEncoder, check_text_inputs, prompt_list

__all__ = ["WuerstchenPipeline", "PipelineOutput", "TextEncoder", "DEFAULT_STAGE_C_TIMESTEPS", "OUTPUT_TYPES"]

# The combined pipeline's flat config names -> (sub-pipeline, its config name).
_CONFIG_KEYS = {
    "latent_mean": ("prior", "latent_mean"), "latent_std": ("prior", "latent_std"),
    "resolution_multiple": ("prior", "resolution_multiple"), "prior_c_in": ("prior", "c_in"),
    "prior_s": ("prior", "s"), "prior_scaler": ("prior", "scaler"),
    "latent_dim_scale": ("decoder", "latent_dim_scale"), "vq_scale_factor": ("decoder", "vq_scale_factor"),
    "decoder_multiple": ("decoder", "decoder_multiple"), "pixels_per_latent": ("decoder", "pixels_per_latent"),
    "decoder_c_in": ("decoder", "c_in"), "decoder_s": ("decoder", "s"), "decoder_scaler": ("decoder", "scaler"),
}
# The combined call's argument names -> the sub-pipelines' (for call defaults such as the bundled model's).
_CALL_KEYS = {
    "height": ("prior", "height"), "width": ("prior", "width"),
    "prior_num_inference_steps": ("prior", "num_inference_steps"), "prior_timesteps": ("prior", "timesteps"),
    "prior_guidance_scale": ("prior", "guidance_scale"), "num_inference_steps": ("decoder", "num_inference_steps"),
    "decoder_timesteps": ("decoder", "timesteps"), "decoder_guidance_scale": ("decoder", "guidance_scale"),
}


def connected_prior(folder) -> str | None:
    """The prior repo a decoder repo's model card names (`prior:` in its README's YAML header), if any."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    header = lines[1:lines.index("---", 1)] if "---" in lines[1:] else []
    for i, line in enumerate(header):
        key, _, rest = line.partition(":")
        if key.strip() != "prior":
            continue
        rest = rest.strip().strip("[]").strip()
        if rest:
            return rest.split(",")[0].strip().strip("'\"")
        following = header[i + 1:i + 2]  # a YAML list: its first item on the next line
        if following and following[0].strip().startswith("-"):
            return following[0].strip()[1:].strip().strip("'\"") or None
        return None
    return None


class WuerstchenPipeline:
    """The three stages and both text encoders, as `.prior_pipe` and `.decoder_pipe`; `__call__` generates images.

    prior: `(x, r, c) -> ε̂`; decoder: `(x, r, effnet, clip) -> ε̂`; vqgan: `.decode(latents)`;
    prior_text / decoder_text: `TextEncoder`s. `config` carries the pipeline constants by their flat
    names (latent_mean, latent_std, resolution_multiple, latent_dim_scale, vq_scale_factor,
    decoder_multiple, pixels_per_latent, prior_c_in, decoder_c_in, and prior_/decoder_ s and scaler).
    """

    # The stage pipelines it combines (a family's combined pipeline names its own).
    prior_pipeline_class = WuerstchenPriorPipeline
    decoder_pipeline_class = WuerstchenDecoderPipeline

    def __init__(self, prior, decoder, vqgan, prior_text: TextEncoder, decoder_text: TextEncoder, *,
                 device="cpu", dtype=torch.float32, config: dict | None = None,
                 compile: bool = False, cuda_graphs: bool = False, **prior_parts):
        parts: dict[str, dict] = {"prior": {}, "decoder": {}}
        for key, value in (config or {}).items():
            if key not in _CONFIG_KEYS:
                raise ValueError(f"unknown pipeline config key {key!r}; known: {sorted(_CONFIG_KEYS)}")
            stage, name = _CONFIG_KEYS[key]
            parts[stage][name] = value
        if "resolution_multiple" in parts["prior"]:
            parts["decoder"]["resolution_multiple"] = parts["prior"]["resolution_multiple"]
        common = dict(device=device, dtype=dtype, compile=compile, cuda_graphs=cuda_graphs)
        self.prior_pipe = self.prior_pipeline_class(prior, prior_text, config=parts["prior"], **common, **prior_parts)
        self.decoder_pipe = self.decoder_pipeline_class(decoder, vqgan, decoder_text, config=parts["decoder"],
                                                        **common)
        self._call_defaults: dict = {}

    @classmethod
    def from_pipes(cls, prior_pipe: WuerstchenPriorPipeline, decoder_pipe: WuerstchenDecoderPipeline):
        """The combined pipeline over two built stage pipelines (as diffusers' combined pipelines hold them)."""
        self = cls.__new__(cls)
        self.prior_pipe, self.decoder_pipe, self._call_defaults = prior_pipe, decoder_pipe, {}
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, prior=None, **kwargs) -> "WuerstchenPipeline":
        """As diffusers' `WuerstchenCombinedPipeline.from_pretrained("warp-ai/wuerstchen")`: the decoder repo,
        with the prior repo its model card names (`prior:` in README.md) unless `prior=` is given; on the
        CPU unless `device=`. Other keywords as `load_pipeline`. No argument: the bundled default model."""
        from .hub import hub_folder, is_repo_id
        from .loading import load_pipeline

        kwargs = {"device": "cpu", **kwargs}
        decoder = pretrained_model_name_or_path
        if decoder is not None and prior is None:
            folder = decoder
            if is_repo_id(decoder):
                hub_keys = ("revision", "cache_dir", "local_files_only", "variant", "use_safetensors", "token")
                folder = hub_folder(decoder, **{k: kwargs[k] for k in hub_keys if k in kwargs})
            prior = connected_prior(folder)
            if prior is None:  # a combined or bundle folder holds both stages
                return load_pipeline(weights=folder, **kwargs)
        return load_pipeline(prior, decoder, **kwargs)

    # ------------------------------------------------------------------------- the parts
    prior = property(lambda self: self.prior_pipe.prior, lambda self, m: setattr(self.prior_pipe, "prior", m))
    decoder = property(lambda self: self.decoder_pipe.decoder, lambda self, m: setattr(self.decoder_pipe, "decoder", m))
    vqgan = property(lambda self: self.decoder_pipe.vqgan, lambda self, m: setattr(self.decoder_pipe, "vqgan", m))
    prior_text = property(lambda self: self.prior_pipe.text)
    decoder_text = property(lambda self: self.decoder_pipe.text)
    device = property(lambda self: self.prior_pipe.device)
    dtype = property(lambda self: self.prior_pipe.dtype)
    compile = property(lambda self: self.prior_pipe.compile)
    cuda_graphs = property(lambda self: self.prior_pipe.cuda_graphs)

    @property
    def components(self) -> dict:
        """Every part by the names of diffusers' WuerstchenCombinedPipeline."""
        p, d = self.prior_pipe, self.decoder_pipe
        return dict(tokenizer=d.tokenizer, text_encoder=d.text_encoder, decoder=d.decoder, vqgan=d.vqgan,
                    prior_tokenizer=p.tokenizer, prior_text_encoder=p.text_encoder, prior_prior=p.prior)

    @property
    def config(self) -> PipelineConfig:
        subs = {"prior": self.prior_pipe.config, "decoder": self.decoder_pipe.config}
        return PipelineConfig({key: subs[stage][name] for key, (stage, name) in _CONFIG_KEYS.items()})

    @property
    def geometry(self) -> LatentGeometry:
        return self.decoder_pipe.geometry

    @property
    def call_defaults(self) -> dict:
        """Call defaults of the weights (the bundled model's sampling settings); the sub-pipelines get theirs."""
        return self._call_defaults

    @call_defaults.setter
    def call_defaults(self, defaults: dict) -> None:
        self._call_defaults = dict(defaults)
        subs = self.stage_call_defaults(self._call_defaults)
        self.prior_pipe.call_defaults, self.decoder_pipe.call_defaults = subs["prior"], subs["decoder"]

    @staticmethod
    def stage_call_defaults(defaults: dict) -> dict[str, dict]:
        """Combined-call defaults -> {"prior": ..., "decoder": ...} by the stage pipelines' argument names."""
        subs: dict[str, dict] = {"prior": {}, "decoder": {}}
        for key, value in defaults.items():
            if key in _CALL_KEYS:
                stage, name = _CALL_KEYS[key]
                subs[stage][name] = value
            else:  # an argument both stages share (negative_prompt, ...)
                for stage, cls in (("prior", WuerstchenPriorPipeline), ("decoder", WuerstchenDecoderPipeline)):
                    if key in inspect.signature(cls.__call__).parameters:
                        subs[stage][key] = value
        return subs

    # ------------------------------------------------------------------------- placement
    def to(self, *args, **kwargs) -> "WuerstchenPipeline":
        """`pipe.to(device)`, `pipe.to(dtype)`, `pipe.to(device, dtype)`: both sub-pipelines."""
        self.prior_pipe.to(*args, **kwargs)
        self.decoder_pipe.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Every module (both text encoders, Stage C, Stage B, Stage A) stays on the CPU and visits the GPU
        only while it runs."""
        self.prior_pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self.decoder_pipe.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.prior_pipe.set_progress_bar_config(**kwargs)
        self.decoder_pipe.set_progress_bar_config(**kwargs)

    # ------------------------------------------------------------------------- the call
    @torch.no_grad()
    @with_call_defaults
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        prior_num_inference_steps: int = 60,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
        seed: int | None = None,
        progress: bool = True,
    ):
        """Generate images. Arguments as in diffusers' WuerstchenCombinedPipeline, plus `seed`
        (a CPU generator seeded with it) and `progress` (tqdm bars per stage).

        `prior_timesteps` / `decoder_timesteps` override the step counts (e.g.
        `DEFAULT_STAGE_C_TIMESTEPS`, the released 29-step prior schedule). `prompt_embeds` /
        `negative_prompt_embeds` are the prior's text conditioning (its text encoder differs from the
        decoder's); the decoder reads `prompt`, or "" when only embeddings are given (as diffusers).
        Callbacks follow diffusers: `cb(pipe, i, t, kwargs) -> dict` with `pipe` the running
        sub-pipeline. Returns `PipelineOutput(images)`, or the images themselves with
        `return_dict=False` (as diffusers).
        """
        # ---- every check of both stages before any work, in this call's argument names
        check_steps("prior_num_inference_steps", prior_num_inference_steps, prior_timesteps)
        check_steps("num_inference_steps", num_inference_steps, decoder_timesteps)
        check_guidance("prior_guidance_scale", prior_guidance_scale)
        self.decoder_pipe._check_args(num_inference_steps, decoder_timesteps, decoder_guidance_scale, output_type,
                                      callback_on_step_end_tensor_inputs, guidance_name="decoder_guidance_scale")
        self.geometry.check("height", height)
        self.geometry.check("width", width)
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either generator or seed, not both")
            generator = torch.Generator("cpu").manual_seed(int(seed))
        decoder_prompt = prompt
        if prompt_embeds is not None:
            if prompt is None:
                rows = len(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else 1
                decoder_prompt = [""] * rows if rows > 1 else ""
                warnings.warn("prompt_embeds condition the prior only; the decoder has its own text encoder and "
                              "reads prompt, so without one it decodes with the empty prompt (as diffusers). "
                              "Pass prompt= too to give the decoder the text.", stacklevel=3)
            elif isinstance(prompt_embeds, torch.Tensor) and len(prompt_list("prompt", prompt)) != len(prompt_embeds):
                raise ValueError(f"prompt has {len(prompt_list('prompt', prompt))} entries but prompt_embeds has "
                                 f"{len(prompt_embeds)} rows: pass one prompt per row")
        prior_request = self.prior_pipe._prepare(
            prompt=None if prompt_embeds is not None else prompt, height=height, width=width,
            num_inference_steps=prior_num_inference_steps, timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale,
            negative_prompt=negative_prompt if negative_prompt_embeds is None else None,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents, output_type="pt",
            return_dict=False, callback_on_step_end=prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs, progress=progress)
        check_text_inputs(decoder_prompt, negative_prompt, {"prompt_embeds": None}, {"prompt_embeds": None}, {})

        (image_embeddings,) = self.prior_pipe._generate(prior_request)
        return self.decoder_pipe(
            image_embeddings, decoder_prompt, num_inference_steps, decoder_timesteps, decoder_guidance_scale,
            negative_prompt, 1, generator, None, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs, progress=progress)
