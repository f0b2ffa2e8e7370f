"""Loaders for the three stages and the semantic compressor, and `save_stage`.

Accepted sources (the format is detected from the files, the config read from the checkpoint):
  * a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors` / `.bin`, as
    `save_pretrained` writes it), or a diffusers pipeline folder (`model_index.json`; the stage's
    subfolder is used: prior/, decoder/, vqgan/);
  * an original dome272/Wuerstchen .pt file (`state_dict` / `ema_state_dict` / `effnet_state_dict`,
    attention as `attn.in_proj_weight`, codebook as `vquantizer.codebook.weight`) or any bare state
    dict file: the config is inferred from the tensor shapes (head count: head dim 64, as in every
    release; pass `nhead=` to override);
  * our own format, written by `save_stage`: a folder with `wuerstchen_fast.json` + `model.safetensors`
    (the config also sits in the safetensors metadata, so the file alone loads too).
Keyword overrides (`nhead=...`, `patch_size=...`) replace config fields after reading.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from .assemble import build_with_state, save_own_format
from .checkpoint_io import (FORMAT_TAG, OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, CheckpointError, read_state_dict_file,
                            read_tensor_file)
from .configs import EffNetConfig, StageAConfig, StageBConfig, StageCConfig
from .effnet import EfficientNetEncoder
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC

__all__ = ["load_stage_a", "load_stage_b", "load_stage_c", "load_effnet", "save_stage", "load_model_state",
           "to_original_layout", "from_original_layout", "infer_config", "CheckpointError"]

_STAGES = {
    # name: (model class, config class, diffusers class name, pipeline subfolder, .pt keys to try)
    "stage_c": (StageC, StageCConfig, "WuerstchenPrior", "prior", ("ema_state_dict", "state_dict")),
    "stage_b": (StageB, StageBConfig, "WuerstchenDiffNeXt", "decoder", ("ema_state_dict", "state_dict")),
    "stage_a": (StageA, StageAConfig, "PaellaVQModel", "vqgan", ("state_dict",)),
    "effnet": (EfficientNetEncoder, EffNetConfig, None, None, ("effnet_state_dict", "state_dict")),
}
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
HEAD_DIM = 64  # every released Würstchen attention uses 64-wide heads; shapes cannot tell the head count


# ----------------------------------------------------------------------------------------------- layouts
def from_original_layout(sd: dict) -> dict:
    """Original dome272 key layout -> ours (= diffusers'): MHA in_proj/out_proj -> to_q/k/v/out.0,
    `vquantizer.codebook` -> `vquantizer.embedding`; strips `module.` / `_orig_mod.` prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        m = re.match(r"(.*attention\.)attn\.in_proj_(weight|bias)$", k)
        if m:
            base, kind = m.groups()
            if v.shape[0] % 3:
                raise CheckpointError(f"{k} has shape {tuple(v.shape)}; its first dimension must be 3 * channels")
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[f"{base}{name}.{kind}"] = part
        elif ".attention.attn.out_proj." in k:
            out[k.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = v
        elif k.startswith("vquantizer.codebook."):
            out["vquantizer.embedding." + k[len("vquantizer.codebook."):]] = v
        else:
            out[k] = v
    return out


def to_original_layout(sd: dict) -> dict:
    """Ours (= diffusers') -> the original dome272 layout (inverse of `from_original_layout`)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.*\.attention\.)to_([qkv])\.(weight|bias)$", k)
        if m:
            if m.group(2) == "q":
                parts = [sd[f"{m.group(1)}to_{x}.{m.group(3)}"] for x in "qkv"]
                out[f"{m.group(1)}attn.in_proj_{m.group(3)}"] = torch.cat(parts, dim=0)
        elif ".attention.to_out.0." in k:
            out[k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = v
        elif k.startswith("vquantizer.embedding."):
            out["vquantizer.codebook." + k[len("vquantizer.embedding."):]] = v
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------ config inference
def _need(sd: dict, key: str, stage: str) -> torch.Tensor:
    if key not in sd:
        sample = sorted(sd)[:8]
        raise CheckpointError(
            f"this does not look like a {stage} checkpoint: key {key!r} is missing (the checkpoint has {len(sd)} "
            f"keys, e.g. {sample}). Check that you are loading the right file with the right loader."
        )
    return sd[key]


def _indices(sd: dict, pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _block_kind(sd: dict, prefix: str):
    if f"{prefix}.depthwise.weight" in sd:
        return "C", sd[f"{prefix}.depthwise.weight"].shape[0]
    if f"{prefix}.mapper.weight" in sd:
        return "T", sd[f"{prefix}.mapper.weight"].shape[0] // 2
    if f"{prefix}.attention.to_out.0.weight" in sd:
        return "A", sd[f"{prefix}.attention.to_out.0.weight"].shape[0]
    return None, None


def _period(s: str) -> str:
    for p in range(1, len(s) + 1):
        if len(s) % p == 0 and s[:p] * (len(s) // p) == s:
            return s[:p]
    return s


def infer_config(stage: str, sd: dict, **overrides):
    """Config of `stage` from the shapes of an (our-layout) state dict, then `overrides` applied."""
    if stage == "stage_c":
        proj = _need(sd, "projection.weight", "Stage C")
        c = proj.shape[0]
        cfg = dict(c_in=proj.shape[1], c=c, c_cond=_need(sd, "cond_mapper.0.weight", "Stage C").shape[1],
                   c_r=_need(sd, "blocks.1.mapper.weight", "Stage C").shape[1],
                   depth=len(_indices(sd, r"blocks\.(\d+)\.depthwise\.weight$")), nhead=max(c // HEAD_DIM, 1))
    elif stage == "stage_b":
        clip = _need(sd, "clip_mapper.weight", "Stage B")
        emb = _need(sd, "embedding.1.weight", "Stage B")
        clf = _need(sd, "clf.1.weight", "Stage B")
        p = overrides.get("patch_size", 2)
        n = len(_indices(sd, r"down_blocks\.(\d+)\."))
        c_hidden, blocks, level_config, nhead, inject = [], [], [], [], []
        kernel, c_r, effnet_embd = 3, 64, 16
        for i in range(n):
            idx = _indices(sd, rf"down_blocks\.{i}\.(\d+)\.")
            kinds, width = "", None
            for j in idx:
                kind, w = _block_kind(sd, f"down_blocks.{i}.{j}")
                if kind is None:
                    continue  # the downsampler of levels i > 0
                kinds += kind
                width = w
                if kind == "C":
                    kernel = sd[f"down_blocks.{i}.{j}.depthwise.weight"].shape[-1]
                if kind == "T":
                    c_r = sd[f"down_blocks.{i}.{j}.mapper.weight"].shape[1]
            if width is None:
                raise CheckpointError(f"Stage B checkpoint: level {i} of down_blocks holds no blocks")
            pattern = _period(kinds)
            c_hidden.append(width)
            level_config.append(pattern)
            blocks.append(len(kinds) // len(pattern))
            nhead.append(max(width // HEAD_DIM, 1) if "A" in pattern else -1)
            inject.append(f"effnet_mappers.{i}.weight" in sd)
            if inject[-1]:
                effnet_embd = sd[f"effnet_mappers.{i}.weight"].shape[1]
        cfg = dict(c_in=emb.shape[1] // (p * p), c_out=clf.shape[0] // (2 * p * p), c_r=c_r, patch_size=p,
                   c_cond=clip.shape[0], c_hidden=c_hidden, nhead=nhead, blocks=blocks, level_config=level_config,
                   inject_effnet=inject, effnet_embd=effnet_embd, clip_embd=clip.shape[1], kernel_size=kernel)
    elif stage == "stage_a":
        s = overrides.get("up_down_scale_factor", 2)
        inb = _need(sd, "in_block.1.weight", "Stage A")
        out = _need(sd, "out_block.0.weight", "Stage A")
        cb = _need(sd, "vquantizer.embedding.weight", "Stage A")
        levels = len(_indices(sd, r"down_blocks\.(\d+)\.gammas$"))
        last = max(_indices(sd, r"down_blocks\.(\d+)\."))
        lat = _need(sd, f"down_blocks.{last}.0.weight", "Stage A")
        cfg = dict(in_channels=inb.shape[1] // (s * s), out_channels=out.shape[0] // (s * s), up_down_scale_factor=s,
                   levels=levels, bottleneck_blocks=len(_indices(sd, r"up_blocks\.(\d+)\.gammas$")) - (levels - 1),
                   embed_dim=lat.shape[1], latent_channels=lat.shape[0], num_vq_embeddings=cb.shape[0])
    elif stage == "effnet":
        cfg = dict(c_latent=_need(sd, "mapper.0.weight", "EfficientNet encoder").shape[0],
                   affine="mapper.1.weight" in sd)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    cfg.update(overrides)
    return _STAGES[stage][1].from_dict(cfg)


# -------------------------------------------------------------------------------------- source reading
def _read_source(stage: str, path):
    """-> (state dict in our layout, config dict or None, description of the source)."""
    model_cls, cfg_cls, diffusers_name, subfolder, pt_keys = _STAGES[stage]
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if path.is_dir():
        if (path / "model_index.json").is_file() and subfolder and (path / subfolder).is_dir():
            path = path / subfolder
        if (path / OWN_CONFIG_NAME).is_file():
            meta = json.loads((path / OWN_CONFIG_NAME).read_text())
            _check_own_meta(meta, stage, path)
            sd, _ = read_tensor_file(path / OWN_WEIGHTS_NAME)
            return sd, meta["config"], f"wuerstchen_fast folder {str(path)!r}"
        if (path / "config.json").is_file():
            conf = json.loads((path / "config.json").read_text())
            cls_name = conf.get("_class_name")
            if diffusers_name and cls_name and cls_name != diffusers_name:
                other = next((s for s, v in _STAGES.items() if v[2] == cls_name), None)
                other = "stable_cascade" if cls_name == "StableCascadeUNet" else other
                hint = f"; use load_{other}() for it" if other else ""
                raise CheckpointError(f"{str(path)!r} holds a diffusers {cls_name}, not a {diffusers_name}{hint}")
            weights = _diffusers_weights(path)
            return from_original_layout(weights), conf, f"diffusers folder {str(path)!r}"
        raise CheckpointError(
            f"{str(path)!r} is a folder but neither a diffusers model folder (config.json + "
            f"diffusion_pytorch_model.safetensors), a diffusers pipeline folder with a {subfolder!r} subfolder, nor a "
            f"wuerstchen_fast folder ({OWN_CONFIG_NAME} + {OWN_WEIGHTS_NAME})"
        )
    obj, meta = read_tensor_file(path)
    if meta and FORMAT_TAG in meta:
        own = json.loads(meta[FORMAT_TAG])
        _check_own_meta(own, stage, path)
        return obj, own["config"], f"wuerstchen_fast file {str(path)!r}"
    sd = obj if meta is not None else read_state_dict_file(path, pt_keys)
    return from_original_layout(sd), None, f"state dict file {str(path)!r} (config inferred from tensor shapes)"


def _check_own_meta(meta: dict, stage: str, path) -> None:
    if meta.get("format") != FORMAT_TAG or "config" not in meta:
        raise CheckpointError(f"{str(path)!r}: {OWN_CONFIG_NAME} is not a wuerstchen_fast config (no format/config)")
    if meta.get("stage") != stage:
        raise CheckpointError(f"{str(path)!r} holds a {meta.get('stage')} model, not {stage}; use "
                              f"load_{meta.get('stage')}() for it")


def _diffusers_weights(folder: Path) -> dict:
    for name in _DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return read_state_dict_file(folder / name)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(read_state_dict_file(folder / shard))
        return sd
    raise CheckpointError(f"diffusers folder {str(folder)!r} has a config.json but no weights; expected one of "
                          f"{list(_DIFFUSERS_WEIGHTS)} or a sharded safetensors index")


# -------------------------------------------------------------------------------------------- loading
def load_model_state(model: nn.Module, sd: dict, *, source: str = "checkpoint", assign: bool = False) -> nn.Module:
    """Strictly load `sd` into `model`; on any mismatch raise a CheckpointError naming the missing,
    unexpected and mis-shaped keys and the model's config."""
    expected = model.state_dict()
    sd = dict(sd)
    for k, v in expected.items():  # checkpoints saved before BatchNorm counted batches lack this buffer
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def lst(xs):
            return (", ".join(xs[:10]) + (f", ... ({len(xs)} in all)" if len(xs) > 10 else "")) or "none"
        cfg = getattr(model, "config", None)
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}"
            + (f" with config {cfg!r}" if cfg is not None else "")
            + f".\n  missing keys: {lst(missing)}\n  unexpected keys: {lst(unexpected)}\n  mis-shaped keys: {lst(shapes)}"
            + "\nCheck that the checkpoint is the stage you asked for, and that its config matches its weights."
        )
    model.load_state_dict(sd, strict=True, assign=assign)
    return model


