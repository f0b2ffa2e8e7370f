"""What the pipelines return: dataclasses that also behave like diffusers' outputs.

diffusers' `BaseOutput` is an ordered dict of its non-None fields: `out.images`, `out["images"]`,
`out[0]` and `out.to_tuple()` all work. These classes give the same access on a plain dataclass, so
code written against diffusers' `ImagePipelineOutput` / `WuerstchenPriorPipelineOutput` runs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

__all__ = ["PipelineOutput", "ImagePipelineOutput", "WuerstchenPriorPipelineOutput"]


class _OutputAccess:
    """Index by position (over the fields that are not None, in order) or by field name."""

    def to_tuple(self) -> tuple:
        return tuple(v for _, v in self.items())

    def keys(self) -> list[str]:
        return [k for k, _ in self.items()]

    def values(self) -> list[Any]:
        return [v for _, v in self.items()]

    def items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def get(self, key: str, default=None):
        return dict(self.items()).get(key, default)

    def __getitem__(self, key):
        if isinstance(key, str):
            present = dict(self.items())
            if key not in present:
                raise KeyError(f"{type(self).__name__} has no field {key!r} set; fields: {self.keys()}")
            return present[key]
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:  # like a dict: the field names
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.items())

    def __contains__(self, key) -> bool:
        return key in self.keys()


@dataclass(eq=False)
class PipelineOutput(_OutputAccess):
    """Images: a list of PIL images, a (B, H, W, 3) numpy array, a (B, 3, H, W) tensor, or Stage B latents."""

    images: Any


ImagePipelineOutput = PipelineOutput  # diffusers' name for the same output


@dataclass(eq=False)
class WuerstchenPriorPipelineOutput(_OutputAccess):
    """The prior's image embeddings, (B, C, h, w), as a tensor (`output_type="pt"`) or numpy array ("np")."""

    image_embeddings: Any
