"""The batch job (`wuerstchen-fast sample --prompts FILE --out-dir DIR`): the plan, two torchrun ranks, a kill
and a resume, and exact regeneration from a sidecar. Uses the bundled default model at 128x128, 2+2 steps."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wuerstchen_fast import batch
from wuerstchen_fast.pipeline import load_pipeline

SMALL = ["--height", "128", "--width", "128", "--prior-steps", "2", "--steps", "2"]
SETTINGS = dict(height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2)
PROMPTS = ["a red circle on a blue background", "a green square at the top left on a black background",
           "a yellow triangle on a white background", "a blue square on a red background"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(device="cpu")


def prompt_file(tmp_path, lines=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def job_cli(*args, torchrun: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return launcher + ["-m", "wuerstchen_fast.cli", "sample", *args, *SMALL, "--no-progress"]


def outputs(out_dir: Path) -> dict:
    """name -> sidecar of every complete image; asserts no file of the job is half-written or doubled."""
    pngs = sorted(p.stem for p in out_dir.glob("*.png"))
    sides = sorted(p.stem for p in out_dir.glob("*.json"))
    assert len(pngs) == len(set(pngs))
    for name in pngs:
        Image.open(out_dir / f"{name}.png").load()  # a whole PNG: a truncated one raises
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name in sides if name in pngs}


# ------------------------------------------------------------------------------------------ the plan
def test_plan_names_seeds_batches_and_rank_shares(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "id": "cat", "seed": 100}\n\n{"prompt": "b", "num_images": 3}\n'
                     '{"prompt": "c", "height": 256, "negative_prompt": "dark"}\n')
    settings = dict(height=128, width=128, prior_num_inference_steps=2)
    items = batch.plan_job(batch.read_prompts(jsonl), num_images=2, seed=7, settings=settings)
    assert [(i.name, i.prompt, i.seed) for i in items] == [
        ("cat_000", "a", 100), ("cat_001", "a", 101),  # the line's seed + k
        ("000001_000", "b", 9), ("000001_001", "b", 10), ("000001_002", "b", 11),  # --seed + index in the job
        ("000002_000", "c", 12), ("000002_001", "c", 13)]
    assert items[5].negative_prompt == "dark" and items[5].settings_dict()["height"] == 256
    batches = batch.batches_of(items, 3)
    assert [[i.name for i in b] for b in batches] == [
        ["cat_000", "cat_001", "000001_000"], ["000001_001", "000001_002"], ["000002_000", "000002_001"]]
    for world in (1, 2, 3, 5):
        shares = [batch.rank_share(batches, r, world) for r in range(world)]
        names = [i.name for share in shares for b in share for i in b]
        assert sorted(names) == sorted(i.name for i in items)  # disjoint and complete


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "steps": 3}', r"p.jsonl:1 has unknown keys \['steps'\]"),
    ('{"text": "a"}', r'p.jsonl:1 must be an object with a "prompt" string'),
    ('{"prompt": "a"}\n{"prompt": ', r"p.jsonl:2 is not valid JSON"),
    ('{"prompt": "a", "id": "../x"}', r'"id" must be a file-name-safe string'),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}', r"two images would be named 'x_000'"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(ValueError, match=match):
        batch.plan_job(batch.read_prompts(path), settings={})


# ------------------------------------------------------------------------------------ regeneration
def test_sidecar_regenerates_its_image_exactly(pipe, tmp_path, capsys):
    """An image decoded in a batch of two regenerates bit for bit (float hash and PNG) from its sidecar."""
    out = tmp_path / "out"
    result = batch.run_job(pipe, prompt_file(tmp_path, PROMPTS[:3]), out, batch_size=2, seed=5, settings=SETTINGS)
    assert result.written == ["000000_000", "000001_000", "000002_000"]
    bar = capsys.readouterr().err  # one bar for the job, counting images, with the rate
    assert "images: 100%" in bar and "3/3" in bar and ("img/s" in bar or "s/img" in bar) and "Stage C" not in bar
    side = outputs(out)["000001_000"]
    assert side["prompt"] == PROMPTS[1] and side["seed"] == 6 and side["height"] == 128
    assert side["prior_guidance_scale"] == 4.0 and side["environment"]["wuerstchen_fast"]
    assert [m["name"] for m in side["batch"]] == ["000000_000", "000001_000"] and side["batch_index"] == 1
    image = batch.regenerate(out / "000001_000.json", pipe, strict=True)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / "000001_000.png")))

    tampered = dict(side, image_sha256="0" * 64)
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="differs from the recorded one in its float bits"):
        batch.regenerate(tmp_path / "t.json", pipe, strict=True)

    # the same folder with other settings is refused, not mixed
    with pytest.raises(ValueError, match=r"000000_000.json' was made with other settings \(seed: 5 there, 0 now\)"):
        batch.run_job(pipe, prompt_file(tmp_path, PROMPTS[:3]), out, batch_size=2, seed=0, settings=SETTINGS,
                      progress=False)


# -------------------------------------------------------------------------------- processes
def test_two_torchrun_ranks_make_each_image_once(tmp_path):
    prompts, out = prompt_file(tmp_path), tmp_path / "out"
    run = subprocess.run(job_cli("--prompts", str(prompts), "--out-dir", str(out), "--batch-size", "2",
                                 "--num-images", "2", torchrun=2), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    made = outputs(out)
    items = batch.plan_job(batch.read_prompts(prompts), num_images=2, settings={})
    batches = batch.batches_of(items, 2)
    assert sorted(made) == sorted(i.name for i in items)  # complete: 4 prompts x 2
    for b, members in enumerate(batches):
        for item in members:  # disjoint: each image from the rank that owns its batch
            assert (made[item.name]["rank"], made[item.name]["world_size"]) == (b % 2, 2)
    assert not list(out.glob(".*.partial"))


def test_a_killed_job_resumes_without_duplicates_or_half_written_files(tmp_path):
    prompts, out = prompt_file(tmp_path), tmp_path / "out"
    args = job_cli("--prompts", str(prompts), "--out-dir", str(out), "--num-images", "2")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-job: the first image is done, the rest is not
    proc.wait()
    before = outputs(out)
    assert 1 <= len(before) < 8, "the job finished before it could be killed; give it more images"
    stamps = {n: (out / f"{n}.png").stat().st_mtime_ns for n in before}

    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "already there (8 in the whole job)" in run.stdout and f"{len(before)} already there" in run.stdout
    after = outputs(out)
    assert len(after) == 8 and not list(out.glob(".*.partial"))
    assert {n: (out / f"{n}.png").stat().st_mtime_ns for n in before} == stamps  # kept, not redone
    assert sorted(s["seed"] for s in after.values()) == list(range(8))
