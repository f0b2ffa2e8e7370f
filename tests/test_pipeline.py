"""load_pipeline() / sample() against diffusers' WuerstchenCombinedPipeline on the same saved folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from _pipeline_folders import diffusers_combined, tiny_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import DEFAULT_STAGE_C_TIMESTEPS, load_pipeline, sample

# Same weights through the same math; the remaining difference is float32 summation order in the
# models (~1e-7 per call), grown by the chain of steps and the x42 prior -> decoder hand-off to ~1e-5.
IMAGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def pipes(tiny_repos):
    prior_dir, decoder_dir = tiny_repos
    return diffusers_combined(prior_dir, decoder_dir), load_pipeline(prior_dir, decoder_dir, device="cpu")


PARITY_CASES = [
    # height, width, prior steps / timesteps, decoder steps / timesteps, prior w, decoder w, seed, n, negative
    dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=3, prior_guidance_scale=4.0,
         decoder_guidance_scale=0.0, seed=0, n=1, negative_prompt=None),
    dict(height=128, width=256, prior_num_inference_steps=4, num_inference_steps=2, prior_guidance_scale=4.0,
         decoder_guidance_scale=2.0, seed=1, n=1, negative_prompt="blurry, ugly"),
    dict(height=256, width=128, prior_num_inference_steps=2, num_inference_steps=3, prior_guidance_scale=1.0,
         decoder_guidance_scale=3.0, seed=2, n=2, negative_prompt=None),
    dict(height=384, width=256, prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, decoder_timesteps=[1.0, 0.6, 0.3, 0.0],
         prior_guidance_scale=6.5, decoder_guidance_scale=0.0, seed=3, n=2, negative_prompt="dark"),
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: f"{c['height']}x{c['width']}-seed{c['seed']}-n{c['n']}")
def test_seed_parity_with_diffusers(pipes, case):
    ref, ours = pipes
    case = dict(case)
    seed, n = case.pop("seed"), case.pop("n")
    kw = dict(prompt="a tiny robot reading a book", num_images_per_prompt=n, output_type="pt", **case)
    expected = ref(generator=torch.Generator().manual_seed(seed), **kw).images
    got = ours(generator=torch.Generator().manual_seed(seed), progress=False, **kw).images
    assert got.shape == expected.shape == (n, 3, case["height"], case["width"])
    torch.testing.assert_close(got, expected, rtol=0, atol=IMAGE_ATOL)
    if n == 2:
        assert (got[0] - got[1]).abs().max() > 1e-3  # the two images of a prompt differ


def test_seed_argument_equals_cpu_generator(pipes):
    _, ours = pipes
    kw = dict(prompt="x", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
              output_type="pt", progress=False)
    a = ours(seed=5, **kw).images
    b = ours(generator=torch.Generator().manual_seed(5), **kw).images
    assert torch.equal(a, b)


def test_prompt_batch_works_and_is_deterministic(pipes):
    """diffusers' decoder crashes on batches; ours runs them, and with a list of generators image i
    equals the single-prompt image made with generator i (the same random draws reach it)."""
    _, ours = pipes
    prompts = ["a red square", "a blue circle"]
    kw = dict(height=128, width=256, prior_num_inference_steps=3, num_inference_steps=2, prior_guidance_scale=4.0,
              decoder_guidance_scale=2.0, negative_prompt=["green", "yellow"], output_type="pt", progress=False)
    a = ours(prompts, seed=0, **kw).images
    b = ours(prompts, seed=0, **kw).images
    assert a.shape == (2, 3, 128, 256) and torch.equal(a, b)
    batched = ours(prompts, generator=[torch.Generator().manual_seed(s) for s in (10, 11)], **kw).images
    for i, (p, neg) in enumerate(zip(prompts, kw.pop("negative_prompt"))):
        single = ours(p, negative_prompt=neg, generator=torch.Generator().manual_seed(10 + i), **kw).images
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=IMAGE_ATOL)


def test_odd_decoder_sizes_are_refused_with_the_rule(pipes):
    _, ours = pipes
    # 300 -> ceil(300/42.67) = 8 -> int(8*10.67) = 85 rows: odd, diffusers crashes in pixel_unshuffle.
    with pytest.raises(ValueError) as e:
        ours("x", height=300, width=200, progress=False)
    msg = str(e.value)
    assert "height=300" in msg and "ceil(300/42.67) = 8" in msg and "int(8*10.67) = 85" in msg
    assert "4*int(ceil(H/42.67)*10.67)" in msg
    assert "256 (-> 256 px) or 384 (-> 384 px)" in msg
    with pytest.raises(ValueError, match=r"width=200 .* Nearest valid width: 128 \(-> 128 px\) or 256"):
        ours("x", height=256, width=200, progress=False)


def test_output_types_and_callbacks(pipes):
    _, ours = pipes
    seen = {"prior": [], "decoder": []}

    def cb(stage):
        def f(pipe, i, t, kwargs):  # as diffusers: the running sub-pipeline is the callback's `pipe`
            assert pipe is getattr(ours, f"{stage}_pipe") and set(kwargs) == {"latents"}
            seen[stage].append(i)
            return kwargs
        return f

    kw = dict(prompt="x", height=128, width=256, prior_num_inference_steps=3, num_inference_steps=2, seed=0,
              progress=False)
    pil = ours(output_type="pil", prior_callback_on_step_end=cb("prior"), callback_on_step_end=cb("decoder"), **kw)
    assert seen == {"prior": [0, 1, 2], "decoder": [0, 1]}
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (256, 128)
    arr = ours(output_type="np", **kw).images
    pt = ours(output_type="pt", **kw).images
    assert arr.shape == (1, 128, 256, 3) and np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.asarray(pil.images[0]), (arr[0] * 255).round().astype("uint8"))
    lat = ours(output_type="latent", **kw).images
    assert lat.shape == (1, 4, 32, 64)
    bare = ours(output_type="pt", return_dict=False, **kw)  # diffusers returns the images themselves
    assert torch.equal(bare, pt)


def test_load_from_combined_pipeline_folder(pipes, tmp_path):
    ref, ours = pipes
    ref.save_pretrained(tmp_path / "combined")
    combined = load_pipeline(weights=tmp_path / "combined", device="cpu")
    kw = dict(prompt="x", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, seed=0,
              output_type="pt", progress=False)
    assert torch.equal(combined(**kw).images, ours(**kw).images)


def test_sample_one_liner(tiny_repos):
    prior_dir, decoder_dir = tiny_repos
    imgs = sample("a cat", prior=prior_dir, decoder=decoder_dir, device="cpu", height=128, width=128,
                  prior_num_inference_steps=2, num_inference_steps=2, seed=0, progress=False)
    assert len(imgs) == 1 and isinstance(imgs[0], Image.Image) and imgs[0].size == (128, 128)


# Compiled vs eager: the r-embedding frequencies are an eager constant (models/blocks.py RFrequencies),
# so what is left is inductor's float32 reassociation, ~1e-7 per call, ~1e-6 in the images. (Traced
# into the graph, exp differed from ATen's by an ulp, which r*10000 made ~3e-3 in the images.)
COMPILE_ATOL = 1e-4


def test_compiled_denoisers_equal_eager(tiny_repos, pipes):
    """torch.compile of the Stage C and Stage B steps (with CFG on both) gives the eager images."""
    _, eager = pipes
    compiled = load_pipeline(*tiny_repos, device="cpu", compile=True)
    kw = dict(prompt="x", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
              prior_guidance_scale=4.0, decoder_guidance_scale=2.0, seed=0, output_type="pt", progress=False)
    torch.testing.assert_close(compiled(**kw).images, eager(**kw).images, rtol=0, atol=COMPILE_ATOL)


@pytest.mark.cuda  # CUDA graphs need a CUDA device: runs on the GPU runner
def test_cuda_graphs_equal_eager_on_cuda(tiny_repos):
    eager = load_pipeline(*tiny_repos, device="cuda")
    graphed = load_pipeline(*tiny_repos, device="cuda", cuda_graphs=True)
    kw = dict(prompt=["x", "y"], height=128, width=256, prior_num_inference_steps=3, num_inference_steps=3,
              prior_guidance_scale=4.0, decoder_guidance_scale=2.0, seed=0, output_type="pt", progress=False)
    expected = eager(**kw).images
    torch.testing.assert_close(graphed(**kw).images, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(graphed(**kw).images, expected, rtol=0, atol=1e-5)  # replayed graphs
