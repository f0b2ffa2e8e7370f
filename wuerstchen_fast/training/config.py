"""Training configuration: one nested dataclass per section, read from JSON, TOML or YAML, with
command-line overrides `section.key=value` (the value parsed as JSON when it parses, else a string).

    cfg = load_config("configs/shapes/stage_c.json", ["train.steps=200", "optim.lr=3e-4"])

Unknown keys are errors that name the known ones, so a typo never silently trains the wrong thing.
Every field, with its meaning, is a commented dataclass field below; `configs/shapes/` holds the
default model's recipe.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "apply_overrides", "STAGES"]

STAGES = ("stage_a", "stage_b", "stage_c")


@dataclass
class ModelSection:
    preset: str = "tiny"  # "tiny", "v1", "v2": the model config's named constructor
    config: dict = field(default_factory=dict)  # field overrides of the preset (c=..., depth=...)
    init: str | None = None  # weights to start from (any format the model loaders read)


@dataclass
class TextEncoderSection:
    path: str | None = None  # a text encoder folder (ours, transformers, diffusers text_encoder/); frozen
    preset: str = "tiny"  # when path is None: a random-init encoder drawn from `seed` (frozen), saved with the run
    config: dict = field(default_factory=dict)
    seed: int = 0
    tokenizer: str | None = None  # a transformers CLIP tokenizer folder; None: open_clip's BPE, built offline
    context_length: int = 77


@dataclass
class CompressorSection:
    kind: str = "tiny"  # "tiny" (a small convnet, for small models) or "efficientnet_v2_s" (the released one)
    path: str | None = None  # trained weights (Stage C needs the compressor Stage B was trained with)
    c_latent: int = 16
    widths: list = field(default_factory=lambda: [16, 32, 64, 96, 128])  # tiny only: one stride-2 conv each
    image_size: int = 192  # the compressor's input side; latent side = image_size / 32
    seed: int = 0  # init of a compressor built from scratch


@dataclass
class StageASection:
    path: str | None = None  # trained Stage A (needed by Stage B training; optional for Stage C samples)


@dataclass
class DataSection:
    kind: str = "shapes"  # "shapes", "folder", "webdataset"
    path: Any = None  # folder, or shards (list, glob, brace pattern)
    resolution: int = 256  # images are resized (shorter side) and centre-cropped to this
    length: int = 10_000  # shapes: samples per epoch
    seed: int = 0  # shapes: content seed; all kinds: shuffle seed
    missing_caption: str = "empty"  # "empty": train with "" (counted), "skip": skip the sample (counted)
    short_captions: float = 0.0  # shapes: fraction of captions without the position phrase
    # Stage B with a frozen compressor: encode this many samples once (Stage A latents, semantic embeddings,
    # captions) and draw every batch from them at random. Skips the per-step render + Stage A encode, which
    # dominate a small Stage B's step on a CPU. 0 = encode every batch.
    cache_size: int = 0


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up from 0, then constant (the released recipe)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.999  # 0 disables EMA
    ema_start: int = 0  # EMA copies the weights until this step, then averages
    ema_every: int = 1


@dataclass
class ObjectiveSection:
    caption_dropout: float = 0.05  # captions replaced by "" (classifier-free guidance)
    p2_weight: bool = True  # weight the ε MSE by 1 - ᾱ(t) (Stage C, Stage B)
    effnet_drop: float = 0.1  # Stage B: semantic embeddings replaced by zeros (the unconditional input)
    effnet_noise_prob: float = 0.5  # Stage B: probability of noising the semantic embeddings...
    effnet_noise_max: float = 0.25  # ... to a level t ~ U(0, effnet_noise_max)
    train_compressor: bool = True  # Stage B: train the semantic compressor jointly
    # Stage B: the space its effnet mappers see while training. "raw": the compressor's output e (what the
    # pipeline passes). "prior": Stage C's latent (e + 1) / 42 -- unit scale when the compressor is
    # calibrated for Stage C (see training/default_model.py) -- folded back into the mappers on export, so the
    # exported decoder takes e like any Würstchen decoder.
    effnet_space: str = "raw"
    vq_weight: float = 1.0  # Stage A: weight of the VQ + 0.25 commitment loss
    l1_weight: float = 0.0  # Stage A: extra L1 reconstruction term
    disc_weight: float = 0.0  # Stage A: patch discriminator loss weight (0 = no discriminator)
    disc_start: int = 0  # Stage A: step at which the discriminator loss starts


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8  # global batch (all ranks together)
    mixed_precision: str = "bf16"  # "bf16" (autocast) or "fp32"
    grad_checkpointing: bool = False
    backend: str = "auto"  # fused-op backend for the whole run: "torch" (eager reference), "auto", "triton", "cpu", "cuda"
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2, fully_shard per block)
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    compile: bool = False
    threads: int | None = None  # torch.set_num_threads


@dataclass
class LogSection:
    every: int = 10  # JSONL metrics every N steps
    progress: bool = True  # tqdm bar (rank 0)
    sample_every: int = 0  # sample images every N steps (0 = never)
    sample_prompts: list = field(default_factory=lambda: ["a red circle in the center on a blue background",
                                                          "a yellow square at the top left on a black background"])
    sample_steps: int = 20
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2


_SECTIONS = {"model": ModelSection, "text_encoder": TextEncoderSection, "compressor": CompressorSection,
             "stage_a": StageASection, "data": DataSection, "optim": OptimSection, "objective": ObjectiveSection,
             "train": TrainSection, "log": LogSection}


@dataclass
class TrainConfig:
    stage: str = "stage_c"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    compressor: CompressorSection = field(default_factory=CompressorSection)
    stage_a: StageASection = field(default_factory=StageASection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self):
        self.stage = self.stage.replace("-", "_")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        if self.train.mixed_precision not in ("bf16", "fp32"):
            raise ValueError(f"train.mixed_precision must be 'bf16' or 'fp32', got {self.train.mixed_precision!r}")
        if self.train.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {self.train.distributed!r}")
        if self.objective.effnet_space not in ("raw", "prior"):
            raise ValueError(f"objective.effnet_space must be 'raw' or 'prior', got {self.objective.effnet_space!r}")
        if self.data.cache_size < 0:
            raise ValueError(f"data.cache_size must be >= 0, got {self.data.cache_size}")
        if self.data.cache_size and (self.stage != "stage_b" or self.objective.train_compressor):
            raise ValueError("data.cache_size caches Stage A latents and semantic embeddings: it needs "
                             f"stage='stage_b' with objective.train_compressor=false (got stage={self.stage!r}, "
                             f"train_compressor={self.objective.train_compressor})")
        if self.data.cache_size and self.log.sample_every:
            raise ValueError("log.sample_every draws samples from the batch's images, which data.cache_size "
                             "replaces by cached latents: set one of them to 0")
        if self.data.short_captions and self.data.kind != "shapes":
            raise ValueError(f"data.short_captions applies to data.kind='shapes' only (got {self.data.kind!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - top)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(top)}")
        for name, sec in _SECTIONS.items():
            if name in d:
                sub = d[name] or {}
                known = {f.name for f in dataclasses.fields(sec)}
                bad = sorted(set(sub) - known)
                if bad:
                    raise ValueError(f"unknown keys {bad} in section {name!r}; known: {sorted(known)}")
                d[name] = sec(**sub)
        return cls(**d)


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    raise ValueError(f"config {str(path)!r}: expected a .json, .toml or .yaml file")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, overrides) -> dict:
    """`["train.steps=10", "stage=stage_b"]` applied to a nested dict (in place, also returned)."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return d


def load_config(path=None, overrides=None, **extra) -> TrainConfig:
    """Config from a file (or defaults when `path` is None), then `overrides`, then keyword sections."""
    d = _read(path) if path is not None else {}
    apply_overrides(d, overrides)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return TrainConfig.from_dict(d)
