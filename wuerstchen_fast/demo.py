"""`python -m wuerstchen_fast.demo "a prompt" --out out/demo.png` — the README's main job.

Samples with the bundled default weights. While the package ships none (see issue 8 in the
project's tracker), it says so loudly and samples with a small RANDOMLY INITIALISED pipeline instead,
which exercises every stage, the sampler and the kernels but draws noise, not the prompt.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def random_tiny_pipeline(seed: int = 0):
    """A complete Würstchen pipeline at tiny sizes with random weights (Stage C, B, A, two CLIPs)."""
    from .models import StageA, StageAConfig, StageB, StageBConfig, StageC, StageCConfig
    from .models.text import CLIPTextEncoder, CLIPTokenizer, TextEncoderConfig
    from .pipeline import TextEncoder, WuerstchenPipeline

    torch.manual_seed(seed)
    c_cfg, b_cfg = StageCConfig.tiny(), StageBConfig.tiny()
    text_c = CLIPTextEncoder(TextEncoderConfig(width=c_cfg.c_cond, heads=4, layers=2, mlp_width=2 * c_cfg.c_cond))
    text_b = CLIPTextEncoder(TextEncoderConfig(width=b_cfg.clip_embd, heads=4, layers=2, mlp_width=2 * b_cfg.clip_embd))
    tok = CLIPTokenizer()
    prior, decoder, vqgan = StageC(c_cfg).eval(), StageB(b_cfg).eval(), StageA(StageAConfig.tiny()).eval()
    config = dict(decoder_multiple=b_cfg.patch_size * 2 ** (len(b_cfg.c_hidden) - 1))
    return WuerstchenPipeline(prior, decoder, vqgan, TextEncoder(tok, text_c.eval()), TextEncoder(tok, text_b.eval()),
                              config=config)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("prompt", nargs="?", default="a red circle on a blue background")
    p.add_argument("--out", default="out/demo.png", help="PNG file to write (default out/demo.png)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from .pipeline import NoDefaultWeightsError, load_pipeline

    try:
        pipe = load_pipeline()
        kwargs = {}
        note = "bundled default weights"
    except NoDefaultWeightsError:
        print("NOTE: wuerstchen_fast ships no trained default weights yet, so this demo samples with a small\n"
              "      RANDOMLY INITIALISED pipeline: every stage, the sampler and the kernels run, but the\n"
              "      image is noise, not the prompt. Pass real weights with `wuerstchen-fast sample --prior DIR\n"
              "      --decoder DIR` (see the README).", file=sys.stderr)
        pipe = random_tiny_pipeline(args.seed)
        kwargs = dict(height=128, width=128, prior_num_inference_steps=4, num_inference_steps=4)
        note = "random tiny pipeline"
    t0 = time.perf_counter()
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **kwargs).images[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height}, {note}, {time.perf_counter() - t0:.1f} s): {args.prompt!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
