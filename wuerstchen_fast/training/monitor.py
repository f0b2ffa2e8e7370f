"""What a run shows while it trains: the tqdm bar, the JSONL metrics log, and sample images."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..diffusion import ddpm_step, make_timesteps
from ..diffusion.sampler import cfg_combine

__all__ = ["Monitor", "ddpm_sample", "save_grid"]


class Monitor:
    def __init__(self, output_dir, *, total: int, initial: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, smoothing=0.1)
        self._t = time.perf_counter()

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "samples/s": f"{record['samples_per_s']:.1f}"}
            if record.get("unreadable_images") or record.get("missing_captions"):
                post["skipped"] = record.get("unreadable_images", 0)
                post["no_caption"] = record.get("missing_captions", 0)
            self.bar.set_postfix(post)

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def ddpm_sample(eps_fn, shape, steps: int, generator: torch.Generator, device, guidance: float = 0.0):
    """Plain DDPM chain of `steps` model calls from pure noise. `eps_fn(x, t, uncond: bool)`; classifier-free
    guidance `lerp(ε_uncond, ε_cond, w)` when `guidance > 1`."""
    ts = make_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator).to(device)
    for i in range(steps):
        t = ts[i].expand(shape[0])
        eps = eps_fn(x, t, False)
        if guidance > 1:
            eps = cfg_combine(torch.cat([eps, eps_fn(x, t, True)]), guidance)
        x = ddpm_step(x, eps, ts[i], ts[i + 1], torch.randn(shape, generator=generator).to(device))
    return x


def save_grid(rows: list, path) -> Path:
    """rows: lists of (3, H, W) images in [0, 1] (same size) -> one PNG, a row per list."""
    from PIL import Image

    cols = max(len(r) for r in rows)
    h, w = rows[0][0].shape[-2:]
    canvas = torch.ones(3, h * len(rows), w * cols)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            canvas[:, i * h:(i + 1) * h, j * w:(j + 1) * w] = img.float().clamp(0, 1).cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((canvas.permute(1, 2, 0) * 255 + 0.5).byte().numpy()).save(path)
    return path
