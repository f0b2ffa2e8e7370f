"""Loading and saving Stable Cascade (Würstchen v3) UNets: `load_stable_cascade`, `save_stable_cascade`.

Accepted sources (the format is detected from the files, the config read from the checkpoint):
  * a diffusers `StableCascadeUNet` folder (`config.json` + `diffusion_pytorch_model[.VARIANT].safetensors`,
    `.bin`, or shards with their index, variant indices included);
  * a diffusers pipeline folder (`model_index.json`): `prior/`, `prior_lite/` (stabilityai/stable-cascade-prior),
    `decoder/`, `decoder_lite/` (stabilityai/stable-cascade) or a saved combined pipeline's `prior_prior/`;
  * an original Stability file (`stage_c.safetensors`, `stage_c_lite_bf16.safetensors`, `stage_b.safetensors`,
    ...), or a folder holding them: attention stored as `nn.MultiheadAttention` (`attn.in_proj_*`), Stage B's
    pooled-text mapper named `clip_mapper`; the config is inferred from the tensor shapes (see
    `infer_stable_cascade_config`);
  * our own format (`save_stable_cascade` / `save_stage`): `wuerstchen_fast.json` + `model.safetensors`.

A Würstchen v2 checkpoint given here (or a Stable Cascade one given to `load_stage_c` / `load_stage_b`)
is refused with a message naming the right loader: both families have a Stage B key `clip_mapper`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .assemble import build_with_state, save_own_format
from .checkpoint_io import (FORMAT_TAG, OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, CheckpointError, read_state_dict_file,
                            read_tensor_file)
from .loading import HEAD_DIM, from_original_layout, to_original_layout
from .stable_cascade import StableCascadeUNet
from .stable_cascade_config import ATTNBLOCK, RESBLOCK, TIMESTEPBLOCK, StableCascadeConfig
from .weight_files import read_weights

__all__ = ["load_stable_cascade", "save_stable_cascade", "infer_stable_cascade_config", "detect_family",
           "from_original_stable_cascade", "to_original_stable_cascade", "STAGES", "OWN_STAGE"]

OWN_STAGE = "stable_cascade"  # the "stage" of our format's metadata
STAGES = ("prior", "decoder")
_PIPELINES = {"StableCascadePriorPipeline": "prior", "StableCascadeDecoderPipeline": "decoder"}
_V2_LOADERS = {"stage_c": "load_stage_c", "stage_b": "load_stage_b"}
_ROLE = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)", "stage_c": "Stage C (prior)",
         "stage_b": "Stage B (decoder)"}


# ------------------------------------------------------------------------------------ family detection
def detect_family(sd: dict):
    """('stable_cascade', 'prior' | 'decoder'), ('wuerstchen_v2', 'stage_c' | 'stage_b') or None, from the keys
    of a state dict in either layout (original or diffusers)."""
    keys = set(sd)
    sc = ({"clip_txt_pooled_mapper.weight", "clip_txt_mapper.weight", "effnet_mapper.0.weight",
           "pixels_mapper.0.weight"} & keys) or any(k.startswith(("down_downscalers.", "up_upscalers.")) for k in keys)
    if sc:
        return "stable_cascade", ("prior" if "clip_txt_mapper.weight" in keys else "decoder")
    if "cond_mapper.0.weight" in keys or "projection.weight" in keys:
        return "wuerstchen_v2", "stage_c"
    if "clip_mapper.weight" in keys and any(k.startswith(("effnet_mappers.", "down_blocks.")) for k in keys):
        return "wuerstchen_v2", "stage_b"
    return None


def _refuse_v2(sd: dict, source: str) -> None:
    family = detect_family(sd)
    if family and family[0] == "wuerstchen_v2":
        stage = family[1]
        raise CheckpointError(
            f"{source} is a Würstchen v2 {_ROLE[stage]} checkpoint, not Stable Cascade (Würstchen v3): load it with "
            f"wuerstchen_fast.models.{_V2_LOADERS[stage]}() or wuerstchen_fast.load_pipeline()")


def stable_cascade_hint(sd: dict, source: str, stage: str) -> str | None:
    """For the v2 loaders: a message when `sd` is a Stable Cascade checkpoint (None otherwise)."""
    family = detect_family(sd)
    if family and family[0] == "stable_cascade":
        return (f"{source} is a Stable Cascade (Würstchen v3) {_ROLE[family[1]]} checkpoint, not a Würstchen v2 "
                f"{_ROLE[stage]}: load it with wuerstchen_fast.models.load_stable_cascade() or "
                "wuerstchen_fast.load_pipeline()")
    return None


# ---------------------------------------------------------------------------------------- layouts
def from_original_stable_cascade(sd: dict) -> dict:
    """Original Stability layout -> ours (= diffusers'): attention in_proj split into to_q/k/v, out_proj ->
    to_out.0, and (Stage B only) `clip_mapper` -> `clip_txt_pooled_mapper`. Prefixes `module.` / `_orig_mod.`
    are stripped."""
    out = from_original_layout(sd)
    if detect_family(out) == ("stable_cascade", "decoder"):
        out = {("clip_txt_pooled_mapper." + k[len("clip_mapper."):] if k.startswith("clip_mapper.") else k): v
               for k, v in out.items()}
    return out


def to_original_stable_cascade(sd: dict) -> dict:
    """Ours (= diffusers') -> the original Stability layout (inverse of `from_original_stable_cascade`)."""
    decoder = detect_family(sd) == ("stable_cascade", "decoder")
    out = to_original_layout(sd)
    if decoder:
        out = {("clip_mapper." + k[len("clip_txt_pooled_mapper."):] if k.startswith("clip_txt_pooled_mapper.") else k): v
               for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------- config inference
def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"this does not look like a Stable Cascade checkpoint: key {key!r} is missing (the "
                              f"checkpoint has {len(sd)} keys, e.g. {sorted(sd)[:8]})")
    return sd[key]


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _level_kinds(sd: dict, prefix: str) -> list:
    """Block types of the modules `prefix.0`, `prefix.1`, ... in order."""
    kinds = []
    for j in range(_count(sd, rf"{re.escape(prefix)}\.(\d+)\.")):
        p = f"{prefix}.{j}"
        if f"{p}.depthwise.weight" in sd:
            kinds.append(RESBLOCK)
        elif f"{p}.mapper.weight" in sd:
            kinds.append(TIMESTEPBLOCK)
        elif f"{p}.attention.to_out.0.weight" in sd:
            kinds.append(ATTNBLOCK)
        else:
            raise CheckpointError(f"Stable Cascade checkpoint: cannot tell what block {p} is (no depthwise, mapper "
                                  "or attention weights)")
    return kinds


def _period(kinds: list) -> list:
    for n in range(1, len(kinds) + 1):
        if len(kinds) % n == 0 and kinds[:n] * (len(kinds) // n) == kinds:
            return kinds[:n]
    return kinds


def _released_presets() -> dict:
    return {name: getattr(StableCascadeConfig, name)() for name in ("prior", "prior_lite", "decoder", "decoder_lite")}


def infer_stable_cascade_config(sd: dict, **overrides) -> StableCascadeConfig:
    """The config of an (our-layout) Stable Cascade state dict from its tensor shapes, then `overrides`.

    Shapes cannot tell the head counts (head dim 64 is assumed, as in every release), the dropout, the
    order of the timestep conditions ("sca" then "crp", as released) or whether Stage C's level transitions
    resize (released: no). Where everything the shapes tell equals a released model, that model's config
    is used, so released checkpoints get exactly diffusers' configs.
    """
    family = detect_family(sd)
    if family is None or family[0] != "stable_cascade":
        _refuse_v2(sd, "this checkpoint")
        raise CheckpointError(f"this does not look like a Stable Cascade checkpoint (keys e.g. {sorted(sd)[:8]})")
    decoder = family[1] == "decoder"
    n = _count(sd, r"down_blocks\.(\d+)\.")
    if n == 0:
        raise CheckpointError("Stable Cascade checkpoint without down_blocks")
    widths, down_layers, up_layers, types, heads = [], [], [], [], []
    kernel, c_r, conds = 3, 64, []
    for i in range(n):
        kinds = _level_kinds(sd, f"down_blocks.{i}")
        pattern = _period(kinds)
        types.append(pattern)
        down_layers.append(len(kinds) // len(pattern))
        first = kinds.index(RESBLOCK) if RESBLOCK in kinds else None
        if first is None:
            raise CheckpointError(f"Stable Cascade checkpoint: level {i} of down_blocks holds no ResBlock")
        w = sd[f"down_blocks.{i}.{first}.depthwise.weight"]
        widths.append(w.shape[0])
        kernel = w.shape[-1]
        heads.append(max(widths[-1] // HEAD_DIM, 1) if ATTNBLOCK in pattern else 0)
        if TIMESTEPBLOCK in kinds:
            t = f"down_blocks.{i}.{kinds.index(TIMESTEPBLOCK)}"
            c_r = sd[f"{t}.mapper.weight"].shape[1]
            names = {k[len(t) + 8:].split(".")[0] for k in sd if k.startswith(f"{t}.mapper_")}
            conds = [c for c in ("sca", "crp") if c in names] + sorted(names - {"sca", "crp"})
    for k in range(n):
        up_layers.append(len(_level_kinds(sd, f"up_blocks.{k}")) // len(types[n - 1 - k]))
    pooled = _need(sd, "clip_txt_pooled_mapper.weight")
    kv = next((v for k, v in sd.items() if k.endswith(".kv_mapper.1.weight")), None)
    cc = kv.shape[1] if kv is not None else pooled.shape[0] // 4
    if "down_downscalers.1.1.weight" in sd or n == 1:
        switch = None
    else:
        switch = [False] * (n - 1)
    p = overrides.get("patch_size", 2 if decoder else 1)
    emb, clf = _need(sd, "embedding.1.weight"), _need(sd, "clf.1.weight")
    opt = {name: (sd[key].shape[1] if key in sd else None) for name, key in (
        ("clip_text_in_channels", "clip_txt_mapper.weight"), ("clip_image_in_channels", "clip_img_mapper.weight"),
        ("effnet_in_channels", "effnet_mapper.0.weight"), ("pixel_mapper_in_channels", "pixels_mapper.0.weight"))}
    cfg = dict(
        in_channels=emb.shape[1] // (p * p), out_channels=clf.shape[0] // (p * p), timestep_ratio_embedding_dim=c_r,
        patch_size=p, conditioning_dim=cc, block_out_channels=widths, num_attention_heads=heads,
        down_num_layers_per_block=down_layers, up_num_layers_per_block=up_layers,
        down_blocks_repeat_mappers=[_count(sd, rf"down_repeat_mappers\.{i}\.(\d+)\.") + 1 for i in range(n)],
        up_blocks_repeat_mappers=[_count(sd, rf"up_repeat_mappers\.{k}\.(\d+)\.") + 1 for k in range(n)],
        block_types_per_layer=types, clip_text_pooled_in_channels=pooled.shape[1], clip_seq=pooled.shape[0] // cc,
        kernel_size=kernel, dropout=[0.0] * n, timestep_conditioning_type=conds, switch_level=switch, **opt)
    unknowable = ("num_attention_heads", "dropout", "self_attn")
    for preset in _released_presets().values():
        released = preset.to_dict()
        if all(released[k] == v for k, v in cfg.items() if k not in unknowable):
            cfg = released
            break
    cfg.update(overrides)
    return StableCascadeConfig.from_dict(cfg)


# ----------------------------------------------------------------------------------- source reading
def _original_name(stage: str, lite: bool, variant: str | None) -> str:
    return f"stage_{'c' if stage == 'prior' else 'b'}{'_lite' if lite else ''}{'_' + variant if variant else ''}.safetensors"


def _pick_stage(stage: str | None, found: str, source: str) -> str:
    if stage is not None and stage != found:
        raise CheckpointError(f"{source} holds a Stable Cascade {_ROLE[found]}, but stage={stage!r} was asked for")
    return found


def _subfolder(path: Path, stage: str | None, lite: bool) -> tuple:
    """A pipeline folder -> (model folder, stage)."""
    index = json.loads((path / "model_index.json").read_text())
    stage = stage or _PIPELINES.get(index.get("_class_name"))
    if stage is None:
        stage = "prior" if any((path / s).is_dir() for s in ("prior", "prior_lite", "prior_prior")) else "decoder"
    names = {"prior": ["prior_lite"] if lite else ["prior", "prior_prior"],
             "decoder": ["decoder_lite"] if lite else ["decoder"]}[stage]
    for name in names:
        if (path / name).is_dir():
            return path / name, stage
    raise CheckpointError(f"pipeline folder {str(path)!r} has no {' or '.join(n + '/' for n in names)} subfolder "
                          f"for the Stable Cascade {_ROLE[stage]}" + ("" if lite else "; pass lite=True for the lite models"))


def _read_source(path, stage: str | None, lite: bool, variant: str | None, use_safetensors: bool | None):
    """-> (state dict in our layout, config dict or None, stage, description of the source)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if path.is_dir() and (path / "model_index.json").is_file():
        path, stage = _subfolder(path, stage, lite)
    if path.is_dir():
        if (path / OWN_CONFIG_NAME).is_file():
            meta = json.loads((path / OWN_CONFIG_NAME).read_text())
            sd, _ = read_tensor_file(path / OWN_WEIGHTS_NAME)
            return _own(meta, sd, stage, path)
        if (path / "config.json").is_file():
            conf = json.loads((path / "config.json").read_text())
            source = f"diffusers folder {str(path)!r}"
            cls_name = conf.get("_class_name")
            if cls_name in ("WuerstchenPrior", "WuerstchenDiffNeXt"):
                v2 = "stage_c" if cls_name == "WuerstchenPrior" else "stage_b"
                raise CheckpointError(f"{source} holds a Würstchen v2 {cls_name}, not a Stable Cascade UNet: load it "
                                      f"with wuerstchen_fast.models.{_V2_LOADERS[v2]}()")
            if cls_name not in (None, "StableCascadeUNet"):
                raise CheckpointError(f"{source} holds a diffusers {cls_name}, not a StableCascadeUNet")
            sd = from_original_stable_cascade(read_weights(path, variant=variant, use_safetensors=use_safetensors))
            _refuse_v2(sd, source)
            found = "decoder" if conf.get("effnet_in_channels") is not None else "prior"
            return sd, conf, _pick_stage(stage, found, source), source
        stages = [stage] if stage else list(STAGES)
        files = [path / _original_name(s, lite, variant) for s in stages]
        existing = [f for f in files if f.is_file()]
        if len(existing) != 1:
            what = "both" if existing else "none"
            raise CheckpointError(
                f"{str(path)!r} is not a Stable Cascade folder: no config.json ({'diffusers'}), {OWN_CONFIG_NAME} (ours) "
                f"or model_index.json (a pipeline), and {what} of the original files {[f.name for f in files]}"
                + ("; pass stage='prior' or stage='decoder'" if existing else ""))
        path = existing[0]
    obj, meta = read_tensor_file(path)
    if meta and FORMAT_TAG in meta:
        return _own(json.loads(meta[FORMAT_TAG]), obj, stage, path)
    sd = from_original_stable_cascade(obj if meta is not None else read_state_dict_file(path, ("ema_state_dict", "state_dict")))
    source = f"file {str(path)!r}"
    _refuse_v2(sd, source)
    family = detect_family(sd)
    if family is None:
        raise CheckpointError(f"{source} is not a Stable Cascade checkpoint (keys e.g. {sorted(sd)[:8]})")
    return sd, None, _pick_stage(stage, family[1], source), source + " (config inferred from tensor shapes)"


def _own(meta: dict, sd: dict, stage: str | None, path: Path):
    source = f"wuerstchen_fast checkpoint {str(path)!r}"
    if meta.get("format") != FORMAT_TAG or "config" not in meta:
        raise CheckpointError(f"{str(path)!r}: {OWN_CONFIG_NAME} is not a wuerstchen_fast config (no format/config)")
    if meta.get("stage") != OWN_STAGE:
        raise CheckpointError(f"{source} holds a {meta.get('stage')} model, not a Stable Cascade UNet; use "
                              f"load_{meta.get('stage')}() for it")
    found = "decoder" if meta["config"].get("effnet_in_channels") is not None else "prior"
    return sd, meta["config"], _pick_stage(stage, found, source), source


# ------------------------------------------------------------------------------------- load / save
def load_stable_cascade(path, *, stage: str | None = None, lite: bool = False, variant: str | None = None,
                        use_safetensors: bool | None = None, device=None, dtype=None, config=None,
                        **overrides) -> StableCascadeUNet:
    """A Stable Cascade prior or decoder from any source of the module docstring.

    stage: "prior" / "decoder", needed only to pick from a folder holding both (else checked against the
    checkpoint); lite: the lite models of a pipeline or originals folder; variant: the diffusers file
    variant (e.g. "bf16": `diffusion_pytorch_model.bf16.safetensors`, or `stage_c_bf16.safetensors` in an
    originals folder). Keyword overrides (e.g. `num_attention_heads=[...]`) replace config fields.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    sd, cfg_dict, stage, source = _read_source(path, stage, lite, variant, use_safetensors)
    if config is not None:
        base = config.to_dict() if isinstance(config, StableCascadeConfig) else dict(config)
        cfg = StableCascadeConfig.from_dict({**base, **overrides})
    elif cfg_dict is not None:
        cfg = StableCascadeConfig.from_dict({**cfg_dict, **overrides})
    else:
        cfg = infer_stable_cascade_config(sd, **overrides)
    return build_with_state(StableCascadeUNet, cfg, sd, source=source, device=device, dtype=dtype)


def save_stable_cascade(model: StableCascadeUNet, folder) -> Path:
    """Our format: `folder/wuerstchen_fast.json` + `folder/model.safetensors` (config also in its metadata)."""
    return save_own_format(model, folder, OWN_STAGE)
