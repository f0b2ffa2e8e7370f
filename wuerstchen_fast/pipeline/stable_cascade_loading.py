"""`load_pipeline()` for Stable Cascade (Würstchen v3): which sources are Stable Cascade, and building the
pipeline from them.

Accepted sources (`load_pipeline` sends them here when it recognises the family):
  * the diffusers repos: `prior=` a stabilityai/stable-cascade-prior folder (model_index.json, prior/,
    prior_lite/, text_encoder/, tokenizer/, scheduler/, image_encoder/, feature_extractor/) and `decoder=`
    a stabilityai/stable-cascade folder (decoder/, decoder_lite/, vqgan/, text_encoder/, tokenizer/,
    scheduler/); `variant="lite"` (or `lite=True`) takes the lite subfolders, `variant="bf16"` the
    `*.bf16.safetensors` files ("lite_bf16" both);
  * `weights=` a saved StableCascadeCombinedPipeline (prior_prior/, prior_text_encoder/, ... decoder/, vqgan/);
  * single models for `prior=` / `decoder=`: a diffusers StableCascadeUNet folder, an original Stability file
    (stage_c*.safetensors, stage_b*.safetensors) or our format, with the other parts given explicitly:
    `vqgan=` (a PaellaVQModel folder, or the original stage_a.safetensors), `text_encoder=` + `tokenizer=`
    (one CLIP ViT-bigG-14 with projection serves both stages; `prior_text_encoder=` / `decoder_text_encoder=`
    and their tokenizers set them apart), optionally `image_encoder=` + `feature_extractor=` for `images=`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


from ..models.checkpoint_io import read_tensor_file
from ..models.stable_cascade import StableCascadeUNet
from ..models.stable_cascade_loading import OWN_STAGE, detect_family, load_stable_cascade
from .base import config_value
from .stable_cascade import CascadeTextEncoder, StableCascadeDecoderPipeline, StableCascadePriorPipeline
from .stable_cascade_combined import StableCascadeCombinedPipeline
from .text_loading import load_tokenizer_source

__all__ = ["is_stable_cascade", "load_stable_cascade_pipeline", "load_stable_cascade_stage", "split_variant"]

_SC_PIPELINES = ("StableCascadePriorPipeline", "StableCascadeDecoderPipeline", "StableCascadeCombinedPipeline")
# The original Stage A applies 0.43 to its latents (modules/stage_a.py); diffusers' vqgan/config.json says its own.
ORIGINAL_STAGE_A_SCALE = 0.43


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_sc_source(src) -> bool:
    if isinstance(src, StableCascadeUNet):
        return True
    if not isinstance(src, (str, Path)):
        return False
    p = Path(src)
    if p.is_dir():
        if _json(p / "model_index.json").get("_class_name") in _SC_PIPELINES:
            return True
        if _json(p / "config.json").get("_class_name") == "StableCascadeUNet":
            return True
        if _json(p / "wuerstchen_fast.json").get("stage") == OWN_STAGE:
            return True
        return any((p / f"stage_{s}.safetensors").is_file() for s in ("c", "b", "c_bf16", "b_bf16"))
    if p.is_file() and p.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:  # the keys only, no tensor is read
                meta = f.metadata() or {}
                keys = dict.fromkeys(f.keys())
        except Exception:  # not ours to judge here: the stage loaders give the precise error
            return False
        if "wuerstchen_fast" in meta:
            return json.loads(meta["wuerstchen_fast"]).get("stage") == OWN_STAGE
        return (detect_family(keys) or ("",))[0] == "stable_cascade"
    return False


def is_stable_cascade(*sources, weights=None) -> bool:
    """Whether the sources given to a loader (local paths or built models) are Stable Cascade's."""
    if weights is not None:
        return _json(Path(weights) / "model_index.json").get("_class_name") in _SC_PIPELINES
    return any(_is_sc_source(s) for s in sources)


def split_variant(variant: str | None, lite: bool) -> tuple[bool, str | None]:
    """`variant="lite"` / "lite_bf16" / "bf16" -> (lite, file variant)."""
    if variant is None:
        return lite, None
    parts = [v for v in variant.replace("-", "_").split("_") if v]
    return lite or "lite" in parts, "_".join(v for v in parts if v != "lite") or None


def _repo(path, kind: str) -> Path | None:
    p = Path(path) if isinstance(path, (str, Path)) else None
    if p is None or not (p / "model_index.json").is_file():
        return None
    cls = _json(p / "model_index.json").get("_class_name")
    want = "StableCascadePriorPipeline" if kind == "prior" else "StableCascadeDecoderPipeline"
    if cls != want:
        raise ValueError(f"{kind}={str(p)!r} holds a {cls}, not a {want}: pass the "
                         f"{'stabilityai/stable-cascade-prior' if kind == 'prior' else 'stabilityai/stable-cascade'} "
                         f"folder as {kind}=")
    return p


_NEEDED = {"prior": ("prior_text_encoder", "prior_tokenizer"),
           "decoder": ("vqgan", "decoder_text_encoder", "decoder_tokenizer")}


