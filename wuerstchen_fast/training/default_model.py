"""`python -m wuerstchen_fast.training.default_model` — train the bundled default model (issue 8) and export it.

Trains a small Würstchen (256x256 output: Stage C latent 6x6, Stage B latent 64x64, Stage A f4) on the
synthetic shapes data with the project's own training entry point (`python -m wuerstchen_fast.cli train`),
deterministically from the seeds in `configs/shapes/stage_{a,b,c}.json`, then copies the result into
`wuerstchen_fast/weights/default/` (what `load_pipeline()` / `sample()` load with no arguments).

Order, chosen for a 2-core CPU:
  1. the semantic compressor: a `TinyCompressor` pretrained from seed 0 to name the attributes of shapes
     pictures (`pretrain_compressor`, ~2 min; the analogue of the released EfficientNet's ImageNet
     pretraining), whose BatchNorm statistics are then calibrated on 512 shapes images, with the
     BatchNorm's affine set to (42, -1) so that Stage C's latent
     (e + 1) / 42 (the pipeline's fixed convention) is zero-mean, unit-variance per channel. (The released
     encoder's e has unit scale, i.e. a prior latent of scale 1/42; at this model size and step count that
     signal is too small for the prior to place precisely.) It is frozen and shared by Stage B and Stage C
     (`runs/shapes/compressor`); freezing it is what lets Stage C train at the same time as Stages A and B.
     Stage B trains with `objective.effnet_space="prior"` (its mappers see the same unit-scale latent) and its
     export folds the 42 back into the mappers, so the decoder takes e as the pipeline passes it;
  2. Stage C (prior) in one process, while Stage A (VQGAN) and then Stage B (decoder) train in another;
     between them Stage A's `scale_factor` is set to the std of its latents on shapes images, so Stage B's
     x0 = encode(image) / scale_factor has unit variance (the pipeline decodes with the same factor).
     Stage B draws its batches from a cache of encoded samples (`data.cache_size`);
  3. the export: prior/, decoder/, vqgan/, text_encoder/, tokenizer/ and sampling.json.

The text encoder is the frozen random-init tiny CLIP (`text_encoder.preset=tiny, seed=0`): Stage B and
Stage C build the same one from the same seed and both save it; the bundle holds one copy.

    python -m wuerstchen_fast.training.default_model                  # train everything, then export
    python -m wuerstchen_fast.training.default_model --export-only    # re-export existing runs/shapes
    python -m wuerstchen_fast.training.default_model --steps-scale 0.01 --runs runs/smoke --out runs/smoke/bundle  # smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

__all__ = ["pretrain_compressor", "calibrate_compressor", "train_all", "export_bundle", "SAMPLING_DEFAULTS", "DEFAULT_WEIGHTS_DIR"]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "default"
CONFIGS = Path("configs/shapes")

# The sampling settings the default model was evaluated with (load_pipeline/sample apply them as defaults).
SAMPLING_DEFAULTS = {
    "height": 256,
    "width": 256,
    "prior_num_inference_steps": 20,
    "prior_guidance_scale": 4.0,
    "num_inference_steps": 12,
    "decoder_guidance_scale": 0.0,
}

def _attribute_vocab() -> dict:
    from ..data import COLORS, POSITIONS, SHAPES

    return {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "background": list(COLORS)}


def _attribute_batch(ds, indices, image_size: int):
    """Compressor inputs and the label of each attribute (shape colour, class, position, background)."""
    from .components import compressor_input

    vocab = _attribute_vocab()
    specs = [ds.spec(int(i)) for i in indices]
    x = compressor_input(torch.stack([ds[int(i)][0] for i in indices]), image_size)
    y = {k: torch.tensor([v.index(getattr(s, k)) for s in specs]) for k, v in vocab.items()}
    return x, y


def pretrain_compressor(*, seed: int = 0, steps: int = 600, batch: int = 64, pool: int = 3072, n_eval: int = 512,
                        lr: float = 2e-3, image_size: int = 192, c_latent: int = 16, log=print):
    """A TinyCompressor trained to name each shapes picture's attributes from its latent, then frozen.

    The released semantic compressor is an EfficientNetV2-S pretrained on ImageNet classification: its latent
    carries what a classifier needs. A random network does not: a linear probe on a random TinyCompressor's
    6x6x16 latent reads colours but not the shape class (26% held-out). So ours is pretrained the same way, on the training
    split of the shapes data: one linear head per attribute (shape colour, shape class, position, background)
    over the flattened latent, summed cross-entropy, AdamW. `pool` training pictures are rendered once; the
    held-out split's accuracy per attribute is returned with the model (the recipe records it).
    Deterministic from `seed`. Returns (model in eval mode, {"train": acc, "heldout": acc}).
    """
    import torch.nn.functional as F

    from ..data import ShapesDataset
    from .components import TinyCompressor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comp = TinyCompressor(c_latent)
        train_ds = ShapesDataset(size=256, length=pool, seed=2000 + seed, split="train")
        x_all, y_all = _attribute_batch(train_ds, range(pool), image_size)
        with torch.no_grad():
            n_lat = comp(x_all[:2]).numel() // 2
        vocab_sizes = {k: len(v) for k, v in _attribute_vocab().items()}
        heads = torch.nn.ModuleDict({k: torch.nn.Linear(n_lat, n) for k, n in vocab_sizes.items()})
        params = list(comp.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        comp.train()
        for step in range(steps):
            idx = torch.randint(pool, (batch,), generator=gen)
            z = comp(x_all[idx]).flatten(1)
            loss = sum(F.cross_entropy(h(z), y_all[k][idx]) for k, h in heads.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log and (step % 100 == 0 or step == steps - 1):
                log(f"compressor pretraining step {step}: loss {loss.item():.4f}")
        comp.eval()

        @torch.no_grad()
        def accuracy(x, y):
            z = torch.cat([comp(x[i:i + 256]).flatten(1) for i in range(0, len(x), 256)])
            return {k: round(100.0 * float((h(z).argmax(1) == y[k]).float().mean()), 2) for k, h in heads.items()}

        n = min(pool, n_eval)  # the training pictures are already rendered: score the first n of them
        heldout = ShapesDataset(size=256, length=n_eval, seed=3000 + seed, split="heldout")
        acc = {"train": accuracy(x_all[:n], {k: v[:n] for k, v in y_all.items()}),
               "heldout": accuracy(*_attribute_batch(heldout, range(n_eval), image_size))}
    return comp, acc


@torch.no_grad()
def calibrate_compressor(comp, out: Path, *, seed: int = 0, n_images: int = 512, batch: int = 32,
                         image_size: int = 192) -> Path:
    """Measure a TinyCompressor's BatchNorm statistics on shapes images and set its affine so that
    (e + 1) / 42 -- Stage C's latent -- is zero-mean, unit-variance per channel; saved to `out`."""
    from .objectives import LATENT_SCALE, LATENT_SHIFT

    from ..data import ShapesDataset
    from .components import compressor_input, save_compressor

    bn = comp.mapper[1]
    bn.reset_running_stats()
    bn.momentum = None  # cumulative average over all calibration batches
    comp.train()
    ds = ShapesDataset(size=256, length=n_images, seed=1000 + seed, split="train")
    for i in range(0, n_images, batch):
        imgs = torch.stack([ds[j][0] for j in range(i, min(i + batch, n_images))])
        comp(compressor_input(imgs, image_size))
    comp.eval()
    bn.momentum = 0.1
    # Fold the measured std into the 1x1 conv so that the normalization is exact whatever the features' scale
    # (a random backbone's variance, ~1e-6, is below BatchNorm's eps = 1e-5, which would otherwise dominate).
    std = bn.running_var.sqrt()
    comp.mapper[0].weight.div_(std.view(-1, 1, 1, 1))
    bn.running_mean.div_(std)
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(LATENT_SCALE)
    bn.bias.fill_(-LATENT_SHIFT)
    return save_compressor(comp, out)


