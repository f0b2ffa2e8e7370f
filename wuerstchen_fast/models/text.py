"""CLIP text encoders (ViT-H-14 for v1 Stage C and Stage B, ViT-bigG-14 for v2 Stage C and for both
Stable Cascade stages) and tokenizers.

`CLIPTextEncoder.forward(input_ids, attention_mask) -> last_hidden_state` equals transformers'
`CLIPTextModel(input_ids, attention_mask).last_hidden_state`: pre-LN transformer with a causal mask
plus a key padding mask, final LayerNorm applied, unpooled. `encode(...)` returns what Stable Cascade
reads as well: the last layer's output *before* the final LayerNorm (transformers' `hidden_states[-1]`),
the pooled end-of-text row and, with `projection_dim`, its `text_projection` (transformers'
`CLIPTextModelWithProjection.text_embeds`). Parameter names are open_clip's text tower
(`token_embedding`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_*,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection` as a (width, projection_dim)
matrix), so open_clip checkpoints load directly; transformers `CLIPTextModel`,
`CLIPTextModelWithProjection` and `CLIPModel` folders are converted on load. Configs come from open_clip's
model configs (`TextEncoderConfig.from_open_clip("ViT-bigG-14")`).

Tokenizer: `CLIPTokenizer` pads to 77 with id 0 and returns (input_ids, attention_mask). It uses
open_clip's shipped BPE vocabulary (offline) or a transformers tokenizer folder.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .assemble import build_with_state, save_own_format
from .checkpoint_io import (FORMAT_TAG, OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, CheckpointError, read_state_dict_file,
                            read_tensor_file)
from .clip_transformer import CLIPTransformer, check_activation, encoder_layers_from_transformers
from .configs import _ConfigMixin
from .weight_files import read_weights

__all__ = ["TextEncoderConfig", "CLIPTextEncoder", "CLIPTextOutput", "CLIPTokenizer", "load_text_encoder",
           "load_tokenizer", "save_text_encoder", "write_clip_vocab_files", "build_transformers_clip_tokenizer",
           "from_transformers_layout"]


@dataclass
class TextEncoderConfig(_ConfigMixin):
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_width: int = 4096
    act: str = "gelu"  # "gelu" (laion ViT-H/bigG) or "quick_gelu" (OpenAI CLIP)
    ln_eps: float = 1e-5
    projection_dim: int | None = None  # width of text_projection (None: no projection)
    eos_token_id: int = 49407  # the pooled row is the first end-of-text token (2: transformers' legacy argmax)

    @classmethod
    def from_open_clip(cls, name: str, quick_gelu: bool | None = None,
                       projection: bool = False) -> "TextEncoderConfig":
        """Text tower config of an open_clip model config (e.g. 'ViT-H-14', 'ViT-bigG-14', 'ViT-B-32');
        `projection=True` adds the model's text projection (to its `embed_dim`)."""
        import open_clip

        full = open_clip.get_model_config(name)
        if full is None:
            raise ValueError(f"open_clip has no model config named {name!r}; see open_clip.list_models()")
        t = full["text_cfg"]
        width = t.get("width", 512)
        qg = full.get("quick_gelu", False) if quick_gelu is None else quick_gelu
        return cls(vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77), width=width,
                   heads=t.get("heads", 8), layers=t.get("layers", 12), mlp_width=int(width * t.get("mlp_ratio", 4.0)),
                   act="quick_gelu" if qg else "gelu", projection_dim=full["embed_dim"] if projection else None)

    @classmethod
    def vit_h_14(cls) -> "TextEncoderConfig":
        """CLIP ViT-H-14 text tower (v1 Stage C, Stage B): width 1024, 24 layers, 16 heads."""
        return cls.from_open_clip("ViT-H-14")

    @classmethod
    def vit_bigg_14(cls, projection: bool = False) -> "TextEncoderConfig":
        """CLIP ViT-bigG-14 text tower (v2 Stage C): width 1280, 32 layers, 20 heads; `projection=True` adds
        the 1280 x 1280 text projection (Stable Cascade, transformers' CLIPTextModelWithProjection)."""
        return cls.from_open_clip("ViT-bigG-14", projection=projection)

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        return cls(width=32, heads=4, layers=2, mlp_width=64)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, width), after the final LayerNorm
    pre_norm_hidden_state: torch.Tensor  # (B, L, width), the last layer's output before it (hidden_states[-1])
    pooled_output: torch.Tensor  # (B, width), last_hidden_state at the end-of-text token
    text_embeds: torch.Tensor | None  # (B, projection_dim), pooled_output @ text_projection (None without one)


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else TextEncoderConfig.vit_bigg_14()
        if cfg.width % cfg.heads:
            raise ValueError(f"TextEncoderConfig: width={cfg.width} must be divisible by heads={cfg.heads}")
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width).normal_(std=0.01))
        self.transformer = CLIPTransformer(cfg.width, cfg.heads, cfg.layers, cfg.mlp_width, cfg.act, cfg.ln_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim).normal_(std=cfg.width ** -0.5))

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, n = input_ids.shape
        if n > self.config.context_length:
            raise ValueError(f"input of {n} tokens is longer than the context length {self.config.context_length}; "
                             f"tokenize with truncation")
        x = self.token_embedding(input_ids) + self.positional_embedding[:n]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]  # causal
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # key padding
        return self.transformer(x, allowed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids, (B, L) 1/0 mask (None = all valid) -> (B, L, width) last_hidden_state."""
        return self.ln_final(self._hidden(input_ids, attention_mask))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CLIPTextOutput:
        """All of CLIPTextOutput in one pass (what Stable Cascade reads: the pre-norm states and text_embeds)."""
        pre = self._hidden(input_ids, attention_mask)
        last = self.ln_final(pre)
        ids = input_ids.to(device=last.device, dtype=torch.int)
        # transformers' rule: the first end-of-text token (the legacy configs with eos_token_id 2: argmax)
        eos = ids.argmax(dim=-1) if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int().argmax(-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        proj = getattr(self, "text_projection", None)
        # The (proj, width) weight transformers multiplies with, made contiguous: the same GEMM, the same rounding
        return CLIPTextOutput(last, pre, pooled, F.linear(pooled, proj.t().contiguous()) if proj is not None else None)


# ----------------------------------------------------------------------------------------- tokenizer
def write_clip_vocab_files(folder) -> tuple:
    """Write transformers-style `vocab.json` + `merges.txt` built from open_clip's shipped BPE file.

    open_clip's vocabulary is: 256 byte symbols, the same with '</w>', the 48894 merges, then the two
    special tokens; transformers names those '<|startoftext|>' (49406) and '<|endoftext|>' (49407)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_transformers_clip_tokenizer(folder=None, model_max_length: int = 77, pad_token: str = "!"):
    """A transformers `CLIPTokenizer` built offline from open_clip's shipped BPE vocabulary, padding with
    '!' (id 0) as the laion tokenizers Würstchen uses do; saved to `folder` when given."""
    import tempfile

    from transformers import CLIPTokenizer as HFCLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_clip_vocab_files(folder or tmp)
        vocab = json.loads(Path(vocab_path).read_text())
        merges = [tuple(line.split()) for line in Path(merges_path).read_text().splitlines()[1:] if line]
    try:  # transformers >= 5: the tokenizers-backed class takes the vocabulary itself
        tok = HFCLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)
    except TypeError:  # older transformers: the slow tokenizer takes file paths
        tok = HFCLIPTokenizer(vocab_file=str(vocab_path), merges_file=str(merges_path), pad_token=pad_token,
                              model_max_length=model_max_length)
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


