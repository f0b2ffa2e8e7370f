"""`load_pipeline()`, the split loaders and `sample()`: pipelines from weights on disk or on the Hub.

Accepted sources:
  * Hugging Face Hub repo ids: `prior="warp-ai/wuerstchen-prior"`, `decoder="warp-ai/wuerstchen"`
    (downloaded into / read from the Hub cache; `revision=`, `cache_dir=`, `local_files_only=`,
    `token=`, and `HF_HUB_OFFLINE=1` as in diffusers);
  * diffusers repo folders: `prior=` a `warp-ai/wuerstchen-prior` layout (model_index.json, prior/,
    text_encoder/, tokenizer/, scheduler/) and `decoder=` a `warp-ai/wuerstchen` layout (decoder/,
    vqgan/, text_encoder/, tokenizer/, scheduler/);
  * `weights=` one folder holding both: a saved `WuerstchenCombinedPipeline` (prior_prior/,
    prior_text_encoder/, ... decoder/, vqgan/, ...), a folder with `prior/` and `decoder/` repos, or a
    bundle in the default model's layout;
  * the original .pt checkpoints or our own format for the stages (`prior=`, `decoder=`, `vqgan=`
    paths), together with explicit `prior_text_encoder=`, `prior_tokenizer=`,
    `decoder_text_encoder=`, `decoder_tokenizer=` folders (diffusers/transformers layout).
Any component argument may also be an already built object. `variant=` ("fp16", "bf16") picks the
diffusers / transformers weight files of that variant where a folder has them; `use_safetensors=`
True refuses .bin files, False reads them.

With no arguments at all, `load_pipeline()` loads the bundled default model (a small model
trained on the synthetic shapes data, `wuerstchen_fast/weights/default/`, see its MODEL_CARD.md) and
the returned pipeline samples with that model's settings (`sampling.json`: 256x256, step counts,
guidance) unless the call overrides them. `NoDefaultWeightsError` when that folder is absent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import config_value
from .checks import check_dtype
from .core import WuerstchenPipeline
from .decoder import WuerstchenDecoderPipeline
from .hub import hub_folder, is_repo_id, weights_view
from .prior import WuerstchenPriorPipeline
from .text import TextEncoder
from .text_loading import load_text_model_source as _load_text_model
from .text_loading import load_tokenizer_source as _load_tokenizer

__all__ = ["load_pipeline", "load_prior_pipeline", "load_decoder_pipeline", "sample", "NoDefaultWeightsError",
           "default_weights_dir"]

HOW_TO_PASS = (
    "pass the weights explicitly, e.g. load_pipeline(prior='warp-ai/wuerstchen-prior', decoder='warp-ai/wuerstchen') "
    "(Hub repo ids, downloaded into the Hugging Face cache), local folders of those repos, or "
    "load_pipeline(weights='<a saved WuerstchenCombinedPipeline>'). On the command line: "
    "`wuerstchen-fast sample PROMPT --prior DIR --decoder DIR` (a repo id such as warp-ai/wuerstchen-prior, "
    "or a folder)."
)


class NoDefaultWeightsError(FileNotFoundError):
    pass


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "default"
_DEFAULT_PARTS = ("prior", "decoder", "vqgan", "text_encoder", "tokenizer")
_PARTS = {"prior": ("prior", "prior_text_encoder", "prior_tokenizer"),
          "decoder": ("decoder", "vqgan", "decoder_text_encoder", "decoder_tokenizer")}


def _is_bundle(d: Path) -> bool:
    """A folder in the default model's layout (what `training.default_model` exports)."""
    return all((d / p).is_dir() for p in _DEFAULT_PARTS)


def default_weights_dir() -> Path | None:
    """The bundled default model's folder, or None when the package ships none (or an incomplete one)."""
    return DEFAULT_WEIGHTS if _is_bundle(DEFAULT_WEIGHTS) else None


def _default_sources() -> dict[str, Any]:
    d = default_weights_dir()
    if d is None:
        raise NoDefaultWeightsError("wuerstchen_fast has no bundled default weights in this installation "
                                    f"(weights/default/ with {', '.join(_DEFAULT_PARTS)}): " + HOW_TO_PASS)
    return _bundle_sources(d)


