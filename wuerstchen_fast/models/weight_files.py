"""Which weight files of a diffusers / transformers model folder to read: variants and shards.

The names are those `save_pretrained` writes (base `diffusion_pytorch_model` for diffusers models,
`model` for transformers ones), with variant `v` (e.g. "bf16", "fp16") inserted before the extension:

    {base}.safetensors        {base}.v.safetensors         one file
    {base}.safetensors.index.json + shards                 sharded (the index's weight_map names the shards)
    {base}.safetensors.index.v.json + shards               sharded variant ({base}.v.safetensors.index.json too)
    the same with .bin                                     pickled torch.save files (read with weights_only=True)

safetensors is preferred unless `use_safetensors=False`; `use_safetensors=True` refuses .bin files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint_io import CheckpointError, read_state_dict_file

__all__ = ["weight_files", "read_weights"]


def _candidates(base: str, ext: str, variant: str | None) -> tuple:
    """(single-file names, index names) for one extension and variant."""
    if variant is None:
        return [f"{base}.{ext}"], [f"{base}.{ext}.index.json"]
    return [f"{base}.{variant}.{ext}"], [f"{base}.{ext}.index.{variant}.json", f"{base}.{variant}.{ext}.index.json"]


def _variants_present(folder: Path, base: str) -> list:
    rx = re.compile(rf"^{re.escape(base)}\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
    rx_index = re.compile(rf"^{re.escape(base)}\.(?:safetensors|bin)\.index\.([A-Za-z0-9_]+)\.json$")
    found = {m.group(1) for p in folder.iterdir() for m in [rx.match(p.name) or rx_index.match(p.name)] if m}
    return sorted(found - {"safetensors", "bin"})


def weight_files(folder, base: str = "diffusion_pytorch_model", *, variant: str | None = None,
                 use_safetensors: bool | None = None) -> list:
    """The weight files to read from `folder`, in order; a CheckpointError says what is there instead."""
    folder = Path(folder)
    exts = ["safetensors"] if use_safetensors else ["bin"] if use_safetensors is False else ["safetensors", "bin"]
    for ext in exts:
        singles, indices = _candidates(base, ext, variant)
        for name in singles:
            if (folder / name).is_file():
                return [folder / name]
        for name in indices:
            index = folder / name
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, AttributeError) as e:
                    raise CheckpointError(f"{str(index)!r} is not a shard index (JSON with a weight_map): {e}") from e
                missing = [s for s in shards if not (folder / s).is_file()]
                if missing:
                    raise CheckpointError(f"{str(index)!r} lists shards that are not in the folder: {missing}; the "
                                          "download is incomplete — download the folder again")
                return [folder / s for s in shards]
    present = _variants_present(folder, base) if folder.is_dir() else []
    wanted = f"variant {variant!r} of " if variant else ""
    kinds = " or ".join(f"*.{e}" for e in exts)
    hint = ""
    if present and variant not in present:
        hint = f"; the folder has the variant(s) {present}: pass variant={present[0]!r}"
    elif variant and not present:
        hint = "; it has no variants: drop variant="
    raise CheckpointError(f"{str(folder)!r} has no {wanted}{base} weights ({kinds}, one file or a sharded index)"
                          f"{hint}")


def read_weights(folder, base: str = "diffusion_pytorch_model", *, variant: str | None = None,
                 use_safetensors: bool | None = None) -> dict:
    """One flat state dict from every weight file of the folder (see `weight_files`)."""
    sd = {}
    for path in weight_files(folder, base, variant=variant, use_safetensors=use_safetensors):
        sd.update(read_state_dict_file(path))
    return sd