class CLIPTokenizer:
    """Texts -> (input_ids (B, L), attention_mask (B, L)), padded with `pad_id` to `context_length`,
    truncated keeping the end-of-text token. Backed by open_clip's BPE (default, offline) or by a
    transformers tokenizer (`load_tokenizer(folder)`)."""

    def __init__(self, context_length: int = 77, pad_id: int = 0, hf_tokenizer=None):
        self.context_length = context_length
        self.pad_id = pad_id
        self._hf = hf_tokenizer
        if hf_tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._oc = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts, context_length: int | None = None):
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        if self._hf is not None:
            enc = self._hf(list(texts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        ids = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), n), dtype=torch.long)
        sot, eot = self._oc.sot_token_id, self._oc.eot_token_id
        for i, t in enumerate(texts):
            toks = [sot] + self._oc.encode(t)[: n - 2] + [eot]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return ids, mask


def load_tokenizer(path=None, context_length: int = 77) -> CLIPTokenizer:
    """`None`: open_clip's shipped vocabulary; a folder: a transformers CLIP tokenizer saved there
    (or the `tokenizer/` subfolder of a diffusers pipeline folder)."""
    if path is None:
        return CLIPTokenizer(context_length=context_length)
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    path = Path(path)
    if (path / "tokenizer").is_dir() and not (path / "vocab.json").is_file():
        path = path / "tokenizer"
    if not (path / "vocab.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a CLIP tokenizer folder (no vocab.json)")
    hf = HFCLIPTokenizer.from_pretrained(str(path))
    return CLIPTokenizer(context_length=context_length, pad_id=hf.pad_token_id, hf_tokenizer=hf)


