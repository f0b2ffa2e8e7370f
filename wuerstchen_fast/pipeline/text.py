"""Text conditioning of a stage: the tokenizer + text model wrapper, and the checks on user embeddings.

A stage pipeline conditions on one or more named text tensors ("fields"): Würstchen v2 uses one,
`prompt_embeds` (the CLIP last hidden state); a family with pooled embeddings adds
`prompt_embeds_pooled`. The negative side of field `f` is `negative_f`. Users may pass any field
precomputed (`prompt_embeds=`), so they can encode once, weight prompts with their own tools or
cache embeddings; missing fields are encoded from the prompt.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

__all__ = ["TextEncoder", "negative_field", "prompt_list", "check_text_inputs"]


class TextEncoder:
    """Tokenizer + text model -> last_hidden_state, padded to the tokenizer's max length with the
    attention mask applied (what the released models were trained on)."""

    def __init__(self, tokenizer, model: Callable[..., Any]):
        self.tokenizer = tokenizer
        self.model = model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), padded to the tokenizer's max length; warns about cut text."""
        tok = self.tokenizer
        if not hasattr(tok, "model_max_length"):  # our offline tokenizer (models.text.CLIPTokenizer)
            return tok(prompts)
        max_len = tok.model_max_length
        enc = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        full = tok(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > max_len:
            dropped = tok.batch_decode(full[:, max_len - 1 : -1])
            warnings.warn(f"CLIP reads at most {max_len} tokens; this part of the prompt was cut: {dropped}",
                          stacklevel=5)
        return enc.input_ids, enc.attention_mask

    def __call__(self, prompts: list[str], device, dtype) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        out = self.model(ids.to(device), attention_mask=mask.to(device))
        return getattr(out, "last_hidden_state", out).to(dtype)


def negative_field(field: str) -> str:
    return f"negative_{field}"


def prompt_list(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        if not value:
            raise ValueError(f"{name} is an empty list: pass a string or a non-empty list of strings")
        return list(value)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def _check_tensor(name: str, t, width: int | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, tokens, channels), got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, tokens, channels), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if width is not None and t.shape[-1] != width:
        raise ValueError(f"{name} has {t.shape[-1]} channels but this pipeline's text conditioning has {width}: "
                         "encode it with this pipeline's text encoder (pipe.encode_prompt)")
    return t


def check_text_inputs(prompt, negative_prompt, embeds: dict, negative_embeds: dict,
                      widths: dict[str, int | None], *, prompt_required: str | None = None):
    """Validate prompt / negative_prompt and the user's embedding fields before any work.

    `embeds` / `negative_embeds` map field names to the tensors the user passed (None = not given).
    Returns (prompts or None, negatives or None, batch size). A string negative prompt applies to
    every prompt; a list must have one entry per prompt. `prompt_required` (a hint) makes a call with
    neither a prompt nor embeddings name what to pass.
    """
    prompts = prompt_list("prompt", prompt)
    negatives = prompt_list("negative_prompt", negative_prompt)
    given = {f: _check_tensor(f, t, widths.get(f)) for f, t in embeds.items() if t is not None}
    given_neg = {f: _check_tensor(negative_field(f), t, widths.get(f))
                 for f, t in negative_embeds.items() if t is not None}
    if prompts is not None and given:
        raise ValueError(f"pass either prompt or {' / '.join(given)}, not both")
    if prompts is None and not given:
        raise ValueError(f"pass prompt (a string or a list of strings) or {' and '.join(embeds)}"
                         + (f"; {prompt_required}" if prompt_required else ""))
    if negatives is not None and given_neg:
        raise ValueError(f"pass either negative_prompt or {' / '.join(negative_field(f) for f in given_neg)}, "
                         "not both")
    if prompts is None:
        missing = [f for f in embeds if f not in given]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: without a prompt every text field must be given "
                             f"({', '.join(embeds)})")
    batch = len(prompts) if prompts is not None else next(iter(given.values())).shape[0]
    for f, t in {**given, **{negative_field(k): v for k, v in given_neg.items()}}.items():
        if t.shape[0] != batch:
            raise ValueError(f"{f} has batch {t.shape[0]} but there are {batch} prompts: pass one row per prompt "
                             "(num_images_per_prompt repeats them)")
    for f, t in given_neg.items():
        if f in given and given[f].shape != t.shape:
            raise ValueError(f"{negative_field(f)} must have the shape of {f}: {tuple(t.shape)} vs "
                             f"{tuple(given[f].shape)}")
    if negatives is not None:
        if len(negatives) == 1 and batch > 1 and isinstance(negative_prompt, str):
            negatives = negatives * batch
        elif len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {batch}: pass one "
                             "negative prompt per prompt, or a single string for all of them")
    return prompts, negatives, batch
