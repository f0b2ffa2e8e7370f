"""Reading and writing checkpoint files: format sniffing, safe unpickling, clear errors.

Every failure raises `CheckpointError` (a `ValueError`) whose message says which file, what was
wrong and what was expected. Pickles are only ever read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["CheckpointError", "read_tensor_file", "read_state_dict_file", "save_safetensors", "OWN_CONFIG_NAME",
           "OWN_WEIGHTS_NAME", "FORMAT_TAG"]

OWN_CONFIG_NAME = "wuerstchen_fast.json"
OWN_WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "wuerstchen_fast"


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model it was loaded into."""


def _sniff(path: Path) -> str:
    """'zip' (torch.save), 'safetensors', 'pickle' (legacy torch.save) or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n < os.path.getsize(path):
            return "safetensors"
        return "truncated-safetensors"
    if head[:1] == b"\x80":  # pickle protocol opcode
        return "pickle"
    return "unknown"


def read_tensor_file(path: str | os.PathLike):
    """Load a checkpoint file: safetensors -> (dict of tensors, metadata dict); torch.save -> (object, None)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    kind = _sniff(path)
    if kind in ("safetensors", "truncated-safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"could not read {str(path)!r} as a safetensors file ({type(e).__name__}: {e}); the file is probably "
                f"truncated or corrupted — download or save it again"
            ) from e
        return tensors, meta
    if kind in ("zip", "pickle"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=(kind == "zip"))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            hint = ("the file is probably truncated or corrupted — download or save it again"
                    if "weights_only" not in str(e) and "Unsupported global" not in str(e)
                    else "it holds Python objects other than tensors, and pickles are only loaded with "
                         "weights_only=True for safety; re-save it as a plain state dict or as safetensors")
            raise CheckpointError(f"could not load {str(path)!r} with torch.load(weights_only=True) "
                                  f"({type(e).__name__}: {msg}); {hint}") from e
        return obj, None
    raise CheckpointError(
        f"{str(path)!r} is not a checkpoint this library can read: expected a safetensors file or a torch.save "
        f"file (.pt/.pth/.bin/.ckpt), but its first bytes match neither"
    )


def read_state_dict_file(path, keys: tuple = ("state_dict",)) -> dict:
    """A flat {name: tensor} dict from a file. torch.save dicts holding several state dicts (the original
    Würstchen .pt files: 'state_dict', 'ema_state_dict', 'effnet_state_dict') are searched for `keys` in order."""
    obj, _ = read_tensor_file(path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), dict):
                return dict(obj[k])
        raise CheckpointError(
            f"{str(path)!r} holds a dict with entries {sorted(map(str, obj))[:12]} but none of {list(keys)}, and it "
            f"is not itself a state dict (name -> tensor)"
        )
    raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")


def save_safetensors(state_dict: dict, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={k: (v if isinstance(v, str) else json.dumps(v))
                                            for k, v in (metadata or {}).items()})