@torch.no_grad()
def calibrate_stage_a_scale(folder: Path, *, n_images: int = 256, batch: int = 32, size: int = 256, seed: int = 3) -> float:
    """Set a trained Stage A's `scale_factor` to the std of its latents on shapes images (rewrites `folder`), so
    Stage B's x0 = encode(image) / scale_factor has unit variance. Returns the new factor."""
    from ..data import ShapesDataset
    from ..models import load_stage_a, save_stage

    model = load_stage_a(folder).float().eval()
    ds = ShapesDataset(size=size, length=n_images, seed=seed, split="train")
    lat = torch.cat([model.encode(torch.stack([ds[j][0] for j in range(i, min(i + batch, n_images))])).float()
                     for i in range(0, n_images, batch)])
    model.config.scale_factor = model.scale_factor = float(lat.std())
    save_stage(model, folder)
    return model.scale_factor


def _train_cmd(stage: str, config: Path, overrides: list) -> list:
    return [sys.executable, "-m", "wuerstchen_fast.cli", "train", stage, *overrides, "--config", str(config)]


def _overrides(stage: str, runs: Path, scale: float) -> list:
    cfg = json.loads((CONFIGS / f"{stage}.json").read_text())
    o = [f"output_dir={runs / stage}"]
    if scale != 1.0:
        steps = max(2, int(round(cfg["train"]["steps"] * scale)))
        o += [f"train.steps={steps}", f"optim.warmup_steps={max(1, min(cfg['optim']['warmup_steps'], steps // 2))}"]
        if cfg["data"].get("cache_size"):
            o.append(f"data.cache_size={max(cfg['train']['batch_size'], int(round(cfg['data']['cache_size'] * scale)))}")
    if stage != "stage_a":
        o.append(f"compressor.path={runs / 'compressor'}")
    if stage == "stage_b":
        o.append(f"stage_a.path={runs / 'stage_a' / 'model'}")
    return o


