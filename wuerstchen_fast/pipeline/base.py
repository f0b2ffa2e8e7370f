"""StagePipeline: what every stage pipeline (a prior, a decoder, of any model family) shares.

A stage pipeline holds its modules (`_components`, in the order one call runs them), a text encoder
and a config, and provides: `to(device, dtype)`, `enable_model_cpu_offload()`, text conditioning
from prompts or user embeddings, the denoising loop with diffusers-style step callbacks, and the
read-outs diffusers users reach for inside callbacks (`num_timesteps`, `guidance_scale`).

A call keeps its working state in local variables and per-call objects, never on the pipeline;
the read-outs live in a thread-local slot, so one pipeline can serve several threads.
A family's prior or decoder subclasses this, names its components and callback tensors, and writes
its `__call__` with the family's diffusers signature from these parts.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..diffusion import DenoiseLoop
from .checks import check_count, check_dtype, check_finite, check_generator
from .offload import ModelOffload
from .text import TextEncoder, check_text_inputs, negative_field

__all__ = ["StagePipeline", "StageRequest", "PipelineConfig", "with_call_defaults", "config_value", "call_arguments"]


def config_value(model, name: str, default):
    """A field of a model's config (a dataclass, a diffusers FrozenDict or a dict), or `default`."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def call_arguments(frame_locals: dict) -> dict:
    """A `__call__`'s arguments from its `locals()` (first statement), to hand on to `_prepare(**...)`."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class PipelineConfig(dict):
    """The pipeline constants; keys also read as attributes, as diffusers' `pipe.config.latent_mean`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"pipeline config has no {name!r}; keys: {sorted(self)}") from None


def with_call_defaults(fn: Callable) -> Callable:
    """Let `pipe.call_defaults` (e.g. the bundled model's sampling settings) replace the signature's
    defaults of the arguments a call does not pass, positionally or by name."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        if self.call_defaults:
            passed = sig.bind_partial(self, *args, **kwargs).arguments
            kwargs = {**{k: v for k, v in self.call_defaults.items() if k not in passed}, **kwargs}
        return fn(self, *args, **kwargs)

    return call


def _split_to_args(args, device, dtype):
    """`to(device)`, `to(dtype)`, `to(device, dtype)` in any order, as diffusers' `DiffusionPipeline.to`."""
    dtype_names = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
    for a in args:
        if isinstance(a, torch.dtype) or (isinstance(a, str) and a in dtype_names):
            if dtype is not None:
                raise TypeError("to() got two dtypes")
            dtype = a
        else:
            if device is not None:
                raise TypeError("to() got two devices")
            device = a
    return device, dtype


@dataclass(frozen=True, kw_only=True)
class StageRequest:
    """One validated call of a stage: everything its `_generate` needs, nothing computed yet."""

    prompts: list[str] | None
    negatives: list[str] | None
    embeds: dict  # text field -> the user's tensor or None
    negative_embeds: dict
    n: int  # num_images_per_prompt
    timesteps: torch.Tensor
    guidance: float
    generator: Any
    latents: torch.Tensor | None
    output_type: str
    return_dict: bool
    callback: Callable | None
    tensor_inputs: tuple[str, ...]
    progress: bool
    extra: dict = field(default_factory=dict)  # what a family's own arguments add (e.g. image conditioning)


