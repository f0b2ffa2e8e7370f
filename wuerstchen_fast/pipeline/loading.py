"""`load_pipeline()` and `sample()`: build a WuerstchenPipeline from weights on disk.

Accepted sources:
  * diffusers repo folders: `prior=` a `warp-ai/wuerstchen-prior` layout (model_index.json, prior/,
    text_encoder/, tokenizer/, scheduler/) and `decoder=` a `warp-ai/wuerstchen` layout (decoder/,
    vqgan/, text_encoder/, tokenizer/, scheduler/);
  * `weights=` one folder holding both: a saved `WuerstchenCombinedPipeline` (prior_prior/,
    prior_text_encoder/, ... decoder/, vqgan/, ...) or a folder with `prior/` and `decoder/` repos;
  * the original .pt checkpoints or our own format for the stages (`prior=`, `decoder=`, `vqgan=`
    paths), together with explicit `prior_text_encoder=`, `prior_tokenizer=`,
    `decoder_text_encoder=`, `decoder_tokenizer=` folders (diffusers/transformers layout).
Any component argument may also be an already built object.

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
from .text import TextEncoder

__all__ = ["load_pipeline", "sample", "NoDefaultWeightsError", "default_weights_dir"]

HOW_TO_PASS = (
    "pass the weights explicitly, e.g. load_pipeline(prior='<folder of warp-ai/wuerstchen-prior>', "
    "decoder='<folder of warp-ai/wuerstchen>') or load_pipeline(weights='<a saved WuerstchenCombinedPipeline>'); "
    "download them with `huggingface-cli download warp-ai/wuerstchen-prior --local-dir wuerstchen-prior` and "
    "`huggingface-cli download warp-ai/wuerstchen --local-dir wuerstchen`. On the command line: "
    "`wuerstchen-fast sample PROMPT --prior DIR --decoder DIR`."
)


class NoDefaultWeightsError(FileNotFoundError):
    pass


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "default"
_DEFAULT_PARTS = ("prior", "decoder", "vqgan", "text_encoder", "tokenizer")


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


def _load_tokenizer(src):
    if not isinstance(src, (str, Path)):
        return src
    try:
        from transformers import CLIPTokenizer  # honours the folder exactly: vocab, pad token, max length
    except ImportError:  # transformers is optional at run time: fall back when the folder allows it exactly
        return _offline_tokenizer(Path(src))
    return CLIPTokenizer.from_pretrained(str(src))


class _OfflineTokenizer:
    """open_clip's BPE (shipped with open_clip_torch) standing in for a tokenizer folder whose vocabulary it
    equals, padded and truncated as the folder says. transformers treats the pad token as special wherever
    it appears in a prompt; a prompt containing it is refused rather than tokenized differently."""

    def __init__(self, context_length: int, pad_id: int, pad_token: str):
        from ..models.text import CLIPTokenizer

        self._tok = CLIPTokenizer(context_length=context_length, pad_id=pad_id)
        self.pad_token = pad_token

    def __call__(self, prompts):
        bad = [p for p in prompts if self.pad_token in p]
        if bad:
            raise ValueError(f"prompt {bad[0]!r} contains {self.pad_token!r}, which this tokenizer treats as its "
                             "padding token; install transformers to tokenize it exactly (pip install transformers)")
        return self._tok(prompts)


def _offline_tokenizer(folder: Path) -> _OfflineTokenizer:
    from open_clip.tokenizer import SimpleTokenizer

    cfg = _json(folder / "tokenizer_config.json")
    vocab = _json(folder / "vocab.json") or _json(folder / "tokenizer.json").get("model", {}).get("vocab", {})
    ours = dict(SimpleTokenizer().encoder)
    for oc_name, hf_name in (("<start_of_text>", "<|startoftext|>"), ("<end_of_text>", "<|endoftext|>")):
        if oc_name in ours:  # open_clip spells the two special tokens differently; same ids
            ours[hf_name] = ours.pop(oc_name)
    if not cfg or vocab != ours:
        raise ImportError(f"the tokenizer in {str(folder)!r} needs transformers (pip install transformers): "
                          "its vocabulary is not open_clip's CLIP BPE, the only one usable without it")
    pad = cfg.get("pad_token", "<|endoftext|>")
    pad = pad["content"] if isinstance(pad, dict) else pad
    return _OfflineTokenizer(int(cfg.get("model_max_length", 77)), vocab[pad], pad)


def _load_text_model(src, device, dtype):
    if not isinstance(src, (str, Path)):
        return src
    try:
        from ..models.text import load_text_encoder
    except ImportError:  # our encoder module not available: use transformers' CLIPTextModel itself
        load_text_encoder = None
    if load_text_encoder is not None:
        return load_text_encoder(src, device=device, dtype=dtype)
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(str(src), torch_dtype=dtype).to(device).eval()


def _stage(loader_name: str, src, device, dtype):
    if not isinstance(src, (str, Path)):
        return src
    from .. import models

    return getattr(models, loader_name)(Path(src), device=device, dtype=dtype)


def _scheduler_cfg(folder: Path | None) -> dict:
    cfg = _json(folder / "scheduler_config.json") if folder is not None else {}
    return {"s": float(cfg.get("s", 0.008)), "scaler": float(cfg.get("scaler", 1.0))}


def _resolve(prior, decoder, weights) -> dict[str, Any]:
    """Map the user's arguments to one source per component (paths or objects)."""
    src: dict[str, Any] = {}
    if weights is not None:
        w = Path(weights)
        if prior is not None or decoder is not None:
            raise ValueError("pass either weights= (one folder with both stages) or prior=/decoder=, not both")
        if _is_repo(w, "prior_prior"):  # saved WuerstchenCombinedPipeline
            src.update(prior=w / "prior_prior", prior_text_encoder=w / "prior_text_encoder",
                       prior_tokenizer=w / "prior_tokenizer", prior_scheduler=w / "prior_scheduler",
                       decoder=w / "decoder", vqgan=w / "vqgan", decoder_text_encoder=w / "text_encoder",
                       decoder_tokenizer=w / "tokenizer", decoder_scheduler=w / "scheduler")
            return src
        if _is_repo(w / "prior", "prior") and _is_repo(w / "decoder", "decoder"):
            prior, decoder = w / "prior", w / "decoder"
        elif _is_bundle(w):  # the default model's layout (e.g. a bundle trained with `make train-default`)
            return _bundle_sources(w)
        else:
            raise FileNotFoundError(
                f"weights={str(w)!r} is neither a saved WuerstchenCombinedPipeline (model_index.json with "
                "prior_prior/, decoder/, vqgan/ ...), a folder holding prior/ and decoder/ diffusers repos, nor "
                f"a bundle in the default model's layout ({', '.join(_DEFAULT_PARTS)}, sampling.json)"
            )
    if prior is None and decoder is None:
        return _default_sources()  # the bundled default model, or NoDefaultWeightsError
    if prior is None or decoder is None:
        missing = "prior" if prior is None else "decoder"
        raise ValueError(f"{missing}= is missing: both stages are needed; " + HOW_TO_PASS)
    for name, arg, sub in (("prior", prior, "prior"), ("decoder", decoder, "decoder")):
        if isinstance(arg, (str, Path)) and _is_repo(Path(arg), sub):
            p = Path(arg)
            src[name] = p / sub
            src[f"{name}_text_encoder"] = p / "text_encoder"
            src[f"{name}_tokenizer"] = p / "tokenizer"
            src[f"{name}_scheduler"] = p / "scheduler"
            src[f"{name}_index"] = _json(p / "model_index.json")
            if name == "decoder":
                src["vqgan"] = p / "vqgan"
        elif isinstance(arg, (str, Path)) and not Path(arg).exists():
            raise FileNotFoundError(f"{name}={str(arg)!r} does not exist; " + HOW_TO_PASS)
        else:
            src[name] = arg  # a checkpoint file, our format, or a module: other parts come explicitly
    return src


