"""`python -m wuerstchen_fast.training.evaluate_default` — score the default model on held-out prompts (issue 8).

The prompts: every held-out (shape colour, shape, background) triple of the shapes data
(`HELDOUT_TRIPLES`, combinations never seen together in training) at every position, in the training
caption grammar. Each sampled image is scored by `check_image`, an analytic checker:

  * background colour: the per-channel median of the border pixels (a 4-pixel frame), mapped to the
    nearest palette colour;
  * shape mask: the pixels farther than `MASK_DISTANCE` (RGB) from that median border colour, reduced to
    the largest connected component;
  * shape colour: the per-channel median inside the mask, mapped to the nearest palette colour;
  * shape class: the mask's fill ratio of its bounding box (circle π/4 ≈ 0.79, square ≈ 1, triangle ≈
    0.5), with the triangle also told by its width profile (narrow top, wide bottom);
  * position: the mask centroid's nearest nominal position.

A missing mask (fewer than `MIN_PIXELS` pixels) scores the shape colour, class and position as wrong.
`tests/test_default_model.py` checks that the checker scores ~100% on ground-truth ShapesDataset images.

    python -m wuerstchen_fast.training.evaluate_default                   # the bundled default model
    python -m wuerstchen_fast.training.evaluate_default --out-dir DIR --seeds 0 1 2 3
    python -m wuerstchen_fast.training.evaluate_default --weights runs/shapes/bundle   # any bundle folder
Writes eval.json, EVAL.md and samples_grid.png (into the evaluated bundle's folder by default).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..data.shapes import COLORS, HELDOUT_TRIPLES, POSITIONS, caption_of, make_spec

__all__ = ["check_image", "heldout_prompts", "evaluate", "score", "MASK_DISTANCE", "ATTRIBUTES"]

MASK_DISTANCE = 80.0
MIN_PIXELS = 60
ATTRIBUTES = ("background", "color", "shape", "position")
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], np.float32)


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb[None]) ** 2).sum(-1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (ties: the first found in row-major order).

    Pure numpy + a breadth-first search over the mask's own pixels (a few thousand for one shape), so the
    checker reads the same with or without scipy: a stray speck far from the shape must not widen its box."""
    from collections import deque

    H, W = mask.shape
    flat = mask.ravel()
    seen = np.zeros(flat.shape, bool)
    best: list = []
    for start in np.flatnonzero(flat):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [start], deque([start])
        while queue:
            i = queue.popleft()
            y, x = divmod(int(i), W)
            for j, ok in ((i - W, y > 0), (i + W, y < H - 1), (i - 1, x > 0), (i + 1, x < W - 1)):
                if ok and flat[j] and not seen[j]:
                    seen[j] = True
                    comp.append(j)
                    queue.append(j)
        if len(comp) > len(best):
            best = comp
    out = np.zeros(flat.shape, bool)
    out[np.asarray(best, np.int64)] = True
    return out.reshape(H, W)