class StagePipeline:
    """Base of one stage's pipeline. Subclasses set:

    `_components`: the attribute names of the modules a call runs, in order (offload moves them in
    that order); `"text_encoder"` is the text model inside `self.text`.
    `_callback_tensor_inputs`: the names `callback_on_step_end_tensor_inputs` may ask for.
    `_callback_replaceable`: those a callback may return to change the rest of the chain.
    `_text_fields`: the text conditioning fields (`prompt_embeds`, and a pooled one for some families).
    `_default_config`: the pipeline constants, overridable by `config=`.
    """

    _components: tuple[str, ...] = ()
    _callback_tensor_inputs: tuple[str, ...] = ("latents",)
    _callback_replaceable: tuple[str, ...] = ("latents",)
    _text_fields: tuple[str, ...] = ("prompt_embeds",)
    _default_config: dict = {}

    def __init__(self, text: TextEncoder, *, device="cpu", dtype=torch.float32, config: dict | None = None,
                 compile: bool = False, cuda_graphs: bool = False):
        self.text = text
        self.device = torch.device(device)
        self.dtype = check_dtype(dtype)
        self._check_cuda_graphs(cuda_graphs, self.device)
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self.config = PipelineConfig({**self._default_config, **(config or {})})
        self.call_defaults: dict = {}
        self._loops: dict[tuple, DenoiseLoop] = {}  # kept so compiled / captured steps are reused
        self._offload: ModelOffload | None = None
        self._progress_config: dict = {}
        self._per_thread = threading.local()

    @staticmethod
    def _check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, but the pipeline runs on {device}; "
                             "drop cuda_graphs or pass device='cuda'")

    # ------------------------------------------------------------------------------- components
    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def text_encoder(self):
        return self.text.model

    @property
    def components(self) -> dict[str, Any]:
        """The tokenizer and every module, by the names diffusers uses."""
        return {"tokenizer": self.tokenizer, **{name: getattr(self, name) for name in self._components}}

    def _modules(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self._components]

    # ------------------------------------------------------------------------------- placement
    def to(self, *args, device=None, dtype=None, torch_device=None, torch_dtype=None,
           silence_dtype_warnings: bool = False):
        """Move every module to `device` and/or cast it to `dtype` (`pipe.to("cuda", torch.bfloat16)`);
        returns the pipeline. With model offload enabled, only the dtype may change. diffusers' spellings
        (`torch_device=`, `torch_dtype=`, `silence_dtype_warnings=`) are accepted."""
        device, dtype = _split_to_args(args, device or torch_device, dtype or torch_dtype)
        if dtype is not None:
            dtype = check_dtype(dtype)
        if device is not None:
            device = torch.device(device)
            if self._offload is not None:
                raise ValueError(
                    f"model CPU offload is on, so the modules stay on the CPU and visit {self.device} while they "
                    f"run; pipe.to({str(device)!r}) would undo that. Build a new pipeline to leave offload.")
            self._check_cuda_graphs(self.cuda_graphs, device)
        for _, module in self._modules():
            if hasattr(module, "to"):
                module.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        if device is not None:
            self.device = device
        if dtype is not None:
            self.dtype = dtype
        self._loops.clear()  # compiled steps and captured graphs belong to the old device / dtype
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Keep every module on the CPU and move each to the GPU (`device`, default `cuda:{gpu_id or 0}`)
        only while it runs: the text encoder, then the denoiser, then (decoder) the VQGAN."""
        if device is None:
            device = torch.device("cuda", gpu_id or 0)
        elif gpu_id is not None:
            device = torch.device(torch.device(device).type, gpu_id)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"enable_model_cpu_offload moves each module to {device} while it runs, but no CUDA "
                             "device is available here; run without offload on the CPU")
        self._check_cuda_graphs(self.cuda_graphs, device)
        self._offload = ModelOffload(self._components, lambda name: getattr(self, name), device)
        self.device = device
        self._loops.clear()
        return self

    def _placed(self, name: str):
        """Context in which component `name` is on the execution device (a no-op without offload)."""
        return self._offload.placed(name) if self._offload is not None else _NO_MOVE

    # ------------------------------------------------------------------------------- read-outs
    @property
    def num_timesteps(self) -> int:
        """Denoiser calls of the running (or this thread's last) call, as diffusers' `num_timesteps`."""
        return getattr(self._per_thread, "num_timesteps", 0)

    @property
    def guidance_scale(self) -> float:
        return getattr(self._per_thread, "guidance_scale", 0.0)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for this pipeline's step bars, e.g. `disable=True` (as diffusers)."""
        self._progress_config = dict(kwargs)

    # ------------------------------------------------------------------------------- call helpers
    def _generator(self, generator, seed, batch: int):
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either generator or seed, not both")
            generator = torch.Generator("cpu").manual_seed(int(seed))
        check_generator(generator, self.device, batch)
        return generator

    def _check_callback_inputs(self, names) -> tuple[str, ...]:
        names = tuple(names or ())
        bad = [k for k in names if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {list(self._callback_tensor_inputs)}, "
                             f"got {bad}")
        return names

    def _text_field_args(self, kwargs: dict) -> tuple[dict, dict]:
        """Split a call's `prompt_embeds=` / `negative_prompt_embeds=` (one pair per text field) into
        ({field: tensor or None}, {field: negative tensor or None}); anything else is a TypeError."""
        embeds = {f: kwargs.pop(f, None) for f in self._text_fields}
        negative_embeds = {f: kwargs.pop(negative_field(f), None) for f in self._text_fields}
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {sorted(kwargs)}")
        return embeds, negative_embeds

    def _expected_text_widths(self) -> dict[str, int | None]:
        """Channels each text field must have (None: not checked); subclasses read their model's config."""
        return {}

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """One text encoder call: field -> (len(prompts), tokens, channels)."""
        with self._placed("text_encoder"):
            hidden = self.text(prompts, self.device, self.dtype)
        check_finite(hidden, f"{type(self).__name__}'s text encoder")
        return {"prompt_embeds": hidden}

    def _text_conditioning(self, prompts, negatives, embeds: dict, negative_embeds: dict, repeat: int, cfg: bool):
        """-> (cond, uncond or None), dicts field -> tensors with each row repeated `repeat` times.

        `embeds` / `negative_embeds`: field -> the user's tensor or None. Fields the user passed are used as given (moved to the pipeline's device and dtype); the rest
        are encoded from `prompts` (uncond: from `negatives`, or "" per prompt).
        """
        def finish(fields: dict) -> dict:
            return {f: t.to(device=self.device, dtype=self.dtype).repeat_interleave(repeat, dim=0)
                    for f, t in fields.items()}

        def fill(given: dict, texts: list[str]) -> dict:
            out = {f: given[f] for f in self._text_fields if given.get(f) is not None}
            if len(out) < len(self._text_fields):
                encoded = self._encode(texts)
                out.update({f: encoded[f] for f in self._text_fields if f not in out})
            return out

        batch = len(prompts) if prompts is not None else next(t for t in embeds.values() if t is not None).shape[0]
        cond = finish(fill(embeds, prompts))
        if not cfg:
            return cond, None
        uncond = finish(fill(negative_embeds, negatives if negatives is not None else [""] * batch))
        return cond, uncond

    def _encode_prompt(self, prompt, negative_prompt, embeds: dict, negative_embeds: dict, num_images_per_prompt,
                       do_classifier_free_guidance) -> tuple:
        """`encode_prompt`'s work: the cond fields, then (with guidance) the uncond ones, in `_text_fields`
        order; fields without guidance are None."""
        prompts, negatives, _ = check_text_inputs(prompt, negative_prompt, embeds, negative_embeds,
                                                  self._expected_text_widths())
        n = check_count("num_images_per_prompt", num_images_per_prompt)
        cond, uncond = self._text_conditioning(prompts, negatives, embeds, negative_embeds, n,
                                               bool(do_classifier_free_guidance))
        return (tuple(cond[f] for f in self._text_fields)
                + tuple(uncond[f] if uncond is not None else None for f in self._text_fields))

    @staticmethod
    def _text_states(cond: dict, uncond: dict | None, field: str = "prompt_embeds") -> dict:
        """diffusers' callback names for one text field: `text_encoder_hidden_states` ([cond; uncond] with
        guidance, as the denoiser sees it) and `negative_prompt_embeds` (uncond, or None)."""
        hidden, negative = cond[field], (uncond[field] if uncond is not None else None)
        return {"text_encoder_hidden_states": torch.cat([hidden, negative]) if negative is not None else hidden,
                "negative_prompt_embeds": negative}

    def _loop(self, name: str, guidance: float) -> DenoiseLoop:
        model = getattr(self, name)
        key = (name, id(model), guidance)
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = DenoiseLoop(self._denoiser(model), guidance, s=self.config["s"],
                                                  scaler=self.config["scaler"], compile=self.compile,
                                                  cuda_graphs=self.cuda_graphs)
        return loop

    @staticmethod
    def _denoiser(model):
        """What the loop calls per step: the model itself (a family whose model splits its forward says which half)."""
        return model

    def _denoise(self, name: str, x: torch.Tensor, timesteps: torch.Tensor, generator, guidance: float,
                 named: dict[str, torch.Tensor], conds_of: Callable[[dict], list], callback, tensor_inputs,
                 *, progress: bool, desc: str) -> torch.Tensor:
        """Run component `name`'s chain from `x`.

        `named` holds the tensors a callback may ask for (besides "latents"); `conds_of(named)` builds the
        denoiser's conditioning from them, again after any callback replaced one.
        """
        self._per_thread.num_timesteps = int(timesteps.shape[0]) - 1
        self._per_thread.guidance_scale = guidance
        conds = conds_of(named)  # a list the loop reads at every step; a callback's changes land in it
        step_end = None
        if callback is not None:
            step_end = self._step_callback(callback, tensor_inputs, named, conds, conds_of)
        bar = (self._progress_config or True) if progress else False
        with self._placed(name):
            return self._loop(name, guidance)(x, timesteps, conds, generator, callback=step_end, progress=bar,
                                              desc=desc)

    def _step_callback(self, callback, tensor_inputs, named: dict, conds: list, conds_of):
        """diffusers' `callback_on_step_end(pipe, i, t, {name: tensor})` adapted to the loop's `(i, t, x) -> x`."""
        def step_end(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            available = {**named, "latents": x}
            out = callback(self, i, t, {k: available[k] for k in tensor_inputs})
            if not out:
                return x
            for k, v in out.items():
                if k not in available or v is available[k]:
                    continue
                if k not in self._callback_replaceable:
                    raise ValueError(f"callback_on_step_end returned a new {k!r}, which does not feed the next "
                                     f"steps; it may replace {list(self._callback_replaceable)}")
                if not isinstance(v, torch.Tensor) or v.shape != available[k].shape:
                    raise ValueError(f"callback_on_step_end returned {k!r} of shape "
                                     f"{tuple(getattr(v, 'shape', ()))}; it must keep {tuple(available[k].shape)}")
                if k != "latents":
                    named[k] = v.to(device=self.device, dtype=self.dtype)
            conds[:] = conds_of(named)
            new_x = out.get("latents", x)
            return new_x.to(device=x.device, dtype=x.dtype)

        return step_end

    @staticmethod
    def _prepare_latents(latents, shape: tuple, generator, device, dtype, what: str):
        from ..diffusion.sampler import draw_noise

        if latents is None:
            return draw_noise(shape, generator, device, dtype)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents ({what}) must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype)


class _NoMove:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_MOVE = _NoMove()
