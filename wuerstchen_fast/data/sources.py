"""Data sources: a folder of images with same-named .txt captions, and webdataset tar shards.

Both yield `(image (3, H, W) in [0, 1] or None, caption or None)`; None marks an unreadable image or a
missing caption, which `loader.ResumableLoader` skips / replaces and counts.

Folder: `root/**/name.{png,jpg,...}` with `root/**/name.txt` (UTF-8). Sorted paths, so the order is the
same on every machine.
Webdataset: shards `.tar` (a list, a glob, or a brace pattern "data-{000..099}.tar") read with the
`webdataset` library; a sample is the image (jpg/jpeg/png/webp) and its `txt`.
"""
from __future__ import annotations

import glob
from pathlib import Path

from .images import IMAGE_EXTENSIONS, decode_image, to_tensor

__all__ = ["ImageFolderDataset", "WebDatasetSource", "expand_shards"]


class ImageFolderDataset:
    """Map-style: `ds[i] -> (image or None, caption or None)`."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise FileNotFoundError(f"image folder {str(self.root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        img = decode_image(path)
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        return (to_tensor(img) if img is not None else None), caption

    def describe(self, index: int) -> str:
        return str(self.paths[index])


def expand_shards(spec) -> list[str]:
    """A list of paths, a glob ("shards/*.tar"), or a brace pattern ("shards/{000..009}.tar") -> paths."""
    if isinstance(spec, (list, tuple)):
        out = []
        for s in spec:
            out += expand_shards(s)
        return out
    spec = str(spec)
    if "{" in spec:
        import braceexpand

        return [p for s in braceexpand.braceexpand(spec) for p in expand_shards(s)]
    if any(ch in spec for ch in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no webdataset shards match {spec!r}")
        return found
    return [spec]


class WebDatasetSource:
    """Iterates `(image or None, caption or None)` over this rank's part of the shards, `skip` samples in.

    Shards are split between ranks by shard when there are at least as many shards as ranks, else by
    sample (every world-th sample). The stream order is the shard order: epochs repeat it.
    """

    IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, shards, rank: int = 0, world: int = 1):
        self.urls = expand_shards(shards)
        if not self.urls:
            raise FileNotFoundError(f"no webdataset shards in {shards!r}")
        self.rank, self.world = rank, world
        self.errors = 0  # tar-level read errors (broken archive members)

    def _handler(self, exn) -> bool:
        self.errors += 1
        return True  # keep going

    def iterate(self, skip: int = 0):
        import webdataset as wds

        by_shard = len(self.urls) >= self.world
        urls = self.urls[self.rank::self.world] if by_shard else self.urls
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                            handler=self._handler, empty_check=False)
        n = 0
        for i, sample in enumerate(ds):
            if not by_shard and i % self.world != self.rank:
                continue
            n += 1
            if n <= skip:
                continue
            key = next((k for k in self.IMAGE_KEYS if k in sample), None)
            img = decode_image(sample[key]) if key is not None else None
            txt = sample.get("txt")
            caption = txt.decode("utf-8", errors="replace").strip() if isinstance(txt, (bytes, bytearray)) else txt
            yield (to_tensor(img) if img is not None else None), caption