def train_all(runs: Path, *, scale: float = 1.0, parallel: bool = True, reuse_stage_a: bool = False) -> dict:
    """Compressor, then Stage C alongside Stage A -> Stage B. Returns the wall time of each part (s).

    reuse_stage_a: keep a Stage A already trained in `runs` (it does not depend on the compressor; the run
    is deterministic, so retraining it would give the same weights)."""
    runs.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    comp, acc = pretrain_compressor(steps=max(2, round(600 * scale)), pool=max(64, round(3072 * scale)),
                                    n_eval=max(32, min(512, round(3072 * scale))), log=lambda m: print(m, flush=True))
    calibrate_compressor(comp, runs / "compressor")
    (runs / "compressor" / "pretraining.json").write_text(json.dumps({"attribute_accuracy": acc}, indent=2) + "\n")
    print(f"compressor attribute accuracy: {acc}", flush=True)
    times["compressor"] = time.perf_counter() - t0

    def launch(stage):
        log = open(runs / f"{stage}.log", "w")
        cmd = _train_cmd(stage.replace("_", "-"), CONFIGS / f"{stage}.json", _overrides(stage, runs, scale))
        print("+", " ".join(cmd), flush=True)
        proc, t, end = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), []
        # The exit time, taken when it happens: Stage C ends long before it is waited for.
        watcher = threading.Thread(target=lambda: (proc.wait(), end.append(time.perf_counter())), daemon=True)
        watcher.start()
        return proc, t, watcher, end

    def wait(stage, launched):
        proc, t, watcher, end = launched
        watcher.join()
        rc = proc.returncode
        times[stage] = end[0] - t
        if rc != 0:
            raise RuntimeError(f"{stage} training failed (exit {rc}); see {runs / (stage + '.log')}")
        print(f"{stage} done in {times[stage] / 60:.1f} min", flush=True)

    c = launch("stage_c") if parallel else None
    if reuse_stage_a and (runs / "stage_a" / "model").is_dir():
        print(f"stage_a: reusing {runs / 'stage_a' / 'model'}", flush=True)
    else:
        wait("stage_a", launch("stage_a"))
        print(f"stage_a scale_factor -> {calibrate_stage_a_scale(runs / 'stage_a' / 'model'):.4f}", flush=True)
    wait("stage_b", launch("stage_b"))
    wait("stage_c", c if parallel else launch("stage_c"))
    times["total"] = time.perf_counter() - t0
    (runs / "times.json").write_text(json.dumps(times, indent=2))
    return times


def export_bundle(runs: Path, out: Path = DEFAULT_WEIGHTS_DIR) -> Path:
    """Copy the trained stages, the text encoder and the tokenizer into `out`, plus sampling.json."""
    out.mkdir(parents=True, exist_ok=True)
    parts = {"prior": runs / "stage_c" / "model", "decoder": runs / "stage_b" / "model",
             "vqgan": runs / "stage_a" / "model", "text_encoder": runs / "stage_c" / "text_encoder",
             "tokenizer": runs / "stage_c" / "tokenizer"}
    for name, src in parts.items():
        if not src.is_dir():
            raise FileNotFoundError(f"{src} is missing: train first")
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(src, out / name)
    (out / "sampling.json").write_text(json.dumps(SAMPLING_DEFAULTS, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--runs", default="runs/shapes", help="training output folder (default runs/shapes)")
    p.add_argument("--out", default=None, help="bundle folder (default: the package's weights/default)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count (smoke tests)")
    p.add_argument("--serial", action="store_true", help="train the stages one after another")
    p.add_argument("--reuse-stage-a", action="store_true", help="keep an already trained runs/.../stage_a")
    p.add_argument("--export-only", action="store_true", help="skip training; export existing runs")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if not args.export_only:
        times = train_all(runs, scale=args.steps_scale, parallel=not args.serial, reuse_stage_a=args.reuse_stage_a)
        print("times (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))
    out = export_bundle(runs, Path(args.out) if args.out else DEFAULT_WEIGHTS_DIR)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
