"""The training loop shared by the three stages: `train(config)`.

    from wuerstchen_fast.training import load_config, train
    result = train(load_config("configs/shapes/stage_c.json", ["train.steps=100"]))
    result.losses          # global mean loss per step
    result.model_dir       # <output_dir>/model: EMA weights, loads with load_stage_c / the pipeline

One step: this rank's slice of the global batch -> frozen parts (text encoder, compressor / Stage A)
without grad -> the objective (bf16 autocast) -> backward -> clip -> AdamW -> warm-up schedule -> EMA.
Randomness (t, noise, dropout) is drawn for the whole global batch from one generator seeded by
`seed` on every rank, each rank keeping its slice: one process and N ranks see identical numbers.
Model dropout (off in the tiny configs) uses torch's global RNG, seeded per rank.
Preemption: SIGTERM / SIGINT finish the current step, write a checkpoint and return.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import backend
from ..data import build_loader
from ..models import StageA, StageB, StageC, load_stage_a, load_stage_b, save_stage
from . import components as C
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .distributed import all_mean, cleanup, init_distributed, unwrap, wrap_model
from .ema import EMA
from .monitor import Monitor, ddpm_sample, save_grid
from .objectives import (LATENT_SCALE, LATENT_SHIFT, StageAObjective, StageBObjective, StageCObjective, effnet_input,
                         fold_effnet_space)

__all__ = ["train", "TrainResult"]

_STAGE_CLS = {"stage_a": StageA, "stage_b": StageB, "stage_c": StageC}


@dataclass
class TrainResult:
    step: int
    losses: list = field(default_factory=list)  # global mean loss of every step run in this call
    mses: list = field(default_factory=list)  # unweighted ε (or reconstruction) MSE per step
    output_dir: str = ""
    model_dir: str | None = None  # <output_dir>/model (None when the run stopped early)
    checkpoint: str | None = None
    counters: dict = field(default_factory=dict)
    stopped_early: bool = False


class _Run:
    """Everything a step and a checkpoint need, in one place."""

    def __init__(self, cfg: TrainConfig, info):
        self.config, self.info = cfg, info
        self.output_dir = Path(cfg.output_dir)
        self.stage = cfg.stage
        dev = info.device
        t, o = cfg.train, cfg.objective
        save_to = self.output_dir if info.main else None
        # frozen text side (Stage A needs none)
        self.tokenizer = self.text_encoder = None
        self._text_cache: dict = {}
        if self.stage != "stage_a":
            self.tokenizer, self.text_encoder = C.build_text(cfg.text_encoder, save_to)
            self.text_encoder.to(dev)
        text_width = self.text_encoder.config.width if self.text_encoder is not None else None
        self.compressor = None
        if self.stage != "stage_a":
            self.compressor = C.build_compressor(cfg.compressor).float().to(dev)
        c_latent = cfg.compressor.c_latent
        self.model = C.build_stage(self.stage, cfg.model, text_width=text_width, c_latent=c_latent, seed=cfg.seed).to(dev)
        self.stage_a = None
        if self.stage == "stage_b":
            if not cfg.stage_a.path:
                raise ValueError("Stage B trains in Stage A's latent space: set stage_a.path to a trained Stage A "
                                 "(e.g. the <output_dir>/model of a stage-a run)")
            self.stage_a = C.frozen(load_stage_a(cfg.stage_a.path).float()).to(dev)
        if self.stage == "stage_c":
            self.objective = StageCObjective(self.model, p2=o.p2_weight)
            C.frozen(self.compressor)
        elif self.stage == "stage_b":
            self.objective = StageBObjective(self.model, self.compressor, p2=o.p2_weight, effnet_space=o.effnet_space,
                                             embedded=cfg.data.cache_size > 0)
            if not o.train_compressor:
                C.frozen(self.compressor)
        else:
            disc = C.PatchDiscriminator().to(dev) if o.disc_weight > 0 else None
            self.objective = StageAObjective(self.model, disc, vq_weight=o.vq_weight, l1_weight=o.l1_weight,
                                             disc_weight=o.disc_weight)
        if t.grad_checkpointing:
            C.enable_grad_checkpointing(self.model)
        self.wrapped = wrap_model(self.objective, info, t.distributed, C.checkpoint_blocks(self.model))
        self.step_fn = torch.compile(self.wrapped) if t.compile else self.wrapped
        params = [p for p in self.objective.parameters() if p.requires_grad]
        op = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=op.lr, betas=tuple(op.betas), eps=op.eps,
                                           weight_decay=op.weight_decay)
        warm = max(op.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = EMA(self.objective, op.ema_decay, op.ema_start, op.ema_every) if op.ema_decay > 0 else None
        d = cfg.data
        self.loader = self._make_loader(info.rank, info.world)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.cache = self._build_cache(d.cache_size) if d.cache_size else None

    def _make_loader(self, rank: int, world: int):
        d = self.config.data
        return build_loader(d.kind, global_batch=self.config.train.batch_size, resolution=d.resolution, rank=rank,
                            world=world, seed=d.seed, path=d.path, length=d.length,
                            missing_caption=d.missing_caption, short_captions=d.short_captions)

    @torch.no_grad()
    def _build_cache(self, n: int) -> dict:
        """The first `n` samples of the data (one rank's view of the whole global batch stream, so every rank
        holds the same cache), encoded once: Stage A latents x0, the compressor's output e, the captions."""
        cfg = self.config
        loader = self._make_loader(rank=0, world=1)
        x0s, embs, caps = [], [], []
        t0 = time.perf_counter()
        while len(caps) < n:
            images, captions = loader.next_batch()
            images = images.to(self.info.device)
            with self._autocast():
                x0s.append(self.stage_a.encode(images).float().cpu() / self.stage_a.config.scale_factor)
                embs.append(self.compressor(C.compressor_input(images, cfg.compressor.image_size)).float().cpu())
            caps += list(captions)
        cache = {"x0": torch.cat(x0s)[:n], "emb": torch.cat(embs)[:n], "captions": caps[:n]}
        if self.info.main:
            print(f"data.cache_size={n}: encoded in {time.perf_counter() - t0:.0f} s; x0 std "
                  f"{cache['x0'].std():.3f}, e std {cache['emb'].std():.3f}", flush=True)
        return cache

    def next_batch(self):
        """-> (images, captions) from the loader, or ((x0, e), captions) drawn from the cache."""
        if self.cache is None:
            return self.loader.next_batch()
        idx = self._slice(torch.randint(len(self.cache["captions"]), (self.config.train.batch_size,),
                                        generator=self.generator))
        return (self.cache["x0"][idx], self.cache["emb"][idx]), [self.cache["captions"][i] for i in idx.tolist()]

    # ------------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def encode_text(self, captions: list) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if len(self._text_cache) + len(missing) > 4096:
            self._text_cache.clear()
            missing = list(dict.fromkeys(captions))
        for c in missing:
            # One caption per call: a GEMM's rounding depends on the batch it is in, and a cached embedding is
            # reused by later steps, so batching here would make a resumed run differ from a straight one.
            enc = self.tokenizer([c], padding="max_length", max_length=self.config.text_encoder.context_length,
                                 truncation=True, return_tensors="pt")
            out = self.text_encoder(enc["input_ids"].to(self.info.device), enc["attention_mask"].to(self.info.device))
            self._text_cache[c] = out[0].float()
        return torch.stack([self._text_cache[c] for c in captions])

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0] // self.info.world
        return t[self.info.rank * b:(self.info.rank + 1) * b].to(self.info.device)

    def _rand(self, *shape) -> torch.Tensor:
        return self._slice(torch.rand(shape, generator=self.generator))

    def _randn(self, *shape) -> torch.Tensor:
        return self._slice(torch.randn(shape, generator=self.generator))

    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16,
                              enabled=self.config.train.mixed_precision == "bf16")

    def loss(self, images: torch.Tensor, captions: list, step: int):
        """-> (loss, mse) of this rank's slice."""
        B, o = self.config.train.batch_size, self.config.objective
        if self.cache is not None:  # Stage B from the cache: (x0, e) instead of images
            (x0, emb), images = (t.to(self.info.device) for t in images), None
        else:
            images = images.to(self.info.device)
        if self.stage == "stage_a":
            with self._autocast():
                return self.step_fn(images, step >= o.disc_start)
        drop = self._rand(B) < o.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t = self._rand(B)
        text = self.encode_text(captions)
        comp_in = C.compressor_input(images, self.config.compressor.image_size) if images is not None else emb
        with self._autocast():
            if self.stage == "stage_c":
                with torch.no_grad():
                    x0 = ((self.compressor(comp_in).float() + LATENT_SHIFT) / LATENT_SCALE)
                noise = self._randn(B, *x0.shape[1:])
                return self.step_fn(x0, text, t, noise)
            if images is not None:
                with torch.no_grad():
                    x0 = self.stage_a.encode(images).float() / self.stage_a.config.scale_factor
            e_on, e_t, e_drop = self._rand(B) < o.effnet_noise_prob, self._rand(B) * o.effnet_noise_max, self._rand(B) < o.effnet_drop
            noise = self._randn(B, *x0.shape[1:])
            s = self.config.compressor.image_size // 32
            e_noise = self._randn(B, self.config.compressor.c_latent, s, s)
            return self.step_fn(x0, comp_in, text, t, noise, e_t, e_noise, e_on, e_drop)

    def export_stage(self, sd: dict) -> nn.Module:
        """The stage module holding the `model.`-prefixed entries of a trainable state dict."""
        live = self.model.state_dict()
        sub = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        sub = {k: sub.get(k, v.detach().cpu()) for k, v in live.items()}  # buffers not in sd: live values
        with torch.device("meta"):
            m = _STAGE_CLS[self.stage](self.model.config)
        m.load_state_dict(sub, assign=True)
        if self.stage == "stage_b" and self.config.objective.effnet_space == "prior":
            fold_effnet_space(m)
        return m

    def export_compressor(self, sd: dict, folder: Path) -> None:
        live = self.compressor.state_dict()
        sub = {k[len("compressor."):]: v for k, v in sd.items() if k.startswith("compressor.")}
        comp = C.build_compressor(type(self.config.compressor)(**{**self.config.compressor.__dict__, "path": None}))
        comp.load_state_dict({k: sub.get(k, v.detach().cpu()).cpu() for k, v in live.items()})
        C.save_compressor(comp, folder)

    # --------------------------------------------------------------------------------- samples
    @torch.no_grad()
    def write_samples(self, images: torch.Tensor, captions: list, step: int) -> Path | None:
        cfg = self.config
        was = self.model.training
        self.model.eval()
        gen = torch.Generator().manual_seed(1234)
        dev = self.info.device
        n = min(4, images.shape[0])
        images = images[:n].to(dev)
        try:
            with self._autocast():
                if self.stage == "stage_a":
                    rows = [list(images), list(self.model.decode(self.model.encode(images), quantize=True).float())]
                elif self.stage == "stage_b":
                    emb = self.compressor(C.compressor_input(images, cfg.compressor.image_size)).float()
                    emb = effnet_input(emb, cfg.objective.effnet_space)
                    text = self.encode_text(list(captions[:n]))
                    shape = self.stage_a.encode(images).shape
                    lat = ddpm_sample(lambda x, t, u: self.model(x, t, emb, text).float(), shape, cfg.log.sample_steps,
                                      gen, dev)
                    rows = [list(images), list(self.stage_a.decode(lat * self.stage_a.config.scale_factor).float())]
                else:
                    prompts = list(cfg.log.sample_prompts)
                    text, empty = self.encode_text(prompts), self.encode_text([""] * len(prompts))
                    s = cfg.compressor.image_size // 32
                    lat = ddpm_sample(lambda x, t, u: self.model(x, t, empty if u else text).float(),
                                      (len(prompts), self.model.config.c_in, s, s), cfg.log.sample_steps, gen, dev,
                                      guidance=4.0)
                    lat = lat * LATENT_SCALE - LATENT_SHIFT  # what Stage B receives
                    real = self.compressor(C.compressor_input(images, cfg.compressor.image_size)).float()
                    up = lambda z: torch.nn.functional.interpolate(  # noqa: E731 - first 3 channels, as pictures
                        (z[:, :3] - z[:, :3].amin()) / (z[:, :3].amax() - z[:, :3].amin() + 1e-6), size=64, mode="nearest")
                    rows = [list(up(lat)), list(up(real))]
        finally:
            self.model.train(was)
        if self.info.main:
            return save_grid(rows, self.output_dir / "samples" / f"step_{step:08d}.png")
        return None


