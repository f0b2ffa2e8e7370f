"""The `wuerstchen-fast` command line. One subcommand per task: `sample`, `train`.

    wuerstchen-fast sample "a cat in a spacesuit" --out cat.png --prior DIR --decoder DIR --seed 0
    wuerstchen-fast train stage-c --config configs/shapes/stage_c.json train.steps=100 [--resume] [--backend torch]

Each subcommand registers itself in `_SUBCOMMANDS` with a function that adds its arguments and a
function that runs it; `main()` parses and dispatches, and turns user errors into one clear line
on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

__all__ = ["main", "build_parser"]


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*", help="text prompt(s); several prompts make a batch, one image set each "
                                             "(or --prompts FILE for a batch job)")
    p.add_argument("--out", "-o", default="out.png",
                   help="output PNG path (default out.png); with several images, NAME_0.png, NAME_1.png, ...")
    w = p.add_argument_group("weights (Hub repo ids or diffusers repo folders; none: the bundled default model)")
    w.add_argument("--prior", help="warp-ai/wuerstchen-prior, or a folder in its layout (model_index.json, prior/, "
                                   "text_encoder/, tokenizer/, scheduler/)")
    w.add_argument("--decoder", help="warp-ai/wuerstchen, or a folder in its layout (decoder/, vqgan/, text_encoder/, "
                                     "tokenizer/, scheduler/)")
    w.add_argument("--variant", default=None,
                   help="weight file variant to read where present, e.g. fp16 or bf16; for Stable Cascade also 'lite' "
                        "(its prior_lite/ and decoder_lite/ models) or 'lite_bf16'. --prior / --decoder also take "
                        "stabilityai/stable-cascade-prior and stabilityai/stable-cascade (Würstchen v3: 1024x1024, "
                        "20 + 10 steps by default)")
    w.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the repo ids; "
                                                    "HF_HUB_OFFLINE=1 uses the Hugging Face cache only")
    w.add_argument("--weights", help="one folder with both stages: a saved WuerstchenCombinedPipeline, or a folder "
                                     "holding prior/ and decoder/ repos (instead of --prior/--decoder)")
    g = p.add_argument_group("generation")
    g.add_argument("--negative", default=None, help="negative prompt (used where guidance is on)")
    g.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the weights' own, e.g. 256 for the bundled model, else 512); "
                        "the image side is 4*int(ceil(H/42.67)*10.67)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default as --height), same rule")
    g.add_argument("--seed", type=int, default=None, help="random seed (a CPU generator: same image on any device)")
    g.add_argument("--prior-steps", type=int, default=None, help="Stage C denoising steps (default 60, or the weights' own)")
    g.add_argument("--prior-fast", action="store_true",
                   help="use the released 29-step Stage C schedule DEFAULT_STAGE_C_TIMESTEPS instead of --prior-steps")
    g.add_argument("--prior-guidance", type=float, default=None,
                   help="Stage C classifier-free guidance scale (default 4.0, or the weights' own; applied only when > 1)")
    g.add_argument("--steps", type=int, default=None, help="Stage B denoising steps (default 12, or the weights' own)")
    g.add_argument("--decoder-guidance", type=float, default=None,
                   help="Stage B classifier-free guidance scale (default 0.0 = off, or the weights' own; applied only when > 1)")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    j = p.add_argument_group("batch job (resumable; under torchrun each rank takes its share)")
    j.add_argument("--prompts", metavar="FILE", help="a .txt file (one prompt a line) or .jsonl (one JSON object a "
                                                    "line: prompt, and overrides such as seed, negative_prompt, "
                                                    "height, num_images, id); writes NAME.png + NAME.json per image")
    j.add_argument("--out-dir", metavar="DIR", help="output folder of the batch job (required with --prompts)")
    j.add_argument("--batch-size", type=int, default=1, help="images per pipeline call in the batch job (default 1)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32; bfloat16 recommended on GPU, float16 may overflow)")
    r.add_argument("--compile", action="store_true", help="torch.compile the denoising steps")
    r.add_argument("--cuda-graphs", action="store_true", help="capture the denoising steps in CUDA graphs (CUDA only)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run_sample(args: argparse.Namespace) -> int:
    from .pipeline import DEFAULT_STAGE_C_TIMESTEPS, load_pipeline

    if args.prompts is not None or args.out_dir is not None:
        return _run_batch_job(args)
    if not args.prompt:
        raise ValueError("give a prompt, or --prompts FILE --out-dir DIR for a batch job")
    pipe = load_pipeline(args.prior, args.decoder, weights=args.weights, device=args.device, dtype=args.dtype,
                         compile=args.compile, cuda_graphs=args.cuda_graphs, variant=args.variant,
                         revision=args.revision)
    prompts = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    # Options left unset fall back to the pipeline's defaults (for the bundled model: its sampling.json).
    given = dict(height=args.height, width=args.width, prior_num_inference_steps=args.prior_steps,
                 prior_guidance_scale=args.prior_guidance, num_inference_steps=args.steps,
                 decoder_guidance_scale=args.decoder_guidance)
    images = pipe(
        prompts, negative_prompt=args.negative,
        prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS if args.prior_fast else None,
        num_images_per_prompt=args.num_images, seed=args.seed,
        output_type="pil", progress=not args.no_progress, **{k: v for k, v in given.items() if v is not None},
    ).images
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(out.suffix + ".png") if out.suffix else out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path, format="PNG")
        print(path)
    return 0


def _run_batch_job(args: argparse.Namespace) -> int:
    import torch

    from .batch import job_weights, run_job
    from .pipeline import DEFAULT_STAGE_C_TIMESTEPS, load_pipeline

    if args.prompt or args.prompts is None or args.out_dir is None:
        raise ValueError("a batch job takes --prompts FILE and --out-dir DIR, and no prompt on the command line")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    sources, weights = job_weights(args.prior, args.decoder, args.weights, variant=args.variant, revision=args.revision)
    pipe = load_pipeline(sources["prior"], sources["decoder"], weights=sources["weights"], device=device,
                         dtype=args.dtype, compile=args.compile, cuda_graphs=args.cuda_graphs, variant=args.variant)
    given = dict(height=args.height, width=args.width, prior_num_inference_steps=args.prior_steps,
                 prior_guidance_scale=args.prior_guidance, num_inference_steps=args.steps,
                 decoder_guidance_scale=args.decoder_guidance,
                 prior_timesteps=list(DEFAULT_STAGE_C_TIMESTEPS) if args.prior_fast else None)
    result = run_job(pipe, args.prompts, args.out_dir, batch_size=args.batch_size, num_images=args.num_images,
                     seed=args.seed or 0, negative_prompt=args.negative, settings=given, weights=weights,
                     progress=not args.no_progress)
    print(f"{args.out_dir}: wrote {len(result.written)} images, {result.skipped} already there "
          f"({result.total} in the whole job)")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=["stage-a", "stage-b", "stage-c"], help="which stage to train")
    p.add_argument("--config", "-c", default=None,
                   help="training config (.json, .toml or .yaml; see configs/); default: built-in tiny defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides right after the stage, e.g. train.steps=200 optim.lr=3e-4 "
                        "data.path='shards/{000..009}.tar' (after other options use --set)")
    p.add_argument("--set", dest="more_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="one config override (repeatable, anywhere on the line)")
    p.add_argument("--output-dir", "-o", default=None, help="run folder (checkpoints, metrics.jsonl, samples, model/)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in the output dir (or from the given checkpoint folder)")
    p.add_argument("--backend", default=None,
                   help="fused-op backend for the whole run: torch (eager reference), auto, triton, cpu, cuda")
    p.add_argument("--fused", dest="fused", action="store_true", default=None, help="same as --backend auto")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="same as --backend torch")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    p.add_argument("--seed", type=int, default=None, help="run seed")


def _run_train(args: argparse.Namespace) -> int:
    from .training import load_config, train

    over = list(args.overrides) + list(args.more_overrides)
    over.append(f"stage={args.stage.replace('-', '_')}")
    if args.output_dir:
        over.append(f"output_dir={args.output_dir}")
    backend = args.backend or ({True: "auto", False: "torch"}[args.fused] if args.fused is not None else None)
    if backend:
        over.append(f"train.backend={backend}")
    if args.steps is not None:
        over.append(f"train.steps={args.steps}")
    if args.seed is not None:
        over.append(f"seed={args.seed}")
    result = train(load_config(args.config, over), resume=args.resume)
    if result.model_dir:
        print(result.model_dir)
    return 0


# name -> (help, add arguments, run)
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "sample": ("generate images from text prompts and write PNG files", _add_sample_args, _run_sample),
    "train": ("train Stage A, B or C from a config (single process or under torchrun)", _add_train_args, _run_train),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wuerstchen-fast",
        description="Fast Würstchen text-to-image: Stage C prior -> Stage B decoder -> Stage A VQGAN.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands")
    for name, (help_text, add_args, run) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        print(f"wuerstchen-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