def load_pipeline(
    prior=None,
    decoder=None,
    *,
    weights=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    compile: bool = False,
    cuda_graphs: bool = False,
    vqgan=None,
    prior_text_encoder=None,
    prior_tokenizer=None,
    decoder_text_encoder=None,
    decoder_tokenizer=None,
) -> WuerstchenPipeline:
    """Load the three stages and both text encoders; see the module docstring for accepted sources.

    device defaults to CUDA when available. dtype: float32, bfloat16 (recommended on GPU) or float16.
    compile=True wraps each stage's denoising step in torch.compile; cuda_graphs=True (CUDA only)
    captures it in a CUDA graph and replays it every step.
    """
    dtype = check_dtype(dtype)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={str(device)!r}")
    src = _resolve(prior, decoder, weights)
    call_defaults = src.pop("sampling_defaults", None)
    explicit = dict(vqgan=vqgan, prior_text_encoder=prior_text_encoder, prior_tokenizer=prior_tokenizer,
                    decoder_text_encoder=decoder_text_encoder, decoder_tokenizer=decoder_tokenizer)
    src.update({k: v for k, v in explicit.items() if v is not None})
    absent = [k for k in explicit if src.get(k) is None]
    if absent:
        raise ValueError(
            f"cannot find {', '.join(absent)}: prior=/decoder= were not diffusers repo folders, so pass "
            + ", ".join(f"{k}=" for k in absent) + " explicitly (folders in the diffusers/transformers layout)"
        )

    stage_c = _stage("load_stage_c", src["prior"], device, dtype)
    stage_b = _stage("load_stage_b", src["decoder"], device, dtype)
    stage_a = _stage("load_stage_a", src["vqgan"], device, dtype)
    prior_text = TextEncoder(_load_tokenizer(src["prior_tokenizer"]),
                             _load_text_model(src["prior_text_encoder"], device, dtype))
    decoder_text = TextEncoder(_load_tokenizer(src["decoder_tokenizer"]),
                               _load_text_model(src["decoder_text_encoder"], device, dtype))

    p_index, d_index = src.get("prior_index", {}), src.get("decoder_index", {})
    p_sched, d_sched = _scheduler_cfg(src.get("prior_scheduler")), _scheduler_cfg(src.get("decoder_scheduler"))
    config = dict(
        latent_mean=float(p_index.get("latent_mean", 42.0)),
        latent_std=float(p_index.get("latent_std", 1.0)),
        resolution_multiple=float(p_index.get("resolution_multiple", 42.67)),
        latent_dim_scale=float(d_index.get("latent_dim_scale", 10.67)),
        prior_s=p_sched["s"], prior_scaler=p_sched["scaler"],
        decoder_s=d_sched["s"], decoder_scaler=d_sched["scaler"],
    )
    config.update(_model_constants(stage_c, stage_b, stage_a))
    pipe = WuerstchenPipeline(stage_c, stage_b, stage_a, prior_text, decoder_text, device=device, dtype=dtype,
                              config=config, compile=compile, cuda_graphs=cuda_graphs)
    if call_defaults:  # the bundled model's sampling settings replace the call's defaults
        pipe.call_defaults = call_defaults
    return pipe


def _model_constants(stage_c, stage_b, stage_a) -> dict:
    """Constants the pipeline needs from the models' configs (with the released values as defaults)."""
    c_hidden = config_value(stage_b, "c_hidden", [320, 640, 1280, 1280])
    patch = config_value(stage_b, "patch_size", 2)
    return dict(
        prior_c_in=int(config_value(stage_c, "c_in", 16)),
        decoder_c_in=int(config_value(stage_b, "c_in", 4)),
        decoder_multiple=int(patch * 2 ** (len(c_hidden) - 1)),
        vq_scale_factor=float(config_value(stage_a, "scale_factor", 0.3764)),
        pixels_per_latent=int(config_value(stage_a, "up_down_scale_factor", 2) ** config_value(stage_a, "levels", 2)),
    )


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