def _load(stage: str, path, *, device=None, dtype=None, config=None, **overrides):
    model_cls, cfg_cls = _STAGES[stage][:2]
    sd, cfg_dict, source = _read_source(stage, path)
    if stage in ("stage_c", "stage_b"):  # Stable Cascade shares key names with v2 (clip_mapper, down_blocks)
        from .stable_cascade_loading import stable_cascade_hint

        hint = stable_cascade_hint(sd, source, stage)
        if hint:
            raise CheckpointError(hint)
    if config is not None:
        cfg = config if isinstance(config, cfg_cls) else cfg_cls.from_dict(dict(config))
        if overrides:
            cfg = cfg_cls.from_dict({**cfg.to_dict(), **overrides})
    elif cfg_dict is not None:
        cfg = cfg_cls.from_dict({**cfg_dict, **overrides})
    else:
        cfg = infer_config(stage, sd, **overrides)
    # Build on the meta device and adopt the checkpoint's tensors: no second copy of a 1B-param model.
    return build_with_state(model_cls, cfg, sd, source=source, device=device, dtype=dtype)


def load_stage_c(path, *, device=None, dtype=None, config=None, **overrides) -> StageC:
    """Stage C (prior) from a diffusers folder, an original .pt (ema_state_dict preferred), or our format."""
    return _load("stage_c", path, device=device, dtype=dtype, config=config, **overrides)