# ------------------------------------------------------------------------------------------- loading
def from_transformers_layout(sd: dict) -> dict:
    """transformers CLIPTextModel / CLIPTextModelWithProjection keys -> open_clip text-tower keys (q/k/v
    concatenated to in_proj; the projection Linear's (proj, width) weight transposed to open_clip's matrix)."""
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    sd.pop("embeddings.position_ids", None)
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").t().contiguous()
    encoder_layers_from_transformers(sd, out)
    out.update(sd)  # leftovers (if any) surface as unexpected keys
    return out


def _config_from_transformers(conf: dict, projection_dim: int | None = None) -> TextEncoderConfig:
    if conf.get("model_type") == "clip" and "text_config" in conf:
        conf = conf["text_config"]
    act = check_activation(conf.get("hidden_act", "quick_gelu"), CheckpointError)
    return TextEncoderConfig(vocab_size=conf.get("vocab_size", 49408),
                             context_length=conf.get("max_position_embeddings", 77),
                             width=conf.get("hidden_size", 512), heads=conf.get("num_attention_heads", 8),
                             layers=conf.get("num_hidden_layers", 12), mlp_width=conf.get("intermediate_size", 2048),
                             act=act, ln_eps=conf.get("layer_norm_eps", 1e-5), projection_dim=projection_dim,
                             eos_token_id=conf.get("eos_token_id", 49407))


def _open_clip_text_state(sd: dict) -> dict:
    """Keep the text tower of an open_clip checkpoint (full CLIP or `text.`-prefixed custom CLIP)."""
    if any(k.startswith("text.transformer.") for k in sd):
        sd = {k[5:]: v for k, v in sd.items() if k.startswith("text.")}
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    sd = {k: v for k, v in sd.items() if k.startswith(keep)}
    if "text_projection.weight" in sd:  # a Linear projection (custom text towers): as a (width, proj) matrix
        sd["text_projection"] = sd.pop("text_projection.weight").t().contiguous()
    return sd