def _shape_class(mask: np.ndarray) -> tuple[str, dict]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    fill = float(box.mean())
    h = box.shape[0]
    rows = box.sum(axis=1).astype(np.float32)
    third = max(1, h // 3)
    taper = float(rows[:third].mean() / max(rows[-third:].mean(), 1e-6))  # ~0.3 triangle, ~1 circle/square
    if fill < 0.64 or (taper < 0.55 and fill < 0.72):
        cls = "triangle"
    elif fill < 0.89:
        cls = "circle"
    else:
        cls = "square"
    return cls, {"fill": round(fill, 3), "taper": round(taper, 3)}


def check_image(image) -> dict:
    """Analytic read-out of one image (PIL, HxWx3 uint8, or 3xHxW float in [0, 1]) -> background, color,
    shape, position (None where no shape is found) and the raw measurements."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # CHW float tensor / array
        a = np.clip(np.asarray(a, np.float32).transpose(1, 2, 0) * 255.0, 0, 255)
    a = a[..., :3].astype(np.float32)
    H, W, _ = a.shape
    b = max(2, H // 64)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    out = {"background": _nearest_colour(bg_rgb), "color": None, "shape": None, "position": None}
    mask = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > MASK_DISTANCE
    mask = _largest_component(mask)
    n = int(mask.sum())
    out["mask_pixels"] = n
    if n < MIN_PIXELS * (H * W) / (256 * 256):
        return out
    out["color"] = _nearest_colour(np.median(a[mask], axis=0))
    out["shape"], meas = _shape_class(mask)
    out.update(meas)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / W, ys.mean() / H
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return out


def heldout_prompts() -> list[dict]:
    """The fixed evaluation set: every held-out triple at every position (11 x 5 = 55 prompts)."""
    items = []
    for color, shape, background in HELDOUT_TRIPLES:
        for position in POSITIONS:
            spec = make_spec(color, shape, position, background)
            items.append({"prompt": caption_of(spec), "background": background, "color": color, "shape": shape,
                          "position": position})
    return items


def score(items: list[dict], found: list[dict]) -> dict:
    """Accuracy (%) of each attribute and of all four together."""
    acc = {}
    for k in ATTRIBUTES:
        acc[k] = 100.0 * float(np.mean([f[k] == it[k] for it, f in zip(items, found)]))
    acc["all"] = 100.0 * float(np.mean([all(f[k] == it[k] for k in ATTRIBUTES) for it, f in zip(items, found)]))
    return acc


TARGETS = {"background": 90.0, "color": 85.0, "shape": 70.0}


def _grid(images: list, cols: int, cell: int = 64):
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    g = Image.new("RGB", (cols * cell, rows * cell), (128, 128, 128))
    for i, im in enumerate(images):
        g.paste(im.resize((cell, cell)), ((i % cols) * cell, (i // cols) * cell))
    return g


def _true_latents(compressor, chunk: list, size: int = 256, image_size: int = 192):
    """Stage C's target for each prompt's ground-truth picture: (compressor(image) + 1) / 42."""
    import torch

    from ..data.shapes import render_shape
    from .components import compressor_input

    imgs = torch.stack([torch.from_numpy(render_shape(make_spec(it["color"], it["shape"], it["position"],
                                                                it["background"]), size)) for it in chunk])
    with torch.no_grad():
        return (compressor(compressor_input(imgs.permute(0, 3, 1, 2).float() / 255, image_size)).float() + 1) / 42


def evaluate(pipe=None, *, seeds=(0,), batch: int = 11, sampling: dict | None = None, progress: bool = False,
             compressor=None):
    """Sample every held-out prompt once per seed and score it. -> (report dict, PIL images).

    With `compressor` (the semantic compressor the stages were trained with), Stage C's output is replaced
    by the true latent of each prompt's ground-truth picture: the score of Stages B and A alone."""
    import torch

    if pipe is None:
        from ..pipeline import load_pipeline

        pipe = load_pipeline(device="cpu")
    items = heldout_prompts()
    kw = dict(sampling or {})
    images, found, rows = [], [], []
    t0 = time.perf_counter()
    for seed in seeds:
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            if compressor is not None:
                true = _true_latents(compressor.eval(), chunk)
                # Replaced after every prior step, so after the last one whatever the step count.
                kw["prior_callback_on_step_end"] = lambda p, j, t, d, true=true: {"latents": true.to(d["latents"])}
            ims = pipe([it["prompt"] for it in chunk], generator=gen, progress=progress, **kw).images
            for it, im in zip(chunk, ims):
                f = check_image(im)
                images.append(im)
                found.append(f)
                rows.append({**it, "seed": seed, "found": {k: f[k] for k in ATTRIBUTES},
                             **{k: f[k] for k in ("fill", "taper", "mask_pixels") if k in f}})
    all_items = [it for _ in seeds for it in items]
    acc = score(all_items, found)
    report = {"n_images": len(found), "n_prompts": len(items), "seeds": list(seeds),
              "accuracy_percent": {k: round(v, 1) for k, v in acc.items()},
              "targets_percent": TARGETS,
              "targets_met": {k: acc[k] >= v for k, v in TARGETS.items()},
              "sampling": {k: v for k, v in (kw or getattr(pipe, "call_defaults", {})).items() if not callable(v)},
              "stage_c": "replaced by the true latents" if compressor is not None else "sampled",
              "seconds": round(time.perf_counter() - t0, 1), "images": rows}
    return report, images


def to_markdown(report: dict) -> str:
    a, t = report["accuracy_percent"], report["targets_percent"]
    lines = ["| attribute | held-out accuracy | target |", "|---|---|---|"]
    names = {"background": "background colour", "color": "shape colour", "shape": "shape class",
             "position": "position", "all": "all four correct"}
    for k in ("background", "color", "shape", "position", "all"):
        tgt = f"≥ {t[k]:.0f}% ({'met' if a[k] >= t[k] else 'NOT met'})" if k in t else "-"
        lines.append(f"| {names[k]} | {a[k]:.1f}% | {tgt} |")
    lines.append("")
    lines.append(f"{report['n_images']} images: {report['n_prompts']} held-out prompts (11 held-out colour/shape/"
                 f"background triples x 5 positions) x seeds {report['seeds']}; sampling {report['sampling']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--out-dir", default=None, help="where to write eval.json, EVAL.md, samples_grid.png "
                                                   "(default: the bundled weights folder)")
    p.add_argument("--weights", default=None, help="a bundle folder to evaluate (default: the bundled default model)")
    p.add_argument("--true-latents", metavar="COMPRESSOR", default=None,
                   help="score Stages B and A alone: replace Stage C's output by the true latents of the ground-truth "
                        "pictures from this compressor folder (e.g. runs/shapes/compressor); needs --out-dir")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one image per prompt and seed (default 0 1 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--prior-guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--decoder-guidance", type=float, default=None)
    args = p.parse_args(argv)
    import torch

    from ..pipeline import load_pipeline
    from ..pipeline.loading import DEFAULT_WEIGHTS

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(weights=args.weights, device="cpu")
    sampling = dict(getattr(pipe, "call_defaults", {}))
    for k, v in (("prior_num_inference_steps", args.prior_steps), ("prior_guidance_scale", args.prior_guidance),
                 ("num_inference_steps", args.steps), ("decoder_guidance_scale", args.decoder_guidance)):
        if v is not None:
            sampling[k] = v
    comp = None
    if args.true_latents:
        if not args.out_dir:
            p.error("--true-latents scores a different thing: give --out-dir so the bundle's own table stays")
        from .components import load_compressor

        comp = load_compressor(args.true_latents)
    report, images = evaluate(pipe, seeds=args.seeds, sampling=sampling, compressor=comp)
    out = Path(args.out_dir) if args.out_dir else Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    md = to_markdown(report)
    (out / "EVAL.md").write_text("# Held-out evaluation of the default model\n\n"
                                 f"`python -m wuerstchen_fast.training.evaluate_default "
                                 f"--seeds {' '.join(map(str, args.seeds))}`\n\n" + md)
    _grid(images[:55], cols=11).quantize(colors=32).save(out / "samples_grid.png", optimize=True)  # < 300 KB
    print(md)
    print(f"wrote {out / 'eval.json'}, {out / 'EVAL.md'}, {out / 'samples_grid.png'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
