"""Loading the text side of a stage from files: tokenizer folders and text encoder weights.

transformers is a test dependency, not a runtime one: without it, a tokenizer folder whose
vocabulary is open_clip's CLIP BPE (the released ones, and the bundled model's) is read with
open_clip's tokenizer, padded and truncated as the folder says.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_tokenizer_source", "load_text_model_source"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_tokenizer_source(src):
    """A tokenizer object as given, or the tokenizer of a folder."""
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


def load_text_model_source(src, device, dtype):
    """A text model object as given, or our CLIP text encoder loaded from a folder or file."""
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
