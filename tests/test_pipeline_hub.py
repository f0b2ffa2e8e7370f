"""Hub repo ids resolved offline from a pre-populated Hub cache, diffusers' loading arguments, weight variants."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hub_cache import add_repo
from _pipeline_folders import tiny_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import (WuerstchenDecoderPipeline, WuerstchenPipeline, WuerstchenPriorPipeline,
                                      load_pipeline)
from wuerstchen_fast.pipeline.hub import select_files

PRIOR_ID, DECODER_ID = "warp-ai/wuerstchen-prior", "warp-ai/wuerstchen"
COMMIT = "a" * 40
KW = dict(prompt="a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, seed=0,
          output_type="pt", progress=False)


@pytest.fixture(scope="module")
def hub_cache(tiny_repos, tmp_path_factory):
    """Both tiny repos as the Hub cache holds them; the decoder's model card names its prior, as the real one."""
    cache = tmp_path_factory.mktemp("hub")
    prior_dir, decoder_dir = tiny_repos
    card = tmp_path_factory.mktemp("card") / "wuerstchen"
    shutil.copytree(decoder_dir, card)
    (card / "README.md").write_text(f"---\nlicense: mit\nprior:\n- {PRIOR_ID}\ntags:\n- text-to-image\n---\n# card\n")
    add_repo(cache, PRIOR_ID, prior_dir, COMMIT)
    add_repo(cache, DECODER_ID, card, "b" * 40)
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: no test may reach the network


def test_repo_ids_resolve_offline_from_the_cache(tiny_repos, hub_cache, offline):
    from_hub = load_pipeline(PRIOR_ID, DECODER_ID, cache_dir=hub_cache, device="cpu")
    local = load_pipeline(*tiny_repos, device="cpu")
    assert torch.equal(from_hub(**KW).images, local(**KW).images)


