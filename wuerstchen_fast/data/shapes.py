"""A deterministic synthetic text-to-image data set: one coloured geometric shape on a plain background.

    ds = ShapesDataset(size=256, length=10_000, seed=0)        # training combinations only
    image, caption = ds[0]     # (3, 256, 256) float in [0, 1], "a red circle at the top left on a blue background"
    heldout = ShapesDataset(size=256, length=64, seed=1, split="heldout")

Every sample is a pure function of (seed, index): nothing is stored, nothing is downloaded, and a
256x256 image renders in a few milliseconds (numpy masks over the shape's box, 2x supersampled edges).

Vocabulary (also what issue 8's checker scores): COLORS for the shape and the background (never the
same), SHAPES, POSITIONS. A fixed set of (shape colour, shape, background colour) triples is held
out of training (`HELDOUT_TRIPLES`, every position): the "heldout" split draws only those, so an
evaluation on it asks for combinations the model never saw together, each of whose words it did see.
The caption grammar is fixed: "a {colour} {shape} {position phrase} on a {background} background";
with `short_captions=p` a fraction p of the samples (drawn per index) leave the position phrase out
("a red circle on a blue background"), so prompts that do not say where are in the training distribution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["COLORS", "SHAPES", "POSITIONS", "TRAIN_TRIPLES", "HELDOUT_TRIPLES", "ShapeSpec", "ShapesDataset",
           "render_shape", "caption_of", "make_spec"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# name -> (centre x, centre y) as fractions of the image side, and the phrase in the caption
POSITIONS: dict[str, tuple[float, float, str]] = {
    "center": (0.5, 0.5, "in the center"),
    "top left": (0.28, 0.28, "at the top left"),
    "top right": (0.72, 0.28, "at the top right"),
    "bottom left": (0.28, 0.72, "at the bottom left"),
    "bottom right": (0.72, 0.72, "at the bottom right"),
}

_ALL_TRIPLES = [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def _is_heldout(c: str, s: str, b: str) -> bool:
    # A fixed arithmetic rule (no RNG: the split never changes): 11 of the 90 triples. Each colour,
    # shape and background still appears in many training triples.
    ic, is_, ib = list(COLORS).index(c), SHAPES.index(s), list(COLORS).index(b)
    return (ic * 7 + is_ * 3 + ib * 5) % 8 == 0


HELDOUT_TRIPLES = [t for t in _ALL_TRIPLES if _is_heldout(*t)]
TRAIN_TRIPLES = [t for t in _ALL_TRIPLES if not _is_heldout(*t)]


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    position: str
    background: str
    cx: float  # centre, fraction of the side
    cy: float
    radius: float  # half the shape's extent, fraction of the side

    def to_dict(self) -> dict:
        return asdict(self)


def caption_of(spec: ShapeSpec, with_position: bool = True) -> str:
    where = f" {POSITIONS[spec.position][2]}" if with_position else ""
    return f"a {spec.color} {spec.shape}{where} on a {spec.background} background"


def make_spec(color: str, shape: str, position: str, background: str, rng: np.random.Generator | None = None) -> ShapeSpec:
    """A spec at the nominal place and size, or jittered a little (±3% position, 0.14-0.2 radius) by `rng`."""
    cx, cy, _ = POSITIONS[position]
    radius = 0.17
    if rng is not None:
        cx += rng.uniform(-0.03, 0.03)
        cy += rng.uniform(-0.03, 0.03)
        radius = rng.uniform(0.14, 0.2)
    return ShapeSpec(color, shape, position, background, float(cx), float(cy), float(radius))


def render_shape(spec: ShapeSpec, size: int, supersample: int = 2) -> np.ndarray:
    """(size, size, 3) uint8 image of `spec`. Only the shape's bounding box is rasterized (supersampled)."""
    fg = np.asarray(COLORS[spec.color], np.float32)
    bg = np.asarray(COLORS[spec.background], np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    ext = spec.radius * 1.4  # covers every shape's extent (the triangle reaches 1.25 r)
    x0, x1 = max(0, int((spec.cx - ext) * size)), min(size, int(np.ceil((spec.cx + ext) * size)))
    y0, y1 = max(0, int((spec.cy - ext) * size)), min(size, int(np.ceil((spec.cy + ext) * size)))
    if x1 > x0 and y1 > y0:
        n = supersample
        x = ((np.arange(x0 * n, x1 * n, dtype=np.float32) + 0.5) / (size * n))[None, :]
        y = ((np.arange(y0 * n, y1 * n, dtype=np.float32) + 0.5) / (size * n))[:, None]
        dx, dy = x - spec.cx, y - spec.cy
        r = spec.radius
        if spec.shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif spec.shape == "square":
            side = r * 0.886  # same area as the circle
            mask = (np.abs(dx) <= side) & (np.abs(dy) <= side)
        elif spec.shape == "triangle":  # upright, apex at the top; larger so its area is close to the circle's
            rr = r * 1.25
            top, bottom = -rr, rr * 0.6
            half_width = (dy - top) / (bottom - top) * rr * 1.05
            mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
        else:
            raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
        mask = mask.astype(np.float32).reshape(y1 - y0, n, x1 - x0, n).mean(axis=(1, 3))
        img[y0:y1, x0:x1] += mask[..., None] * (fg - bg)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


class ShapesDataset:
    """Map-style: `ds[i] -> (image (3, size, size) float32 in [0, 1], caption)`; `ds.spec(i)` the ground truth.

    split: "train" draws from TRAIN_TRIPLES, "heldout" from HELDOUT_TRIPLES, "all" from both.
    Positions and the small jitter are drawn per index from numpy's PCG64 seeded with (seed, index);
    whether a caption is short (no position phrase, probability `short_captions`) from one seeded with
    (seed, index, 1), so the images do not depend on it.
    """

    def __init__(self, size: int = 256, length: int = 10_000, seed: int = 0, split: str = "train", jitter: bool = True,
                 short_captions: float = 0.0):
        triples = {"train": TRAIN_TRIPLES, "heldout": HELDOUT_TRIPLES, "all": _ALL_TRIPLES}
        if split not in triples:
            raise ValueError(f"ShapesDataset: split must be one of {sorted(triples)}, got {split!r}")
        if size < 8 or length < 1:
            raise ValueError(f"ShapesDataset: need size >= 8 and length >= 1, got size={size}, length={length}")
        if not 0.0 <= short_captions <= 1.0:
            raise ValueError(f"ShapesDataset: short_captions is a probability in [0, 1], got {short_captions}")
        self.size, self.length, self.seed, self.split, self.jitter = size, length, seed, split, jitter
        self.short_captions = float(short_captions)
        self.triples = triples[split]

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSpec:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        color, shape, background = self.triples[int(rng.integers(len(self.triples)))]
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        return make_spec(color, shape, position, background, rng if self.jitter else None)

    def _with_position(self, index: int) -> bool:
        return not self.short_captions or np.random.default_rng([self.seed, index, 1]).random() >= self.short_captions

    def caption(self, index: int) -> str:
        return caption_of(self.spec(index), self._with_position(index))

    def __getitem__(self, index: int):
        spec = self.spec(index)
        img = torch.from_numpy(render_shape(spec, self.size)).permute(2, 0, 1).float().div_(255)
        return img, caption_of(spec, self._with_position(index))