def _install_stop_handler(flag: dict):
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}

    def handler(signum, frame):
        flag["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return old


def train(config: TrainConfig | dict | str | Path, *, resume: bool | str | Path = False, stop_after: int | None = None,
          overrides: list | None = None) -> TrainResult:
    """Train one stage. `resume=True` continues from the newest checkpoint in output_dir (a path: from that
    checkpoint); `stop_after=N` stops after step N with a checkpoint, as a kill would (for tests/preemption)."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    cfg = config
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    backend_ctx = backend(cfg.train.backend)  # the fused-op backend of the whole run; restored on return
    backend_ctx.__enter__()
    torch.manual_seed(cfg.seed * 7919 + info.rank)  # model dropout: per rank
    out = Path(cfg.output_dir)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    flag = {"stop": False}
    old_handlers = _install_stop_handler(flag)
    monitor = None
    try:
        run = _Run(cfg, info)
        start = 0
        if resume:
            ck = latest_checkpoint(out) if resume is True else Path(resume)
            if ck is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {str(out / 'checkpoints')!r}")
            start = load_checkpoint(run, ck, info)
        total = cfg.train.steps
        result = TrainResult(step=start, output_dir=str(out))
        monitor = Monitor(out, total=total, initial=start, enabled=info.main, progress=cfg.log.progress)
        pending, t_last, n_last = [], time.perf_counter(), start
        grad_norm = torch.zeros(())
        step = start
        while step < total:
            images, captions = run.next_batch()
            loss, mse = run.loss(images, captions, step)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], cfg.optim.grad_clip)
            run.optimizer.step()
            run.scheduler.step()
            step += 1
            if run.ema is not None:
                run.ema.update(run.objective, step)
            pending.append(torch.stack([loss.detach().float(), mse.float()]))
            monitor.step()
            stop_now = flag["stop"] or (stop_after is not None and step >= stop_after)
            if step % cfg.log.every == 0 or step == total or stop_now:
                vals = all_mean(torch.stack(pending), info).cpu()
                counts = torch.tensor([run.loader.counters.get("unreadable_images", 0),
                                       run.loader.counters.get("missing_captions", 0)], dtype=torch.float64)
                counts = all_mean(counts, info) * info.world
                result.losses += vals[:, 0].tolist()
                result.mses += vals[:, 1].tolist()
                gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                dt = time.perf_counter() - t_last
                rec = {"step": step, "loss": float(vals[-1, 0]), "mse": float(vals[-1, 1]),
                       "loss_avg": float(vals[:, 0].mean()), "lr": run.scheduler.get_last_lr()[0], "grad_norm": gn,
                       "samples_per_s": (step - n_last) * cfg.train.batch_size / max(dt, 1e-9),
                       "step_time_s": dt / max(step - n_last, 1),
                       "unreadable_images": int(counts[0]), "missing_captions": int(counts[1])}
                if torch.cuda.is_available() and info.device.type == "cuda":
                    rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                if not all(math.isfinite(v) for v in vals.flatten().tolist()):
                    raise FloatingPointError(f"the loss is not finite at step {step}: {rec}; lower optim.lr or use "
                                             f"train.mixed_precision=fp32")
                monitor.log(rec)
                pending, t_last, n_last = [], time.perf_counter(), step
            if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                run.write_samples(images, captions, step)
            ck_every = cfg.log.checkpoint_every
            if stop_now or step == total or (ck_every and step % ck_every == 0):
                result.checkpoint = str(save_checkpoint(run, step, info, keep=cfg.log.keep_checkpoints))
            if stop_now:
                result.stopped_early = step < total
                monitor.write(f"stopped at step {step}; checkpoint {result.checkpoint}")
                break
        result.step = step
        result.counters = dict(run.loader.counters)
        if step >= total:
            result.model_dir = str(_export(run, info))
        return result
    finally:
        if monitor is not None:
            monitor.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        backend_ctx.__exit__(None, None, None)
        cleanup(info)


def _export(run: _Run, info) -> Path:
    """<output_dir>/model (EMA weights if EMA is on), and for Stage B <output_dir>/compressor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    msd = get_model_state_dict(run.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
           for k, v in run.ema.named().items()} if run.ema is not None else {}
    out = run.output_dir / "model"
    if info.main:
        sd = {**{k: v.detach().cpu() for k, v in msd.items()}, **ema}
        save_stage(run.export_stage(sd), out)
        if run.stage == "stage_b":
            run.export_compressor(sd, run.output_dir / "compressor")
    from .distributed import barrier

    barrier(info)
    return out
