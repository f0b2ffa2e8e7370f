"""Every bad input fails before any model runs, with a message saying what to do."""
import pytest
import torch

from _pipeline_folders import tiny_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import NoDefaultWeightsError, load_pipeline
from wuerstchen_fast.pipeline.checks import check_finite, check_generator


@pytest.fixture(scope="module")
def pipe(tiny_repos):
    return load_pipeline(*tiny_repos, device="cpu")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(prompt=[]), ValueError, "prompt is an empty list"),
        (dict(prompt=3), TypeError, "prompt must be a string or a list of strings"),
        (dict(prior_num_inference_steps=0), ValueError, "prior_num_inference_steps must be a positive int"),
        (dict(num_inference_steps=-2), ValueError, "num_inference_steps must be a positive int"),
        (dict(prior_timesteps=[1.0, 0.5, 0.7, 0.0]), ValueError, "strictly decreasing"),
        (dict(prior_guidance_scale=-1.0), ValueError, "prior_guidance_scale must be a finite number >= 0"),
        (dict(decoder_guidance_scale=float("nan")), ValueError, "decoder_guidance_scale must be a finite number"),
        (dict(height=0), ValueError, "height must be a positive int"),
        (dict(width=-64), ValueError, "width must be a positive int"),
        (dict(height=512.0), ValueError, "height must be a positive int"),
        (dict(height=20), ValueError, r"height=20 cannot be generated: .* Nearest valid height: 128"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "negative_prompt has 1 entries but prompt has 2"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be a positive int"),
        (dict(output_type="jpeg"), ValueError, "output_type must be one of"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either generator or seed"),
        (dict(generator=[torch.Generator()] * 3), ValueError, "list of 3 generators for 1 images"),
        (dict(latents=torch.zeros(1, 16, 5, 5)), ValueError, r"latents .* must have shape \(1, 16, 3, 3\)"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, exc, match):
    kw = dict(prompt="a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
              progress=False)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        pipe(**kw)


class _FakeCudaGenerator(torch.Generator):
    """A CPU generator that reports a CUDA device (no GPU on the test machine)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_generator_on_wrong_device(pipe):
    with pytest.raises(ValueError, match="generator is on cuda:0 but the pipeline runs on cpu"):
        pipe("a cat", height=128, width=128, generator=_FakeCudaGenerator(), progress=False)
    check_generator(torch.Generator("cpu"), torch.device("cuda", 0), 1)  # CPU generators serve any device


def test_unsupported_dtype(tiny_repos):
    with pytest.raises(ValueError, match="unsupported dtype torch.float64.*float32, torch.bfloat16 or torch.float16"):
        load_pipeline(*tiny_repos, device="cpu", dtype=torch.float64)


def test_cuda_graphs_needs_cuda(tiny_repos):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        load_pipeline(*tiny_repos, device="cpu", cuda_graphs=True)


def test_no_default_weights_says_how_to_pass_them(tmp_path, monkeypatch):
    # An installation without the bundled model (weights/default/ absent): say how to pass weights.
    from wuerstchen_fast.pipeline import loading

    monkeypatch.setattr(loading, "DEFAULT_WEIGHTS", tmp_path / "absent")
    with pytest.raises(NoDefaultWeightsError, match=r"no bundled default weights.*load_pipeline\(prior="):
        load_pipeline(device="cpu")


def test_missing_or_wrong_folders(tiny_repos, tmp_path):
    prior_dir, _ = tiny_repos
    with pytest.raises(ValueError, match="decoder= is missing"):
        load_pipeline(prior_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(prior_dir, tmp_path / "nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a saved WuerstchenCombinedPipeline"):
        load_pipeline(weights=tmp_path, device="cpu")


def test_nan_in_a_stage_is_reported(pipe):
    def poison(p, i, t, kw):
        return {"latents": kw["latents"] * float("nan")}

    with pytest.raises(FloatingPointError, match=r"Stage C \(prior\) produced 144 NaN/Inf values"):
        pipe("a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
             prior_callback_on_step_end=poison, progress=False)
    with pytest.raises(FloatingPointError, match=r"Stage B \(decoder\) produced"):
        pipe("a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
             callback_on_step_end=poison, progress=False)


def test_nan_message_names_fp16_overflow():
    x = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float16)
    with pytest.raises(FloatingPointError, match=r"2 NaN/Inf .*fp16 overflow.*dtype=torch.bfloat16"):
        check_finite(x, "Stage C (prior)")
    check_finite(torch.ones(3), "fine")
