"""The batch job: many prompts -> one PNG per image plus a JSON sidecar, resumable, on one or N GPUs.

    wuerstchen-fast sample --prompts prompts.txt --out-dir out/ [--batch-size 8] [--num-images 4]
    torchrun --nproc_per_node=8 -m wuerstchen_fast.cli sample --prompts prompts.jsonl --out-dir out/

Prompts: a `.txt` file (one prompt a line; blank lines skipped) or a `.jsonl` file (one JSON object a
line: "prompt", and any of "negative_prompt", "seed", "num_images", "id" and the sampling settings
`SETTINGS`, which override the command line for that line).

The plan is a pure function of the prompt file and the options: every image gets a name (`{id or
line:06d}_{k:03d}`), its own seed (`--seed` + its index in the job, or the line's "seed" + k) and a
place in a batch (consecutive images with the same settings, `--batch-size` at most). Under torchrun
(RANK / WORLD_SIZE in the environment) rank r takes batches r, r + N, r + 2N, ...: disjoint, complete,
and the same batches, hence the same images, for any number of ranks.

Each image is drawn from its own generator (the pipeline takes one per image), so its noise does not
depend on the batch. The float math is not batch-invariant bit for bit (on a CPU a row of a batch of 3
differs from the same image alone by up to ~1e-4, and the thread count matters as much), so the
sidecar records the whole batch (every member's prompt and seed), the thread count, backend, dtype,
device and versions, and the SHA-256 of the float image: `regenerate(sidecar)` reruns that batch
under those settings and checks the hash. Exact regeneration is guaranteed for the same software on
the same kind of machine; elsewhere `regenerate` says that the result differs (within rounding).

Files are written to a temporary name and renamed (PNG first, then the sidecar, which marks the
image complete), so a killed run leaves no half-written file under a final name and loses at most
the batch in flight; a rerun skips the batches whose images are all complete and refuses outputs
that were made with other settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["SETTINGS", "JobItem", "read_prompts", "plan_job", "batches_of", "rank_share", "job_weights", "run_job",
           "regenerate"]

# Per-image sampling settings (the combined pipeline's argument names); images share a batch only when
# all of these are equal.
SETTINGS = ("height", "width", "prior_num_inference_steps", "prior_timesteps", "prior_guidance_scale",
            "num_inference_steps", "decoder_timesteps", "decoder_guidance_scale")
LINE_KEYS = ("prompt", "negative_prompt", "seed", "num_images", "id") + SETTINGS
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class JobItem:
    name: str  # file stem: NAME.png, NAME.json
    prompt: str
    negative_prompt: str | None
    seed: int
    settings: tuple  # ((setting, value), ...) in SETTINGS order; lists as tuples

    def settings_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings}


# ------------------------------------------------------------------------------------------- the plan
def read_prompts(path) -> list[dict]:
    """The prompt file's lines as dicts (at least {"prompt": ...}), with errors naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r} does not exist (a .txt file, one prompt a line, or .jsonl)")
    lines = []
    for no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            lines.append({"prompt": raw.strip()})
            continue
        where = f"{path.name}:{no}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}); each line must be one object") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f'{where} must be an object with a "prompt" string, got {raw.strip()[:80]!r}')
        unknown = sorted(set(entry) - set(LINE_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; a line may set {list(LINE_KEYS)}")
        if "id" in entry and not (isinstance(entry["id"], str) and _ID.match(entry["id"])):
            raise ValueError(f'{where}: "id" must be a file-name-safe string (letters, digits, . _ -), got '
                             f"{entry['id']!r}")
        lines.append(entry)
    if not lines:
        raise ValueError(f"--prompts {str(path)!r} holds no prompt")
    return lines


def _check_count(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def plan_job(lines: list[dict], *, num_images: int = 1, seed: int = 0, negative_prompt: str | None = None,
             settings: dict) -> list[JobItem]:
    """Every image of the job, in order. `settings`: the resolved value of each of SETTINGS."""
    _check_count("--num-images", num_images)
    items, names, index = [], set(), 0
    for line_no, line in enumerate(lines):
        k_images = _check_count(f"line {line_no + 1}: num_images", line.get("num_images", num_images))
        values = {k: line.get(k, settings.get(k)) for k in SETTINGS}
        frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items())
        stem = line.get("id", f"{line_no:06d}")
        for k in range(k_images):
            name = f"{stem}_{k:03d}"
            if name in names:
                raise ValueError(f"two images would be named {name!r}: make the \"id\"s of the prompt file unique")
            names.add(name)
            item_seed = line["seed"] + k if "seed" in line else seed + index
            items.append(JobItem(name, line["prompt"], line.get("negative_prompt", negative_prompt), int(item_seed),
                                 frozen))
            index += 1
    return items


def batches_of(items: list[JobItem], batch_size: int) -> list[list[JobItem]]:
    """Consecutive images with equal settings, at most `batch_size` a batch."""
    _check_count("--batch-size", batch_size)
    out: list[list[JobItem]] = []
    for item in items:
        if out and len(out[-1]) < batch_size and out[-1][0].settings == item.settings:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def rank_share(batches: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s batches of `world_size` ranks: r, r + N, ... (disjoint, and together all of them)."""
    return batches[rank::world_size]


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (torchrun sets them): {e}") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world}")
    return rank, world, local


def job_weights(prior=None, decoder=None, weights=None, *, variant=None, revision=None) -> tuple[dict, dict]:
    """(sources for load_pipeline, the record every sidecar keeps): local paths made absolute, Hub ids
    resolved to their snapshot (the record names the commit), so any image can be regenerated elsewhere."""
    from .pipeline.hub import hub_folder, is_repo_id

    sources, record = {}, {"variant": variant, "revision": revision}
    for key, value in (("prior", prior), ("decoder", decoder), ("weights", weights)):
        if is_repo_id(value):
            folder = hub_folder(value, revision=revision, variant=variant)
            sources[key], record[key], record[f"{key}_commit"] = folder, value, folder.name
        else:
            path = Path(value).resolve() if value is not None and Path(value).exists() else value
            sources[key], record[key] = path, (str(path) if path is not None else None)
    return sources, record


# ------------------------------------------------------------------------------------------ outputs
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def image_sha256(image: torch.Tensor) -> str:
    """The float32 bytes of one (3, H, W) image: equal hashes mean a bit-exact regeneration."""
    return hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _identity(record: dict) -> dict:
    """What makes an output the image the plan asks for (prompt, seed, settings, weights)."""
    return {k: record.get(k) for k in ("prompt", "negative_prompt", "seed", "weights", *SETTINGS)}


def _environment(pipe) -> dict:
    from . import __version__, get_backend

    env = {"wuerstchen_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
           "backend": get_backend()}
    if pipe.device.type == "cpu":
        env["threads"] = torch.get_num_threads()
    elif pipe.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(pipe.device)
    return env


def _sidecar(item: JobItem, batch: list[JobItem], weights: dict, env: dict, sha: str, rank: int, world: int) -> dict:
    return {"prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
            **item.settings_dict(), "weights": weights, "environment": env,
            "batch": [{"name": m.name, "prompt": m.prompt, "negative_prompt": m.negative_prompt, "seed": m.seed}
                      for m in batch],
            "batch_index": batch.index(item), "image_sha256": sha, "rank": rank, "world_size": world}


def _complete(out_dir: Path, item: JobItem, weights: dict) -> bool:
    """Both files there and the sidecar describes this image; other settings under its name are refused."""
    png, side = out_dir / f"{item.name}.png", out_dir / f"{item.name}.json"
    if not (png.is_file() and side.is_file()):
        return False
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return False  # not a sidecar this job wrote (they are renamed into place whole): redo the image
    want = _identity({"prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
                      "weights": weights, **item.settings_dict()})
    have = _identity(record)
    if have != want:
        diff = ", ".join(f"{k}: {have[k]!r} there, {want[k]!r} now" for k in want if have[k] != want[k])
        raise ValueError(f"{str(side)!r} was made with other settings ({diff}); use another --out-dir, or delete "
                         "that folder's outputs to make them again")
    return True


def _generate(pipe, batch: list[JobItem], progress: bool = False) -> torch.Tensor:
    """The images of one batch, (B, 3, H, W) floats in [0, 1], each from its own seed's generator."""
    negatives = [m.negative_prompt or "" for m in batch]
    return pipe([m.prompt for m in batch], negative_prompt=negatives if any(negatives) else None,
                generator=[torch.Generator("cpu").manual_seed(m.seed) for m in batch], num_images_per_prompt=1,
                output_type="pt", progress=progress, **batch[0].settings_dict()).images


@dataclass
class JobResult:
    written: list[str] = field(default_factory=list)  # names this rank wrote
    skipped: int = 0  # images of this rank's share already complete
    total: int = 0  # images in the whole job


def resolve_settings(pipe, given: dict) -> dict:
    """SETTINGS resolved as the pipeline call would: the call's default, the weights' defaults, then `given`."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    resolved = {k: params[k].default for k in SETTINGS}
    resolved.update({k: v for k, v in getattr(pipe, "call_defaults", {}).items() if k in SETTINGS})
    resolved.update({k: v for k, v in given.items() if v is not None})
    return resolved


def run_job(pipe, prompts_file, out_dir, *, batch_size: int = 1, num_images: int = 1, seed: int = 0,
            negative_prompt: str | None = None, settings: dict | None = None, weights: dict | None = None,
            progress: bool = True) -> JobResult:
    """Run this process's share of the job (see the module docstring); returns what it wrote."""
    from .pipeline.decoder import to_output_type

    out_dir = Path(out_dir)
    rank, world, _ = _distributed()
    weights = dict(weights or {})
    items = plan_job(read_prompts(prompts_file), num_images=num_images, seed=seed, negative_prompt=negative_prompt,
                     settings=resolve_settings(pipe, settings or {}))
    for item in items:  # every setting checked before the first image, so a bad line fails fast
        pipe.geometry.check("height", item.settings_dict()["height"])
        pipe.geometry.check("width", item.settings_dict()["width"])
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = rank_share(batches_of(items, batch_size), rank, world)
    result = JobResult(total=len(items))
    todo = [b for b in mine if not all(_complete(out_dir, m, weights) for m in b)]
    result.skipped = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    bar = _JobBar(out_dir, items, enabled=progress and rank == 0)
    env = _environment(pipe)
    for batch in todo:
        images = _generate(pipe, batch)
        for item, image in zip(batch, images):
            if _complete(out_dir, item, weights):
                continue  # done before the kill that interrupted this batch
            png = to_output_type(image[None], "pil")[0]
            record = _sidecar(item, batch, weights, env, image_sha256(image), rank, world)
            _atomic_write(out_dir / f"{item.name}.png", lambda f: png.save(f, format="PNG"))
            _atomic_write(out_dir / f"{item.name}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
            result.written.append(item.name)
        bar.refresh()
    bar.finish(world)
    return result


class _JobBar:
    """One tqdm bar for the whole job on rank 0: it counts complete images in the out dir, so it sees
    every rank's progress (images/s and ETA included) without any message between the ranks."""

    def __init__(self, out_dir: Path, items: list[JobItem], enabled: bool):
        self.out_dir, self.items = out_dir, items
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(items), unit="img", desc="images", initial=self._done(), smoothing=0.1)

    def _done(self) -> int:  # one directory listing, not a stat per image: jobs have 100k images
        present = {entry.name for entry in os.scandir(self.out_dir)}
        return sum(f"{i.name}.json" in present for i in self.items)

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.update(self._done() - self.bar.n)

    def finish(self, world: int) -> None:
        if self.bar is None:
            return
        while world > 1 and self._done() < len(self.items):  # the other ranks' images still coming
            time.sleep(0.5)  # torchrun ends this process if another rank fails
            self.refresh()
        self.refresh()
        self.bar.close()


# ------------------------------------------------------------------------------------- regeneration
def regenerate(sidecar, pipe=None, *, strict: bool = False, output_type: str = "pil", device=None) -> Any:
    """The image a sidecar describes, recomputed: its whole batch under its recorded thread count, backend
    and dtype. `pipe`: a loaded pipeline (else the sidecar's weights are loaded). The result's float hash
    is compared with the recorded one; a difference (other software or machine) warns, or raises with
    `strict=True`. Returns a PIL image (or a (3, H, W) tensor with output_type="pt")."""
    import warnings

    from . import backend
    from .pipeline.decoder import to_output_type

    path = Path(sidecar)
    record = json.loads(path.read_text())
    env = record["environment"]
    if pipe is None:
        from .pipeline import load_pipeline

        from .pipeline.hub import hub_folder

        w = record["weights"]
        src = {k: (hub_folder(w[k], revision=w[f"{k}_commit"], variant=w.get("variant")) if w.get(f"{k}_commit")
                   else w.get(k)) for k in ("prior", "decoder", "weights")}  # each Hub repo at its recorded commit
        pipe = load_pipeline(src["prior"], src["decoder"], weights=src["weights"], device=device, dtype=env["dtype"],
                             variant=w.get("variant"))
    settings = {k: record[k] for k in SETTINGS}
    frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items())
    batch = [JobItem(m["name"], m["prompt"], m["negative_prompt"], m["seed"], frozen) for m in record["batch"]]
    threads = torch.get_num_threads()
    try:
        if pipe.device.type == "cpu" and "threads" in env:
            torch.set_num_threads(env["threads"])
        with backend(env["backend"]):
            image = _generate(pipe, batch)[record["batch_index"]]
    finally:
        torch.set_num_threads(threads)
    if image_sha256(image) != record["image_sha256"]:
        now = _environment(pipe)
        diff = {k: (env.get(k), now.get(k)) for k in set(env) | set(now) if env.get(k) != now.get(k)}
        msg = (f"{path.name}: the regenerated image differs from the recorded one in its float bits (within "
               f"rounding: same seed and settings); what differs from the original run: {diff or 'nothing recorded'}")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return image if output_type == "pt" else to_output_type(image[None], output_type)[0]