def _sources(stages: dict, weights, explicit: dict) -> dict[str, Any]:
    """One source per part for the stages in `stages` ({"prior": arg, "decoder": arg}, None for absent ones)."""
    src: dict[str, Any] = {}
    if weights is not None:
        if any(v is not None for v in stages.values()):
            raise ValueError("pass either weights= (one folder with both stages) or prior=/decoder=, not both")
        w = Path(weights)
        src.update(prior=w / "prior_prior", prior_text_encoder=w / "prior_text_encoder",
                   prior_tokenizer=w / "prior_tokenizer", prior_scheduler=w / "prior_scheduler",
                   image_encoder=w / "prior_image_encoder", feature_extractor=w / "prior_feature_extractor",
                   decoder=w / "decoder", vqgan=w / "vqgan", decoder_text_encoder=w / "text_encoder",
                   decoder_tokenizer=w / "tokenizer", decoder_scheduler=w / "scheduler", prior_index={},
                   decoder_index=_json(w / "model_index.json"))
    else:
        for kind, arg in stages.items():
            if arg is None:
                raise ValueError(f"{kind}= is missing: a Stable Cascade pipeline needs both stages, e.g. "
                                 "load_pipeline(prior='stabilityai/stable-cascade-prior', "
                                 "decoder='stabilityai/stable-cascade') (Hub ids or local folders of those repos)")
            repo = _repo(arg, kind)
            src[kind] = repo if repo is not None else arg
            if repo is not None:
                src.update({f"{kind}_text_encoder": repo / "text_encoder", f"{kind}_tokenizer": repo / "tokenizer",
                            f"{kind}_scheduler": repo / "scheduler", f"{kind}_index": _json(repo / "model_index.json")})
                if kind == "prior":
                    src.update(image_encoder=repo / "image_encoder", feature_extractor=repo / "feature_extractor")
                else:
                    src["vqgan"] = repo / "vqgan"
    shared = {"text_encoder": ("prior_text_encoder", "decoder_text_encoder"),
              "tokenizer": ("prior_tokenizer", "decoder_tokenizer")}
    for name, value in explicit.items():
        if value is None:
            continue
        for key in shared.get(name, (name,)):
            src[key] = value
    for optional in ("image_encoder", "feature_extractor"):
        if isinstance(src.get(optional), Path) and not src[optional].exists():
            src.pop(optional)  # image variation is optional
    absent = [k for stage in stages for k in _NEEDED[stage] if src.get(k) is None]
    if absent:
        names = sorted({"text_encoder" if "text_encoder" in k else "tokenizer" if "tokenizer" in k else k
                        for k in absent})
        raise ValueError(f"cannot find {', '.join(absent)}: the sources were not Stable Cascade repo folders, so "
                         f"pass {', '.join(n + '=' for n in names)} explicitly (e.g. the vqgan/, text_encoder/ and "
                         "tokenizer/ folders of stabilityai/stable-cascade)")
    return src


def _scheduler(folder) -> dict:
    cfg = _json(Path(folder) / "scheduler_config.json") if isinstance(folder, (str, Path)) else {}
    return {"s": float(cfg.get("s", 0.008)), "scaler": float(cfg.get("scaler", 1.0))}


def _unet(src, stage: str, lite: bool, variant, device, dtype):
    if not isinstance(src, (str, Path)):
        return src
    return load_stable_cascade(src, stage=stage, lite=lite, variant=variant, device=device, dtype=dtype)


def _vqgan(src, device, dtype):
    """Stage A: the scale factor from its config (a diffusers or our folder), 0.43 for the original file."""
    if not isinstance(src, (str, Path)):
        return src
    from ..models import load_stage_a

    p = Path(src)
    overrides = {}
    if p.is_file():
        _, meta = read_tensor_file(p)
        if not (meta and "wuerstchen_fast" in meta):
            overrides["scale_factor"] = ORIGINAL_STAGE_A_SCALE
    return load_stage_a(p, device=device, dtype=dtype, **overrides)


def _text(tokenizer_src, model_src, variant, device, dtype, cache: dict) -> CascadeTextEncoder:
    from ..models.text import load_text_encoder

    def load(src, build):
        if not isinstance(src, (str, Path)):
            return src
        key = (build.__name__, str(Path(src).resolve()))
        if key not in cache:  # the two repos' folders, or one given twice: one encoder in memory
            cache[key] = build(src)
        return cache[key]

    def model(src):
        p = Path(src)
        v = variant if variant is not None and any(p.glob(f"*.{variant}.*")) else None
        return load_text_encoder(p, device=device, dtype=dtype, variant=v)

    return CascadeTextEncoder(load(tokenizer_src, load_tokenizer_source), load(model_src, model))