def _bundle_sources(d: Path) -> dict[str, Any]:
    return dict(prior=d / "prior", decoder=d / "decoder", vqgan=d / "vqgan",
                prior_text_encoder=d / "text_encoder", prior_tokenizer=d / "tokenizer",
                decoder_text_encoder=d / "text_encoder", decoder_tokenizer=d / "tokenizer",
                sampling_defaults=_json(d / "sampling.json"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_repo(folder: Path, sub: str) -> bool:
    return folder.is_dir() and (folder / "model_index.json").is_file() and (folder / sub).is_dir()


# ------------------------------------------------------------------------------------------ sources
def _stage_repo(stage: str, p: Path) -> dict[str, Any]:
    """The parts of one stage from its diffusers repo folder."""
    src = {stage: p / stage, f"{stage}_text_encoder": p / "text_encoder", f"{stage}_tokenizer": p / "tokenizer",
           f"{stage}_scheduler": p / "scheduler", f"{stage}_index": _json(p / "model_index.json")}
    if stage == "decoder":
        src["vqgan"] = p / "vqgan"
    return src


def _weights_folder(w: Path) -> dict[str, Any]:
    """Both stages from one folder: a saved combined pipeline, prior/ + decoder/ repos, or a bundle."""
    if _is_repo(w, "prior_prior"):  # saved WuerstchenCombinedPipeline
        return dict(prior=w / "prior_prior", prior_text_encoder=w / "prior_text_encoder",
                    prior_tokenizer=w / "prior_tokenizer", prior_scheduler=w / "prior_scheduler",
                    decoder=w / "decoder", vqgan=w / "vqgan", decoder_text_encoder=w / "text_encoder",
                    decoder_tokenizer=w / "tokenizer", decoder_scheduler=w / "scheduler")
    if _is_repo(w / "prior", "prior") and _is_repo(w / "decoder", "decoder"):
        return {**_stage_repo("prior", w / "prior"), **_stage_repo("decoder", w / "decoder")}
    if _is_bundle(w):  # the default model's layout (e.g. a bundle trained with `make train-default`)
        return _bundle_sources(w)
    raise FileNotFoundError(
        f"weights={str(w)!r} is neither a saved WuerstchenCombinedPipeline (model_index.json with "
        "prior_prior/, decoder/, vqgan/ ...), a folder holding prior/ and decoder/ diffusers repos, nor "
        f"a bundle in the default model's layout ({', '.join(_DEFAULT_PARTS)}, sampling.json)"
    )


def _stage_sources(stage: str, arg) -> dict[str, Any]:
    """The parts of one stage from `prior=` / `decoder=`: its repo folder, or a file / module alone."""
    if isinstance(arg, (str, Path)):
        p = Path(arg)
        if _is_repo(p, stage):
            return _stage_repo(stage, p)
        if not p.exists():
            raise FileNotFoundError(f"{stage}={str(arg)!r} does not exist; " + HOW_TO_PASS)
        if p.is_dir() and (_is_repo(p, "prior_prior") or _is_bundle(p)):
            return {k: v for k, v in _weights_folder(p).items()
                    if k.startswith(stage) or k in _PARTS[stage] or k == "sampling_defaults"}
    return {stage: arg}  # a checkpoint file, our format, or a module: other parts come explicitly


def _resolve(prior, decoder, weights) -> dict[str, Any]:
    """Map the user's arguments to one source per component (paths or objects)."""
    if weights is not None:
        if prior is not None or decoder is not None:
            raise ValueError("pass either weights= (one folder with both stages) or prior=/decoder=, not both")
        return _weights_folder(Path(weights))
    if prior is None and decoder is None:
        return _default_sources()  # the bundled default model, or NoDefaultWeightsError
    if prior is None or decoder is None:
        missing = "prior" if prior is None else "decoder"
        raise ValueError(f"{missing}= is missing: both stages are needed; " + HOW_TO_PASS)
    return {**_stage_sources("prior", prior), **_stage_sources("decoder", decoder)}


def _from_hub(arg, hub: dict):
    """A Hub repo id -> its snapshot folder in the Hub cache; anything else unchanged."""
    return hub_folder(arg, **hub) if is_repo_id(arg) else arg


def _complete(src: dict, explicit: dict, stages) -> dict:
    src = {**src, **{k: v for k, v in explicit.items() if v is not None}}
    needed = [k for stage in stages for k in _PARTS[stage][1:]]
    absent = [k for k in needed if src.get(k) is None]
    if absent:
        raise ValueError(
            f"cannot find {', '.join(absent)}: the stage sources were not diffusers repo folders, so pass "
            + ", ".join(f"{k}=" for k in absent) + " explicitly (folders in the diffusers/transformers layout)"
        )
    return src


# ---------------------------------------------------------------------------------------- building
def _stage(loader_name: str, src, device, dtype, files: dict):
    if not isinstance(src, (str, Path)):
        return src
    from .. import models

    with weights_view(Path(src), **files) as folder:
        return getattr(models, loader_name)(folder, device=device, dtype=dtype)


def _text(src: dict, stage: str, device, dtype, files: dict) -> TextEncoder:
    model = src[f"{stage}_text_encoder"]
    if isinstance(model, (str, Path)):
        with weights_view(Path(model), **files) as folder:
            model = _load_text_model(folder, device, dtype)
    return TextEncoder(_load_tokenizer(src[f"{stage}_tokenizer"]), model)


def _scheduler_cfg(folder: Path | None) -> dict:
    cfg = _json(folder / "scheduler_config.json") if folder is not None else {}
    return {"s": float(cfg.get("s", 0.008)), "scaler": float(cfg.get("scaler", 1.0))}


def _build_prior(src: dict, device, dtype, files: dict, opts: dict) -> WuerstchenPriorPipeline:
    stage_c = _stage("load_stage_c", src["prior"], device, dtype, files)
    index = src.get("prior_index", {})
    config = dict(latent_mean=float(index.get("latent_mean", 42.0)), latent_std=float(index.get("latent_std", 1.0)),
                  resolution_multiple=float(index.get("resolution_multiple", 42.67)),
                  c_in=int(config_value(stage_c, "c_in", 16)), **_scheduler_cfg(src.get("prior_scheduler")))
    return WuerstchenPriorPipeline(stage_c, _text(src, "prior", device, dtype, files), device=device, dtype=dtype,
                                   config=config, **opts)


def _build_decoder(src: dict, device, dtype, files: dict, opts: dict,
                   resolution_multiple: float = 42.67) -> WuerstchenDecoderPipeline:
    stage_b = _stage("load_stage_b", src["decoder"], device, dtype, files)
    stage_a = _stage("load_stage_a", src["vqgan"], device, dtype, files)
    c_hidden = config_value(stage_b, "c_hidden", [320, 640, 1280, 1280])
    config = dict(
        latent_dim_scale=float(src.get("decoder_index", {}).get("latent_dim_scale", 10.67)),
        vq_scale_factor=float(config_value(stage_a, "scale_factor", 0.3764)),
        decoder_multiple=int(config_value(stage_b, "patch_size", 2) * 2 ** (len(c_hidden) - 1)),
        pixels_per_latent=int(config_value(stage_a, "up_down_scale_factor", 2) ** config_value(stage_a, "levels", 2)),
        c_in=int(config_value(stage_b, "c_in", 4)), resolution_multiple=resolution_multiple,
        **_scheduler_cfg(src.get("decoder_scheduler")))
    return WuerstchenDecoderPipeline(stage_b, stage_a, _text(src, "decoder", device, dtype, files), device=device,
                                     dtype=dtype, config=config, **opts)


def _options(device, dtype, torch_dtype, compile, cuda_graphs):
    if dtype is not None and torch_dtype is not None and check_dtype(dtype) != check_dtype(torch_dtype):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one of them")
    dtype = check_dtype(dtype if dtype is not None else torch_dtype if torch_dtype is not None else torch.float32)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={str(device)!r}")
    return device, dtype, dict(compile=compile, cuda_graphs=cuda_graphs)


def load_pipeline(prior=None, decoder=None, *, weights=None, device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None,
                  variant: str | None = None, use_safetensors: bool | None = None, revision: str | None = None,
                  cache_dir=None, local_files_only: bool | None = None, token=None, compile: bool = False,
                  cuda_graphs: bool = False, vqgan=None, prior_text_encoder=None, prior_tokenizer=None,
                  decoder_text_encoder=None, decoder_tokenizer=None, lite: bool = False,
                  **stable_cascade_parts) -> WuerstchenPipeline:
    """Load the three stages and both text encoders; see the module docstring for accepted sources.

    device defaults to CUDA when available. dtype (or diffusers' torch_dtype): float32 (default),
    bfloat16 (recommended on GPU) or float16. compile=True wraps each stage's denoising step in
    torch.compile; cuda_graphs=True (CUDA only) captures it in a CUDA graph and replays it every step.
    Hub ids are resolved with `revision`, `cache_dir`, `local_files_only` and `token` (one revision for
    both repos; load the stages separately to pin each).

    Stable Cascade (Würstchen v3) weights are recognised and give a `StableCascadeCombinedPipeline`
    (`stable_cascade_loading.py`): `variant="lite"` (or `lite=True`) takes its lite models, "bf16" / "lite_bf16"
    the bf16 files, and `text_encoder=`, `tokenizer=`, `image_encoder=`, `feature_extractor=` its parts.
    """
    from .stable_cascade_loading import is_stable_cascade, load_stable_cascade_pipeline, split_variant

    device, dtype, opts = _options(device, dtype, torch_dtype, compile, cuda_graphs)
    lite, variant = split_variant(variant, lite)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, variant=variant,
               use_safetensors=use_safetensors, token=token)
    prior, decoder, weights = (_from_hub(a, hub) for a in (prior, decoder, weights))
    if is_stable_cascade(prior, decoder, weights=weights):
        return load_stable_cascade_pipeline(
            prior, decoder, weights=weights, device=device, dtype=dtype, opts=opts, variant=variant, lite=lite,
            vqgan=vqgan, prior_text_encoder=prior_text_encoder, prior_tokenizer=prior_tokenizer,
            decoder_text_encoder=decoder_text_encoder, decoder_tokenizer=decoder_tokenizer, **stable_cascade_parts)
    _refuse_stable_cascade_arguments(stable_cascade_parts, lite)
    src = _resolve(prior, decoder, weights)
    call_defaults = src.pop("sampling_defaults", None)
    src = _complete(src, dict(vqgan=vqgan, prior_text_encoder=prior_text_encoder, prior_tokenizer=prior_tokenizer,
                              decoder_text_encoder=decoder_text_encoder, decoder_tokenizer=decoder_tokenizer),
                    ("prior", "decoder"))
    files = dict(variant=variant, use_safetensors=use_safetensors)
    prior_pipe = _build_prior(src, device, dtype, files, opts)
    decoder_pipe = _build_decoder(src, device, dtype, files, opts, prior_pipe.config["resolution_multiple"])
    pipe = WuerstchenPipeline.from_pipes(prior_pipe, decoder_pipe)
    if call_defaults:  # the bundled model's sampling settings replace the call's defaults
        pipe.call_defaults = call_defaults
    return pipe


def _refuse_stable_cascade_arguments(parts: dict, lite: bool) -> None:
    given = sorted(k for k, v in {**parts, "lite": lite or None}.items() if v is not None)
    if given:
        raise TypeError(f"{', '.join(given)}: Stable Cascade arguments, but these sources are Würstchen v2 (give each "
                        "stage's text encoder as prior_text_encoder= / decoder_text_encoder=)")


def _load_stage(stage: str, source, *, device, dtype, torch_dtype, variant, use_safetensors, revision, cache_dir,
                local_files_only, token, compile, cuda_graphs, parts: dict, lite: bool = False, sc_parts=None):
    from .stable_cascade_loading import is_stable_cascade, load_stable_cascade_stage, split_variant

    device, dtype, opts = _options(device, dtype, torch_dtype, compile, cuda_graphs)
    lite, variant = split_variant(variant, lite)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, variant=variant,
               use_safetensors=use_safetensors, token=token)
    source = _from_hub(source, hub)
    if is_stable_cascade(source):
        return load_stable_cascade_stage(stage, source, device=device, dtype=dtype, opts=opts, variant=variant,
                                         lite=lite, **parts, **(sc_parts or {}))
    _refuse_stable_cascade_arguments(sc_parts or {}, lite)
    src = _default_sources() if source is None else _stage_sources(stage, source)
    call_defaults = src.pop("sampling_defaults", None)
    src = _complete(src, parts, (stage,))
    files = dict(variant=variant, use_safetensors=use_safetensors)
    build = _build_prior if stage == "prior" else _build_decoder
    pipe = build(src, device, dtype, files, opts)
    if call_defaults:  # the bundle's settings, by this stage's argument names
        pipe.call_defaults = WuerstchenPipeline.stage_call_defaults(call_defaults)[stage]
    return pipe