def _infer_text_config(sd: dict, heads: int | None = None) -> TextEncoderConfig:
    if "token_embedding.weight" not in sd or "positional_embedding" not in sd:
        raise CheckpointError("this does not look like a CLIP text encoder checkpoint: no token_embedding.weight / "
                              f"positional_embedding (keys e.g. {sorted(sd)[:8]})")
    v, w = sd["token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * w
    proj = sd["text_projection"].shape[1] if "text_projection" in sd else None
    # open_clip's laion text towers use 64-wide heads; pass heads= for other checkpoints.
    return TextEncoderConfig(vocab_size=v, context_length=sd["positional_embedding"].shape[0], width=w,
                             heads=heads or max(w // 64, 1), layers=layers, mlp_width=mlp, projection_dim=proj)


def _transformers_weights(path: Path, variant: str | None) -> dict:
    """model[.VARIANT].safetensors (or shards), else transformers' older pytorch_model[.VARIANT].bin names."""
    try:
        return read_weights(path, "model", variant=variant)
    except CheckpointError as first:
        try:
            return read_weights(path, "pytorch_model", variant=variant, use_safetensors=False)
        except CheckpointError:
            raise first from None


def load_text_encoder(path, *, device=None, dtype=None, config: TextEncoderConfig | None = None,
                      heads: int | None = None, variant: str | None = None) -> CLIPTextEncoder:
    """CLIP text encoder from a transformers CLIPTextModel / CLIPTextModelWithProjection / CLIPModel folder
    (or a diffusers pipeline's `text_encoder/`; `variant="bf16"` reads `model.bf16.safetensors`), an open_clip
    checkpoint file (config inferred from shapes, heads = width/64 unless `heads=`; set `config=` for a
    quick_gelu model), or our format (`save_text_encoder`). A text projection in the checkpoint is kept
    (`CLIPTextEncoder.encode(...).text_embeds`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if path.is_dir() and (path / "text_encoder").is_dir() and not (path / "config.json").is_file():
        path = path / "text_encoder"
    own = None
    if path.is_dir() and (path / OWN_CONFIG_NAME).is_file():
        own = json.loads((path / OWN_CONFIG_NAME).read_text())
        sd, _ = read_tensor_file(path / OWN_WEIGHTS_NAME)
    elif path.is_dir() and (path / "config.json").is_file():
        conf = json.loads((path / "config.json").read_text())
        raw = _transformers_weights(path, variant)
        if conf.get("model_type") == "clip":  # full CLIPModel: keep the text tower and its projection
            raw = {k: v for k, v in raw.items() if k.startswith(("text_model.", "text_projection."))}
        try:
            sd = from_transformers_layout(raw)
        except KeyError as e:
            raise CheckpointError(f"{str(path)!r} is not a CLIPTextModel checkpoint: key {e} is missing") from e
        proj = sd["text_projection"].shape[1] if "text_projection" in sd else None
        cfg = config or _config_from_transformers(conf, proj)
        source = f"transformers folder {str(path)!r}"
    elif path.is_dir():
        raise CheckpointError(f"{str(path)!r} is neither a transformers CLIP folder (config.json), a diffusers "
                              f"pipeline folder with text_encoder/, nor a wuerstchen_fast folder ({OWN_CONFIG_NAME})")
    else:
        obj, meta = read_tensor_file(path)
        if meta and FORMAT_TAG in meta:
            own = json.loads(meta[FORMAT_TAG])
            sd = obj
        else:
            sd = _open_clip_text_state(obj if meta is not None else read_state_dict_file(path, ("state_dict",)))
            cfg = config or _infer_text_config(sd, heads)
            source = f"open_clip checkpoint {str(path)!r} (config inferred from tensor shapes)"
    if own is not None:
        if own.get("stage") != "text_encoder":
            raise CheckpointError(f"{str(path)!r} holds a {own.get('stage')} model, not a text encoder")
        cfg = config or TextEncoderConfig.from_dict(own["config"])
        source = f"wuerstchen_fast checkpoint {str(path)!r}"
    if heads is not None:
        cfg = dataclasses.replace(cfg, heads=heads)
    return build_with_state(CLIPTextEncoder, cfg, sd, source=source, device=device, dtype=dtype)


def save_text_encoder(model: CLIPTextEncoder, folder) -> Path:
    """Our format: `folder/wuerstchen_fast.json` + `folder/model.safetensors`."""
    return save_own_format(model, folder, "text_encoder")
