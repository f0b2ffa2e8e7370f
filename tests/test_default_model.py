"""Issue 8: the bundled default model, its evaluation checker and its committed evaluation table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wuerstchen_fast.data import ShapesDataset
from wuerstchen_fast.data.shapes import COLORS, HELDOUT_TRIPLES, POSITIONS, make_spec, render_shape
from wuerstchen_fast.training.evaluate_default import ATTRIBUTES, TARGETS, check_image, heldout_prompts, score

BUNDLE = Path(__file__).resolve().parents[1] / "wuerstchen_fast" / "weights" / "default"
needs_bundle = pytest.mark.skipif(not (BUNDLE / "prior").is_dir(), reason="no bundled default weights")


# ----------------------------------------------------------------------------------------- checker
@pytest.mark.parametrize("split,seed", [("train", 0), ("heldout", 1)])
def test_checker_reads_ground_truth_exactly(split, seed):
    ds = ShapesDataset(256, 120, seed=seed, split=split)
    for i in range(len(ds)):
        spec = ds.spec(i)
        found = check_image(render_shape(spec, 256))
        assert {k: found[k] for k in ATTRIBUTES} == {k: getattr(spec, k) for k in ATTRIBUTES}, (spec, found)


def test_checker_accepts_tensors_and_survives_noise_and_blur():
    from PIL import Image, ImageFilter

    ds = ShapesDataset(256, 60, seed=3, split="all")
    rng = np.random.default_rng(0)
    wrong = 0
    for i in range(len(ds)):
        img, _ = ds[i]
        spec = ds.spec(i)
        assert {k: check_image(img)[k] for k in ATTRIBUTES} == {k: getattr(spec, k) for k in ATTRIBUTES}
        a = render_shape(spec, 256).astype(np.float32) + rng.normal(0, 12, (256, 256, 3))
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        found = check_image(im)
        wrong += any(found[k] != getattr(spec, k) for k in ATTRIBUTES)
    assert wrong <= 2, wrong


def test_checker_ignores_stray_specks_away_from_the_shape():
    """The shape is the largest 4-connected component of the far-from-background pixels (no scipy needed):
    a speck elsewhere must not widen the shape's bounding box and turn a square into a 'triangle'."""
    from wuerstchen_fast.training.evaluate_default import _largest_component

    for shape in ("square", "circle", "triangle"):
        a = render_shape(make_spec("blue", shape, "top left", "yellow"), 256)
        a[230:234, 240:244] = COLORS["blue"]  # a 16-pixel speck at the far corner
        a[200, 20] = COLORS["black"]
        found = check_image(a)
        assert (found["shape"], found["position"], found["color"]) == (shape, "top left", "blue"), found
    m = np.zeros((5, 6), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours are separate components
    m[3:5, 2:6] = True
    assert _largest_component(m).sum() == 8 and _largest_component(m)[4, 5]
    assert _largest_component(np.eye(3, dtype=bool)).sum() == 1


def test_checker_reports_a_blank_image_as_no_shape():
    a = np.zeros((256, 256, 3), np.uint8)
    a[:] = (40, 80, 220)
    found = check_image(a)
    assert found["background"] == "blue" and found["shape"] is None and found["color"] is None


def test_heldout_prompts_are_the_heldout_triples_at_every_position():
    items = heldout_prompts()
    assert len(items) == len(HELDOUT_TRIPLES) * len(POSITIONS) == 55
    assert {(it["color"], it["shape"], it["background"]) for it in items} == set(HELDOUT_TRIPLES)
    assert score(items, items)["all"] == 100.0


# ------------------------------------------------------------------------------------ default weights
@needs_bundle
def test_default_weights_load_with_no_arguments_and_carry_their_sampling_defaults():
    from wuerstchen_fast import load_pipeline

    pipe = load_pipeline(device="cpu")
    defaults = json.loads((BUNDLE / "sampling.json").read_text())
    assert pipe.call_defaults == defaults and defaults["height"] == defaults["width"] == 256
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert size < 26 * 2**20, size
    assert (BUNDLE / "MODEL_CARD.md").is_file()


@needs_bundle
def test_sample_draws_a_256_image_with_the_default_model():
    import torch

    import wuerstchen_fast

    torch.manual_seed(0)
    images = wuerstchen_fast.sample("a red circle on a blue background", device="cpu", seed=0, progress=False)
    assert len(images) == 1 and images[0].size == (256, 256)


@needs_bundle
def test_a_bundle_folder_loads_with_weights_and_equals_the_default(tmp_path):
    """weights= takes any folder in the bundle layout (what `make train-default` exports), with its sampling.json."""
    import shutil

    from wuerstchen_fast import load_pipeline

    copy = Path(shutil.copytree(BUNDLE, tmp_path / "bundle"))
    a, b = load_pipeline(device="cpu"), load_pipeline(weights=copy, device="cpu")
    assert b.call_defaults == a.call_defaults
    out = [p("a red circle on a blue background", seed=0, progress=False, output_type="pt", height=128, width=128,
             prior_num_inference_steps=2, num_inference_steps=2).images for p in (a, b)]
    assert torch.equal(out[0], out[1])
    shutil.rmtree(copy / "vqgan")
    with pytest.raises(FileNotFoundError, match="bundle in the default model's layout"):
        load_pipeline(weights=copy, device="cpu")


def test_load_pipeline_without_the_bundle_raises_no_default_weights(monkeypatch, tmp_path):
    from wuerstchen_fast.pipeline import NoDefaultWeightsError, loading

    monkeypatch.setattr(loading, "DEFAULT_WEIGHTS", tmp_path / "absent")
    with pytest.raises(NoDefaultWeightsError):
        loading.load_pipeline(device="cpu")


# ------------------------------------------------------------------------------ committed evaluation
@needs_bundle
def test_committed_evaluation_table_is_consistent():
    report = json.loads((BUNDLE / "eval.json").read_text())
    assert report["n_prompts"] == 55 and report["n_images"] == len(report["images"])
    rows = report["images"]
    recomputed = score(rows, [r["found"] for r in rows])
    for k, v in report["accuracy_percent"].items():
        assert abs(recomputed[k] - v) < 0.06, (k, v, recomputed[k])
    assert set(report["targets_percent"]) == set(TARGETS)


def test_default_tokenizer_without_transformers_matches_it(monkeypatch):
    # transformers is a test dependency, not a runtime one: the bundled model must tokenize without it,
    # exactly as transformers' CLIPTokenizer does from the same folder.
    import sys

    from transformers import CLIPTokenizer

    from wuerstchen_fast.pipeline import loading
    from wuerstchen_fast.pipeline.core import TextEncoder

    folder = loading.DEFAULT_WEIGHTS / "tokenizer"
    reference = CLIPTokenizer.from_pretrained(str(folder))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    offline = loading._load_tokenizer(folder)
    assert not isinstance(offline, CLIPTokenizer)
    prompts = ["a red circle on a blue background", "", "A GREEN square, top-left; on black?",
               " ".join(["word"] * 40)]
    n = reference.model_max_length
    expected = reference(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    ids, mask = offline(prompts)
    assert torch.equal(ids, expected.input_ids) and torch.equal(mask, expected.attention_mask)
    seen = {}
    TextEncoder(offline, lambda i, attention_mask: seen.setdefault("ids", i) * 0.0)(prompts[:1], "cpu", torch.float32)
    assert torch.equal(seen["ids"], expected.input_ids[:1])
    with pytest.raises(ValueError, match="install transformers"):
        offline(["hello!"])


@needs_bundle
def test_true_latents_evaluation_bypasses_stage_c():
    """--true-latents scores Stages B and A alone: the prior's output is replaced, so its settings cannot matter."""
    from wuerstchen_fast import load_pipeline
    from wuerstchen_fast.training.components import TinyCompressor
    from wuerstchen_fast.training.evaluate_default import evaluate

    torch.manual_seed(0)
    comp, pipe = TinyCompressor(16), load_pipeline(device="cpu")
    small = dict(height=256, width=256, prior_num_inference_steps=2, num_inference_steps=2)
    reports = [evaluate(pipe, sampling={**small, "prior_guidance_scale": g}, compressor=comp, batch=55)
               for g in (1.0, 4.0)]
    assert reports[0][0]["stage_c"] == "replaced by the true latents" and reports[0][0]["n_images"] == 55
    for a, b in zip(reports[0][1][:5], reports[1][1][:5]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    plain = evaluate(pipe, sampling={**small, "prior_guidance_scale": 4.0}, batch=55)
    assert plain[0]["stage_c"] == "sampled"
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain[1][:5], reports[1][1][:5]))


# ------------------------------------------------------------------------------------------ recipe
def test_compressor_pretraining_learns_the_attributes_deterministically():
    from wuerstchen_fast.training.default_model import pretrain_compressor

    losses = []
    kw = dict(steps=40, pool=128, n_eval=64, batch=32)
    comp, acc = pretrain_compressor(**kw, log=lambda m: losses.append(float(m.rsplit(" ", 1)[1])))
    assert set(acc) == {"train", "heldout"} and set(acc["train"]) == set(ATTRIBUTES)
    assert losses[-1] < 0.7 * losses[0], losses
    assert acc["train"]["background"] >= 90.0, acc  # the easiest attribute, learnt within a few dozen steps
    again, acc2 = pretrain_compressor(**kw, log=None)
    assert acc2 == acc
    for (k, a), b in zip(comp.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_calibrated_compressor_gives_stage_c_a_unit_variance_latent(tmp_path):
    from wuerstchen_fast.training.components import TinyCompressor, compressor_input, load_compressor
    from wuerstchen_fast.training.default_model import calibrate_compressor

    torch.manual_seed(0)
    folder = calibrate_compressor(TinyCompressor(16), tmp_path / "c", n_images=64, batch=32)
    comp = load_compressor(folder).eval()
    ds = ShapesDataset(size=256, length=64, seed=1000, split="train")  # the calibration images
    with torch.no_grad():
        lat = (comp(compressor_input(torch.stack([ds[i][0] for i in range(64)]), 192)) + 1) / 42
    assert lat.shape == (64, 16, 6, 6)
    m, s = lat.mean(dim=(0, 2, 3)), lat.std(dim=(0, 2, 3))
    assert m.abs().max() < 0.05 and (s - 1).abs().max() < 0.05, (m, s)


def test_the_recipe_runs_end_to_end_at_a_tiny_step_count_and_its_bundle_samples(tmp_path, monkeypatch):
    """`python -m wuerstchen_fast.training.default_model` (make train-default) at 1/1000 of the steps: every
    stage trains through the CLI, the export writes a bundle that load_pipeline(weights=...) samples from."""
    from wuerstchen_fast import load_pipeline
    from wuerstchen_fast.training import default_model

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the configs are named relative to the repo root
    runs, out = tmp_path / "runs", tmp_path / "bundle"
    assert default_model.main(["--steps-scale", "0.001", "--runs", str(runs), "--out", str(out)]) == 0
    acc = json.loads((runs / "compressor" / "pretraining.json").read_text())["attribute_accuracy"]
    assert set(acc["heldout"]) == set(ATTRIBUTES)
    assert {p.name for p in out.iterdir()} >= {"prior", "decoder", "vqgan", "text_encoder", "tokenizer",
                                               "sampling.json"}
    pipe = load_pipeline(weights=out, device="cpu")
    images = pipe("a red circle on a blue background", seed=0, progress=False, output_type="pt", height=128,
                  width=128, prior_num_inference_steps=2, num_inference_steps=2).images
    assert images.shape == (1, 3, 128, 128) and torch.isfinite(images).all()
