"""CLIP text encoders (ViT-H-14 for v1 Stage C and Stage B, ViT-bigG-14 for v2 Stage C) and tokenizers.

`CLIPTextEncoder.forward(input_ids, attention_mask) -> last_hidden_state` equals transformers'
`CLIPTextModel(input_ids, attention_mask).last_hidden_state`: pre-LN transformer with a causal mask
plus a key padding mask, final LayerNorm applied, unpooled. Parameter names are open_clip's text
tower (`token_embedding`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_*,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`), so open_clip checkpoints load directly;
transformers `CLIPTextModel` folders are converted on load. Configs come from open_clip's model
configs (`TextEncoderConfig.from_open_clip("ViT-bigG-14")`).

Tokenizer: `CLIPTokenizer` pads to 77 with id 0 and returns (input_ids, attention_mask). It uses
open_clip's shipped BPE vocabulary (offline) or a transformers tokenizer folder.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import (FORMAT_TAG, OWN_CONFIG_NAME, OWN_WEIGHTS_NAME, CheckpointError, read_state_dict_file,
                            read_tensor_file, save_safetensors)
from .configs import _ConfigMixin

__all__ = ["TextEncoderConfig", "CLIPTextEncoder", "CLIPTokenizer", "load_text_encoder", "load_tokenizer",
           "save_text_encoder", "write_clip_vocab_files", "build_transformers_clip_tokenizer", "from_transformers_layout"]


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

    @classmethod
    def from_open_clip(cls, name: str, quick_gelu: bool | None = None) -> "TextEncoderConfig":
        """Text tower config of an open_clip model config (e.g. 'ViT-H-14', 'ViT-bigG-14', 'ViT-B-32')."""
        import open_clip

        full = open_clip.get_model_config(name)
        if full is None:
            raise ValueError(f"open_clip has no model config named {name!r}; see open_clip.list_models()")
        t = full["text_cfg"]
        width = t.get("width", 512)
        qg = full.get("quick_gelu", False) if quick_gelu is None else quick_gelu
        return cls(vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77), width=width,
                   heads=t.get("heads", 8), layers=t.get("layers", 12), mlp_width=int(width * t.get("mlp_ratio", 4.0)),
                   act="quick_gelu" if qg else "gelu")

    @classmethod
    def vit_h_14(cls) -> "TextEncoderConfig":
        """CLIP ViT-H-14 text tower (v1 Stage C, Stage B): width 1024, 24 layers, 16 heads."""
        return cls.from_open_clip("ViT-H-14")

    @classmethod
    def vit_bigg_14(cls) -> "TextEncoderConfig":
        """CLIP ViT-bigG-14 text tower (v2 Stage C): width 1280, 32 layers, 20 heads."""
        return cls.from_open_clip("ViT-bigG-14")

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        return cls(width=32, heads=4, layers=2, mlp_width=64)


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = act

    def forward(self, x):
        h = self.c_fc(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.c_proj(h)


class _SelfAttention(nn.Module):
    """Fused-QKV self-attention with nn.MultiheadAttention's parameter names (open_clip layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = _SelfAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = _Mlp(cfg.width, cfg.mlp_width, cfg.act)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.layers)])


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else TextEncoderConfig.vit_bigg_14()
        if cfg.width % cfg.heads:
            raise ValueError(f"TextEncoderConfig: width={cfg.width} must be divisible by heads={cfg.heads}")
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width).normal_(std=0.01))
        self.transformer = _Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids, (B, L) 1/0 mask (None = all valid) -> (B, L, width) last_hidden_state."""
        b, n = input_ids.shape
        if n > self.config.context_length:
            raise ValueError(f"input of {n} tokens is longer than the context length {self.config.context_length}; "
                             f"tokenize with truncation")
        x = self.token_embedding(input_ids) + self.positional_embedding[:n]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]  # causal
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # key padding
        for block in self.transformer.resblocks:
            x = block(x, allowed)
        return self.ln_final(x)


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
    """transformers CLIPTextModel keys -> open_clip text-tower keys (q/k/v concatenated to in_proj)."""
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    sd.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for a, b in rename.items():
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    out.update(sd)  # leftovers (if any) surface as unexpected keys
    return out


def _config_from_transformers(conf: dict) -> TextEncoderConfig:
    if conf.get("model_type") == "clip" and "text_config" in conf:
        conf = conf["text_config"]
    act = conf.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"CLIP text config has hidden_act={act!r}; supported: 'gelu', 'quick_gelu'")
    return TextEncoderConfig(vocab_size=conf.get("vocab_size", 49408),
                             context_length=conf.get("max_position_embeddings", 77),
                             width=conf.get("hidden_size", 512), heads=conf.get("num_attention_heads", 8),
                             layers=conf.get("num_hidden_layers", 12), mlp_width=conf.get("intermediate_size", 2048),
                             act=act, ln_eps=conf.get("layer_norm_eps", 1e-5))


def _open_clip_text_state(sd: dict) -> dict:
    """Keep the text tower of an open_clip checkpoint (full CLIP or `text.`-prefixed custom CLIP)."""
    if any(k.startswith("text.transformer.") for k in sd):
        sd = {k[5:]: v for k, v in sd.items() if k.startswith("text.")}
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")
    return {k: v for k, v in sd.items() if k.startswith(keep)}


def _infer_text_config(sd: dict, heads: int | None = None) -> TextEncoderConfig:
    if "token_embedding.weight" not in sd or "positional_embedding" not in sd:
        raise CheckpointError("this does not look like a CLIP text encoder checkpoint: no token_embedding.weight / "
                              f"positional_embedding (keys e.g. {sorted(sd)[:8]})")
    v, w = sd["token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * w
    # open_clip's laion text towers use 64-wide heads; pass heads= for other checkpoints.
    return TextEncoderConfig(vocab_size=v, context_length=sd["positional_embedding"].shape[0], width=w,
                             heads=heads or max(w // 64, 1), layers=layers, mlp_width=mlp)


def load_text_encoder(path, *, device=None, dtype=None, config: TextEncoderConfig | None = None,
                      heads: int | None = None) -> CLIPTextEncoder:
    """CLIP text encoder from a transformers CLIPTextModel/CLIPModel folder (or a diffusers pipeline's
    `text_encoder/`), an open_clip checkpoint file (config inferred from shapes, heads = width/64 unless
    `heads=`; set `config=` for a quick_gelu model), or our format (`save_text_encoder`)."""
    from .loading import load_model_state

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
        cfg = config or _config_from_transformers(conf)
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        index = next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if (path / n).is_file()), None)
        if files:
            raw = read_state_dict_file(files[0])
        elif index is not None:
            raw = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                raw.update(read_state_dict_file(path / shard))
        else:
            raise CheckpointError(f"transformers folder {str(path)!r} has no model.safetensors / pytorch_model.bin")
        if conf.get("model_type") == "clip":  # full CLIPModel: keep the text tower
            raw = {k: v for k, v in raw.items() if k.startswith("text_model.")}
        try:
            sd = from_transformers_layout(raw)
        except KeyError as e:
            raise CheckpointError(f"{str(path)!r} is not a CLIPTextModel checkpoint: key {e} is missing") from e
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
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    load_model_state(model, sd, source=source, assign=True)
    if device is not None:
        model.to(device)
    return model.eval()


def save_text_encoder(model: CLIPTextEncoder, folder) -> Path:
    """Our format: `folder/wuerstchen_fast.json` + `folder/model.safetensors`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_TAG, "version": 1, "stage": "text_encoder", "config": model.config.to_dict()}
    (folder / OWN_CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    save_safetensors(model.state_dict(), folder / OWN_WEIGHTS_NAME, metadata={FORMAT_TAG: json.dumps(meta)})
    return folder