def _same_files(a, b) -> bool:
    """Two tokenizer folders with byte-identical files (they are a few MB)."""
    a, b = Path(a), Path(b)
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    return names == sorted(p.name for p in b.iterdir() if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _same_text_encoder(prior_text, decoder_text, src) -> bool:
    """The released repos each carry the same CLIP ViT-bigG-14: keep one copy when the weights are equal."""
    tokenizers = [src.get(k) for k in ("prior_tokenizer", "decoder_tokenizer")]
    if prior_text.tokenizer is not decoder_text.tokenizer and not (
            all(isinstance(t, (str, Path)) for t in tokenizers) and _same_files(*tokenizers)):
        return False
    pm, dm = prior_text.model, decoder_text.model
    if pm is dm:
        return True
    if type(pm) is not type(dm) or getattr(pm, "config", None) != getattr(dm, "config", None):
        return False
    a, b = pm.state_dict(), dm.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _image_encoder(src, device, dtype):
    if src is None or not isinstance(src, (str, Path)):
        return src
    from ..models.clip_vision import load_image_encoder

    return load_image_encoder(src, device=device, dtype=dtype)


def _feature_extractor(src):
    if src is None or not isinstance(src, (str, Path)):
        return src
    from ..models.clip_vision import CLIPImagePreprocessor

    return CLIPImagePreprocessor.from_folder(src)


_PARTS = ("vqgan", "text_encoder", "tokenizer", "prior_text_encoder", "prior_tokenizer", "decoder_text_encoder",
          "decoder_tokenizer", "image_encoder", "feature_extractor")


def _check_parts(explicit: dict) -> None:
    unknown = sorted(set(explicit) - set(_PARTS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown} for a Stable Cascade pipeline; its parts: {_PARTS}")


def _build_prior(src, lite, variant, device, dtype, opts, cache) -> StableCascadePriorPipeline:
    stage_c = _unet(src["prior"], "prior", lite, variant, device, dtype)
    index = src.get("prior_index", {})
    config = dict(resolution_multiple=float(index.get("resolution_multiple", 42.67)),
                  c_in=int(config_value(stage_c, "in_channels", 16)), **_scheduler(src.get("prior_scheduler")))
    text = _text(src["prior_tokenizer"], src["prior_text_encoder"], variant, device, dtype, cache)
    return StableCascadePriorPipeline(stage_c, text, image_encoder=_image_encoder(src.get("image_encoder"), device,
                                                                                   dtype),
                                      feature_extractor=_feature_extractor(src.get("feature_extractor")),
                                      device=device, dtype=dtype, config=config, **opts)


def _build_decoder(src, lite, variant, device, dtype, opts, cache,
                   resolution_multiple: float = 42.67) -> StableCascadeDecoderPipeline:
    stage_b = _unet(src["decoder"], "decoder", lite, variant, device, dtype)
    stage_a = _vqgan(src["vqgan"], device, dtype)
    config = dict(
        latent_dim_scale=float(src.get("decoder_index", {}).get("latent_dim_scale", 10.67)),
        vq_scale_factor=float(config_value(stage_a, "scale_factor", 0.3764)),
        decoder_multiple=int(config_value(stage_b, "patch_size", 2)),
        pixels_per_latent=int(config_value(stage_a, "up_down_scale_factor", 2) ** config_value(stage_a, "levels", 2)),
        c_in=int(config_value(stage_b, "in_channels", 4)), resolution_multiple=resolution_multiple,
        **_scheduler(src.get("decoder_scheduler")))
    text = _text(src["decoder_tokenizer"], src["decoder_text_encoder"], variant, device, dtype, cache)
    return StableCascadeDecoderPipeline(stage_b, stage_a, text, device=device, dtype=dtype, config=config, **opts)


def load_stable_cascade_pipeline(prior=None, decoder=None, *, weights=None, device, dtype, opts: dict,
                                 variant: str | None = None, lite: bool = False,
                                 **explicit) -> StableCascadeCombinedPipeline:
    """The Stable Cascade pipeline from the sources of the module docstring (local paths: Hub ids are resolved
    by the caller). `explicit`: the parts of `_PARTS` (paths or built objects); `opts`: compile / cuda_graphs."""
    _check_parts(explicit)
    lite, file_variant = split_variant(variant, lite)
    src = _sources({"prior": prior, "decoder": decoder}, weights, explicit)
    cache: dict = {}
    prior_pipe = _build_prior(src, lite, file_variant, device, dtype, opts, cache)
    decoder_pipe = _build_decoder(src, lite, file_variant, device, dtype, opts, cache,
                                  prior_pipe.config["resolution_multiple"])
    if _same_text_encoder(prior_pipe.text, decoder_pipe.text, src):
        decoder_pipe.text = prior_pipe.text  # one encoder serves both stages: half the memory, one encoding a call
    return StableCascadeCombinedPipeline.from_pipes(prior_pipe, decoder_pipe)


def load_stable_cascade_stage(stage: str, source, *, device, dtype, opts: dict, variant: str | None = None,
                              lite: bool = False, **explicit):
    """One Stable Cascade stage pipeline (`load_prior_pipeline` / `load_decoder_pipeline` of these weights)."""
    _check_parts(explicit)
    lite, file_variant = split_variant(variant, lite)
    src = _sources({stage: source}, None, explicit)
    build = _build_prior if stage == "prior" else _build_decoder
    return build(src, lite, file_variant, device, dtype, opts, {})
