"""torchrun --nproc_per_node=2 on CPU (gloo): DDP and FSDP2 runs match the single-process run with the same
global batch. The global batch is split between ranks and every random draw is made for the whole global
batch on every rank, so only the gradient reduction order differs: tolerance 1e-4 relative on the loss
curve (float32 all-reduce of two partial sums vs one sum, amplified a little by 6 AdamW steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import make_tokenizer, tiny_overrides
from wuerstchen_fast.training import load_config, train
from wuerstchen_fast.training.checkpoint import latest_checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    tok = make_tokenizer(d / "tokenizer")
    ov = tiny_overrides("stage_c", d / "run") + [f"text_encoder.tokenizer={tok}", f"train.steps={STEPS}"]
    return d, tok, train(load_config(None, ov))


def _losses(run_dir) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_single_process(mode, single, tmp_path):
    d, tok, ref = single
    out = tmp_path / mode
    ov = tiny_overrides("stage_c", out) + [f"text_encoder.tokenizer={tok}", f"train.distributed={mode}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wuerstchen_fast.cli", "train", "stage-c", *ov, "--steps", str(STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(ref.losses), rtol=1e-4, atol=1e-7)
    a = load_file(str(latest_checkpoint(out) / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(d / "run") / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{mode} {k}: {m}")