def load_stage_b(path, *, device=None, dtype=None, config=None, **overrides) -> StageB:
    """Stage B (decoder) from a diffusers folder, an original .pt (`state_dict`), or our format."""
    return _load("stage_b", path, device=device, dtype=dtype, config=config, **overrides)


def load_stage_a(path, *, device=None, dtype=None, config=None, **overrides) -> StageA:
    """Stage A (VQGAN) from a diffusers folder, an original .pt (`state_dict`), or our format."""
    return _load("stage_a", path, device=device, dtype=dtype, config=config, **overrides)


def load_effnet(path, *, device=None, dtype=None, config=None, **overrides) -> EfficientNetEncoder:
    """Semantic compressor from the original Stage B .pt (`effnet_state_dict`), a bare state dict, or our format."""
    return _load("effnet", path, device=device, dtype=dtype, config=config, **overrides)


def save_stage(model: nn.Module, folder) -> Path:
    """Save a stage (or a CLIPTextEncoder, a StableCascadeUNet) in our format: `folder/wuerstchen_fast.json` + `folder/model.safetensors`."""
    from .stable_cascade import StableCascadeUNet
    from .stable_cascade_loading import save_stable_cascade
    from .text import CLIPTextEncoder, save_text_encoder

    if isinstance(model, CLIPTextEncoder):
        return save_text_encoder(model, folder)
    if isinstance(model, StableCascadeUNet):
        return save_stable_cascade(model, folder)
    stage = next((s for s, v in _STAGES.items() if isinstance(model, v[0])), None)
    if stage is None:
        raise TypeError(f"save_stage: {type(model).__name__} is not a StageA/StageB/StageC/EfficientNetEncoder")
    return save_own_format(model, folder, stage)
