"""Issue 8: sampling one 256x256 image with the bundled default model on the CPU (target: under 10 s).

    pytest bench/bench_default_model.py --benchmark-only [--benchmark-json out.json]

The model's own sampling defaults (the bundle's sampling.json: prior 20 steps at guidance 4, decoder
12 steps), fp32, default backends; one image per round, a new seed each. Threads: WF_BENCH_THREADS
(default: torch's count). On a shared, loaded 2-core machine use WF_BENCH_THREADS=1: two threads
fighting other jobs for the cores made single rounds range from 0.9 s to 39 s.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "wuerstchen_fast" / "weights" / "default"
PROMPT = "a red circle on a blue background"


@pytest.mark.skipif(not (BUNDLE / "prior").is_dir(), reason="no bundled default weights")
def test_default_model_sample_256_cpu(benchmark):
    from wuerstchen_fast import load_pipeline

    if os.environ.get("WF_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["WF_BENCH_THREADS"]))
    pipe = load_pipeline(device="cpu")
    seeds = itertools.count()
    pipe(PROMPT, seed=next(seeds), progress=False)  # warm-up: first-call allocations

    def run():
        return pipe(PROMPT, seed=next(seeds), progress=False).images[0]

    image = benchmark.pedantic(run, rounds=7, iterations=1)
    assert image.size == (256, 256)
    benchmark.extra_info.update(device="cpu", threads=torch.get_num_threads(), target_s=10.0,
                                sampling=json.loads((BUNDLE / "sampling.json").read_text()))
