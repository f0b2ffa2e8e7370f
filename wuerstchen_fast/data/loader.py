"""Resumable, rank-sharded batches from any source, with skip counters.

    loader = build_loader(data_cfg, global_batch=8, rank=0, world=1, seed=0)
    images, captions = loader.next_batch()           # this rank's slice of the global batch
    state = loader.state_dict(); loader.load_state_dict(state)   # exact data position

Map-style sources (synthetic shapes, image folders): every epoch is a permutation drawn from
(seed, epoch); global batch k is positions [k*B, (k+1)*B) of it and rank r takes its contiguous slice,
so the *global* batch is the same for any number of ranks (DDP with the same global batch sees the
same samples as one process). An unreadable image at global position p is replaced by the next
readable sample after p in the same permutation: the replacement depends on p only, not on the rank.
Streaming sources (webdataset): the position is the number of samples this rank has read; resuming
re-opens the shards and skips that many.

Counters (`loader.counters`): `unreadable_images` (skipped), `missing_captions` (trained with the empty
caption "", the unconditional prompt; or skipped with `missing_caption="skip"`).
"""
from __future__ import annotations

import torch

from .images import resize_center_crop
from .shapes import ShapesDataset
from .sources import ImageFolderDataset, WebDatasetSource

__all__ = ["ResumableLoader", "StreamLoader", "build_loader", "build_source"]


class _Counters(dict):
    def bump(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


class ResumableLoader:
    def __init__(self, dataset, global_batch: int, resolution: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, missing_caption: str = "empty"):
        if global_batch % world:
            raise ValueError(f"the global batch {global_batch} must be divisible by the number of ranks {world}")
        if missing_caption not in ("empty", "skip"):
            raise ValueError(f"missing_caption must be 'empty' or 'skip', got {missing_caption!r}")
        self.dataset, self.global_batch, self.resolution = dataset, global_batch, resolution
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.missing_caption = missing_caption
        self.local_batch = global_batch // world
        self.epoch, self.cursor = 0, 0  # cursor: position of the next global batch in this epoch's order
        self.counters = _Counters(unreadable_images=0, missing_captions=0)
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.dataset)
            perm = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
                    if self.shuffle else torch.arange(n))
            self._order = (self.epoch, perm)
        return self._order[1]

    def _load(self, order: torch.Tensor, pos: int):
        """Sample at `pos` of `order`, or the next readable one after it (wrapping)."""
        n = len(order)
        for k in range(n):
            idx = int(order[(pos + k) % n])
            img, caption = self.dataset[idx]
            if img is None:
                if k == 0:  # count each bad position once, where it was scheduled
                    self.counters.bump("unreadable_images")
                continue
            if caption is None:
                if k == 0:
                    self.counters.bump("missing_captions")
                if self.missing_caption == "skip":
                    continue
                caption = ""
            return resize_center_crop(img, self.resolution), caption
        raise RuntimeError(f"no readable image with a caption in the whole data set ({n} samples); "
                           f"counters: {dict(self.counters)}")

    def next_batch(self):
        order = self._epoch_order()
        if self.cursor + self.global_batch > len(order):  # drop the last partial global batch
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._epoch_order()
            if self.global_batch > len(order):
                raise ValueError(f"the data set has {len(order)} samples, fewer than the global batch {self.global_batch}")
        start = self.cursor + self.rank * self.local_batch
        items = [self._load(order, start + i) for i in range(self.local_batch)]
        self.cursor += self.global_batch
        return torch.stack([x for x, _ in items]), [c for _, c in items]

    def state_dict(self) -> dict:
        return {"kind": "map", "epoch": self.epoch, "cursor": self.cursor, "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.counters = _Counters(state.get("counters", {}))


class StreamLoader:
    """Batches from a streaming source (webdataset); bad samples are skipped and counted."""

    def __init__(self, source: WebDatasetSource, global_batch: int, resolution: int, world: int = 1,
                 missing_caption: str = "empty"):
        if global_batch % world:
            raise ValueError(f"the global batch {global_batch} must be divisible by the number of ranks {world}")
        self.source, self.resolution, self.missing_caption = source, resolution, missing_caption
        self.local_batch = global_batch // world
        self.epoch, self.consumed = 0, 0
        self.counters = _Counters(unreadable_images=0, missing_captions=0)
        self._it = None

    def _next_sample(self):
        for _ in range(2):
            if self._it is None:
                self._it = self.source.iterate(skip=self.consumed)
            for img, caption in self._it:
                self.consumed += 1
                if img is None:
                    self.counters.bump("unreadable_images")
                    continue
                if caption is None:
                    self.counters.bump("missing_captions")
                    if self.missing_caption == "skip":
                        continue
                    caption = ""
                return resize_center_crop(img, self.resolution), caption
            self._it, self.epoch, self.consumed = None, self.epoch + 1, 0  # end of the shards: next epoch
        raise RuntimeError(f"this rank's webdataset shards yield no readable sample; counters: {dict(self.counters)}")

    def next_batch(self):
        items = [self._next_sample() for _ in range(self.local_batch)]
        return torch.stack([x for x, _ in items]), [c for _, c in items]

    def state_dict(self) -> dict:
        return {"kind": "stream", "epoch": self.epoch, "consumed": self.consumed, "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self._it = int(state["epoch"]), int(state["consumed"]), None
        self.counters = _Counters(state.get("counters", {}))


def build_source(kind: str, *, path=None, resolution: int = 256, length: int = 10_000, seed: int = 0,
                 split: str = "train", rank: int = 0, world: int = 1, short_captions: float = 0.0):
    if kind == "shapes":
        return ShapesDataset(size=resolution, length=length, seed=seed, split=split, short_captions=short_captions)
    if kind == "folder":
        if not path:
            raise ValueError("data.kind='folder' needs data.path (a folder of images with same-named .txt captions)")
        return ImageFolderDataset(path)
    if kind == "webdataset":
        if not path:
            raise ValueError("data.kind='webdataset' needs data.path (shards: a list, a glob or a brace pattern)")
        return WebDatasetSource(path, rank=rank, world=world)
    raise ValueError(f"unknown data.kind {kind!r}; expected 'shapes', 'folder' or 'webdataset'")


def build_loader(kind: str, *, global_batch: int, resolution: int, rank: int = 0, world: int = 1, seed: int = 0,
                 path=None, length: int = 10_000, split: str = "train", shuffle: bool = True,
                 missing_caption: str = "empty", short_captions: float = 0.0):
    src = build_source(kind, path=path, resolution=resolution, length=length, seed=seed, split=split, rank=rank,
                       world=world, short_captions=short_captions)
    if isinstance(src, WebDatasetSource):
        return StreamLoader(src, global_batch, resolution, world=world, missing_caption=missing_caption)
    return ResumableLoader(src, global_batch, resolution, rank=rank, world=world, seed=seed, shuffle=shuffle,
                           missing_caption=missing_caption)