def test_the_default_cache_and_hf_hub_offline_are_honoured(tiny_repos, hub_cache, offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # what HF_HOME / HF_HUB_CACHE set
    pipe = load_pipeline(PRIOR_ID, DECODER_ID, revision=None, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and {p.dtype for p in pipe.prior.parameters()} == {torch.bfloat16}


def test_a_missing_repo_names_it_and_says_how_to_download_it(hub_cache, offline):
    with pytest.raises(FileNotFoundError) as e:
        load_pipeline("warp-ai/wuerstchen-prior-v3", DECODER_ID, cache_dir=hub_cache, device="cpu")
    msg = str(e.value)
    assert "'warp-ai/wuerstchen-prior-v3' is not in the Hugging Face cache" in msg and str(hub_cache) in msg
    assert "downloading is off" in msg and "hf download warp-ai/wuerstchen-prior-v3" in msg
    with pytest.raises(FileNotFoundError, match=r"'warp-ai/wuerstchen-prior' at revision 'v9' is not in the .*--revision v9"):
        load_pipeline(PRIOR_ID, DECODER_ID, cache_dir=hub_cache, revision="v9", device="cpu")
    # a commit hash selects that snapshot without any ref
    pipe = load_pipeline(PRIOR_ID, f"{hub_cache}/models--warp-ai--wuerstchen/snapshots/{'b' * 40}",
                         cache_dir=hub_cache, revision=COMMIT, local_files_only=True, device="cpu")
    assert isinstance(pipe, WuerstchenPipeline)


def test_from_pretrained_as_diffusers(tiny_repos, hub_cache, offline):
    prior = WuerstchenPriorPipeline.from_pretrained(PRIOR_ID, cache_dir=hub_cache, torch_dtype=torch.float32)
    decoder = WuerstchenDecoderPipeline.from_pretrained(DECODER_ID, cache_dir=hub_cache)
    assert prior.device == decoder.device == torch.device("cpu")  # as diffusers: .to("cuda") after loading
    combined = WuerstchenPipeline.from_pretrained(DECODER_ID, cache_dir=hub_cache)  # the prior from the model card
    g = torch.Generator().manual_seed(0)
    emb = prior("a cat", height=128, width=128, num_inference_steps=2, guidance_scale=4.0, generator=g,
                progress=False).image_embeddings
    split = decoder(emb, "a cat", num_inference_steps=2, generator=g, output_type="pt", progress=False).images
    assert torch.equal(split, combined(**KW).images)
    with pytest.raises(ValueError, match="dtype=torch.float32 and torch_dtype=torch.bfloat16 disagree"):
        load_pipeline(*tiny_repos, dtype=torch.float32, torch_dtype=torch.bfloat16, device="cpu")


def test_variant_reads_that_variants_weight_files(tiny_repos, tmp_path):
    """A folder holding plain and fp16 files: variant="fp16" reads the fp16 ones (here: different values)."""
    prior_dir, decoder_dir = tiny_repos
    repo = tmp_path / "prior"
    shutil.copytree(prior_dir, repo)
    for sub, base in (("prior", "diffusion_pytorch_model"), ("text_encoder", "model")):
        sd = load_file(repo / sub / f"{base}.safetensors")
        save_file({k: (v * 0.5).half() if v.is_floating_point() else v for k, v in sd.items()},
                  repo / sub / f"{base}.fp16.safetensors")
    plain = load_pipeline(repo, decoder_dir, device="cpu")
    fp16 = load_pipeline(repo, decoder_dir, device="cpu", variant="fp16")
    for a, b in ((plain.prior, fp16.prior), (plain.prior_text.model, fp16.prior_text.model)):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        k = next(iter(pa))
        assert torch.equal(pb[k], (pa[k] * 0.5).half().float())
    decoder_plain = dict(plain.decoder.named_parameters())
    assert all(torch.equal(v, decoder_plain[k]) for k, v in fp16.decoder.named_parameters())  # no fp16 files there


def test_select_files_picks_one_set_of_weights_per_folder():
    files = ["model_index.json", "README.md", "prior/config.json", "prior/diffusion_pytorch_model.safetensors",
             "prior/diffusion_pytorch_model.fp16.safetensors", "prior/diffusion_pytorch_model.bin",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/flax_model.msgpack",
             "text_encoder/model.onnx", "vqgan/diffusion_pytorch_model.bin", "tokenizer/vocab.json",
             "tokenizer/merges.txt", "decoder/diffusion_pytorch_model.safetensors.index.fp16.json",
             "decoder/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
             "decoder/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
             "decoder/diffusion_pytorch_model.safetensors"]
    common = ["README.md", "model_index.json", "prior/config.json", "text_encoder/config.json", "tokenizer/merges.txt",
              "tokenizer/vocab.json"]
    assert select_files(files) == sorted(common + [
        "prior/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
        "vqgan/diffusion_pytorch_model.bin", "decoder/diffusion_pytorch_model.safetensors"])
    assert select_files(files, variant="fp16") == sorted(common + [
        "prior/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.safetensors",
        "vqgan/diffusion_pytorch_model.bin", "decoder/diffusion_pytorch_model.safetensors.index.fp16.json",
        "decoder/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "decoder/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"])
    assert "vqgan/diffusion_pytorch_model.bin" not in select_files(files, use_safetensors=True)
    assert select_files(files, use_safetensors=False) == sorted(common + [
        "prior/diffusion_pytorch_model.bin", "vqgan/diffusion_pytorch_model.bin"])


def test_batch_job_records_each_hub_repo_at_its_commit(hub_cache, offline, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from wuerstchen_fast.batch import job_weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    sources, record = job_weights(PRIOR_ID, DECODER_ID)
    assert record == {"prior": PRIOR_ID, "prior_commit": COMMIT, "decoder": DECODER_ID, "decoder_commit": "b" * 40,
                      "weights": None, "variant": None, "revision": None}
    assert sources["prior"].name == COMMIT and (sources["decoder"] / "decoder").is_dir()
    local, record = job_weights(str(sources["prior"]), tmp_path)
    assert record["prior"] == str(sources["prior"].resolve()) and record["decoder"] == str(tmp_path.resolve())