def load_prior_pipeline(prior=None, *, device=None, dtype=None, torch_dtype=None, variant=None,
                        use_safetensors=None, revision=None, cache_dir=None, local_files_only=None, token=None,
                        compile=False, cuda_graphs=False, text_encoder=None, tokenizer=None, lite: bool = False,
                        image_encoder=None, feature_extractor=None) -> WuerstchenPriorPipeline:
    """A `WuerstchenPriorPipeline` from a Hub id or folder of `warp-ai/wuerstchen-prior`'s layout (or a
    combined / bundle folder, or a Stage C file with `text_encoder=` and `tokenizer=`); none: the bundled model."""
    return _load_stage("prior", prior, device=device, dtype=dtype, torch_dtype=torch_dtype, variant=variant,
                       use_safetensors=use_safetensors, revision=revision, cache_dir=cache_dir,
                       local_files_only=local_files_only, token=token, compile=compile, cuda_graphs=cuda_graphs,
                       parts=dict(prior_text_encoder=text_encoder, prior_tokenizer=tokenizer), lite=lite,
                       sc_parts=dict(image_encoder=image_encoder, feature_extractor=feature_extractor))


def load_decoder_pipeline(decoder=None, *, device=None, dtype=None, torch_dtype=None, variant=None,
                          use_safetensors=None, revision=None, cache_dir=None, local_files_only=None, token=None,
                          compile=False, cuda_graphs=False, vqgan=None, text_encoder=None, tokenizer=None,
                          lite: bool = False) -> WuerstchenDecoderPipeline:
    """A `WuerstchenDecoderPipeline` from a Hub id or folder of `warp-ai/wuerstchen`'s layout (or a combined
    / bundle folder, or Stage B / Stage A sources with `vqgan=`, `text_encoder=`, `tokenizer=`)."""
    return _load_stage("decoder", decoder, device=device, dtype=dtype, torch_dtype=torch_dtype, variant=variant,
                       use_safetensors=use_safetensors, revision=revision, cache_dir=cache_dir,
                       local_files_only=local_files_only, token=token, compile=compile, cuda_graphs=cuda_graphs,
                       parts=dict(vqgan=vqgan, decoder_text_encoder=text_encoder, decoder_tokenizer=tokenizer),
                       lite=lite)


_CACHE: dict[tuple, WuerstchenPipeline] = {}


def sample(prompt, *, weights=None, prior=None, decoder=None, device=None, dtype=torch.float32,
           compile: bool = False, cuda_graphs: bool = False, output_type: str = "pil", **kwargs):
    """One-liner: load (once, then cached) a pipeline and return its images (PIL by default).

    `weights=` / `prior=` / `decoder=` as in `load_pipeline`; every other keyword goes to the
    pipeline call (height, width, seed, generator, prior_num_inference_steps, ...).
    """
    key = tuple(str(a) for a in (weights, prior, decoder, device, dtype, compile, cuda_graphs))
    if key not in _CACHE:
        _CACHE.clear()  # keep one pipeline resident: they hold GBs of weights
        _CACHE[key] = load_pipeline(prior, decoder, weights=weights, device=device, dtype=dtype,
                                    compile=compile, cuda_graphs=cuda_graphs)
    return _CACHE[key](prompt, output_type=output_type, **kwargs).images
