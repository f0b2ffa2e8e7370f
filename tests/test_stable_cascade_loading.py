"""Every way a Stable Cascade UNet arrives on disk: the stabilityai repo layouts (prior/, prior_lite/, decoder/,
decoder_lite/), bf16 variants, sharded safetensors with their (variant) index, the original single files in a
folder, and the refusals when a Würstchen v2 checkpoint meets the v3 loader or the reverse."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from _model_factories import make_diffusers_decoder, make_diffusers_prior
from wuerstchen_fast.models import (CheckpointError, load_stable_cascade, load_stage_b, load_stage_c,
                                    to_original_layout, to_original_stable_cascade)
from wuerstchen_fast.testing.random_stable_cascade import make_diffusers_stable_cascade


def _same_weights(model, ref) -> bool:
    theirs = ref.state_dict()
    return all(torch.equal(v.float(), theirs[k].float()) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def refs():
    return dict(prior=make_diffusers_stable_cascade("tiny_prior", seed=1),
                prior_lite=make_diffusers_stable_cascade("tiny_prior", seed=2, block_out_channels=[16, 16]),
                decoder=make_diffusers_stable_cascade("tiny_decoder", seed=3),
                decoder_lite=make_diffusers_stable_cascade("tiny_decoder", seed=4, up_blocks_repeat_mappers=[1, 1, 1]))


def _repo(root, refs, names, cls):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    for name in names:
        refs[name].save_pretrained(root / name)
    return root


def test_repo_layouts_pick_the_stage_and_lite(tmp_path, refs):
    prior_repo = _repo(tmp_path / "stable-cascade-prior", refs, ["prior", "prior_lite"], "StableCascadePriorPipeline")
    decoder_repo = _repo(tmp_path / "stable-cascade", refs, ["decoder", "decoder_lite"], "StableCascadeDecoderPipeline")
    for repo, stage in ((prior_repo, "prior"), (decoder_repo, "decoder")):
        assert _same_weights(load_stable_cascade(repo), refs[stage])
        assert _same_weights(load_stable_cascade(repo, lite=True), refs[f"{stage}_lite"])
        assert _same_weights(load_stable_cascade(repo / f"{stage}_lite"), refs[f"{stage}_lite"])
    with pytest.raises(CheckpointError, match="Stable Cascade Stage B .decoder., but stage='prior'"):
        load_stable_cascade(decoder_repo / "decoder", stage="prior")


def test_bf16_variant_and_sharded_indices(tmp_path, refs):
    ref = refs["decoder"]
    ref.save_pretrained(tmp_path / "bf16", variant="bf16")
    with pytest.raises(CheckpointError, match="has the variant.*'bf16'.*pass variant='bf16'"):
        load_stable_cascade(tmp_path / "bf16")
    model = load_stable_cascade(tmp_path / "bf16", variant="bf16")
    assert next(model.parameters()).dtype == torch.float32  # stored as saved (float32 here)
    assert _same_weights(model, ref)
    assert load_stable_cascade(tmp_path / "bf16", variant="bf16", dtype=torch.bfloat16).clf[1].weight.dtype == torch.bfloat16

    for variant in (None, "bf16"):
        folder = tmp_path / f"sharded_{variant}"
        ref.save_pretrained(folder, variant=variant, max_shard_size="40KB")
        index = [p.name for p in folder.iterdir() if "index" in p.name]
        shards = [p for p in folder.iterdir() if "-of-" in p.name]
        assert len(index) == 1 and len(shards) > 2, sorted(p.name for p in folder.iterdir())
        assert _same_weights(load_stable_cascade(folder, variant=variant), ref)
    shards[0].unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in the folder"):
        load_stable_cascade(folder, variant="bf16")
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert _same_weights(load_stable_cascade(tmp_path / "bin"), ref)
    with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model weights \(\*\.safetensors"):
        load_stable_cascade(tmp_path / "bin", use_safetensors=True)


def test_original_files_folder(tmp_path, refs):
    """The original releases sit side by side: stage_c.safetensors, stage_c_lite_bf16.safetensors, stage_b..."""
    heads = dict(prior=[2, 2], decoder=[0, 0, 2])
    for name in ("prior", "prior_lite", "decoder", "decoder_lite"):
        stage_file = ("stage_c" if name.startswith("prior") else "stage_b") + ("_lite" if "lite" in name else "")
        sd = to_original_stable_cascade(refs[name].state_dict())
        save_file(sd, tmp_path / f"{stage_file}.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / f"{stage_file}_bf16.safetensors")
    for name in ("prior", "prior_lite", "decoder", "decoder_lite"):
        stage = name.split("_")[0]
        kw = dict(stage=stage, lite="lite" in name, num_attention_heads=heads[stage])
        assert _same_weights(load_stable_cascade(tmp_path, **kw), refs[name])
        bf16 = load_stable_cascade(tmp_path, variant="bf16", **kw)
        assert bf16.clf[1].weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="both of the original files.*pass stage="):
        load_stable_cascade(tmp_path)
    # the original Stage B names its pooled-text mapper clip_mapper; converted on load
    assert "clip_mapper.weight" in to_original_stable_cascade(refs["decoder"].state_dict())


def test_v2_and_v3_checkpoints_are_told_apart(tmp_path, refs):
    """Both families have a Stage B `clip_mapper` and `down_blocks`: each loader names the other one."""
    v2_prior, v2_decoder = make_diffusers_prior(), make_diffusers_decoder()
    v2_prior.save_pretrained(tmp_path / "v2_prior")
    torch.save({"state_dict": to_original_layout(v2_decoder.state_dict())}, tmp_path / "model_v2_stage_b.pt")
    with pytest.raises(CheckpointError, match=r"Würstchen v2 WuerstchenPrior.*load_stage_c\(\)"):
        load_stable_cascade(tmp_path / "v2_prior")
    with pytest.raises(CheckpointError, match=r"Würstchen v2 Stage B \(decoder\).*load_stage_b\(\)"):
        load_stable_cascade(tmp_path / "model_v2_stage_b.pt")

    refs["prior"].save_pretrained(tmp_path / "sc_prior")
    save_file(to_original_stable_cascade(refs["decoder"].state_dict()), tmp_path / "stage_b.safetensors")
    with pytest.raises(CheckpointError, match=r"StableCascadeUNet.*load_stable_cascade\(\)"):
        load_stage_c(tmp_path / "sc_prior")
    with pytest.raises(CheckpointError, match=r"Stable Cascade \(Würstchen v3\) Stage B.*load_stable_cascade\(\)"):
        load_stage_b(tmp_path / "stage_b.safetensors")
    with pytest.raises(CheckpointError, match=r"Stable Cascade \(Würstchen v3\) Stage B.*load_stable_cascade\(\)"):
        load_stage_c(tmp_path / "stage_b.safetensors")


def test_stable_cascade_effnet_encoder_file_without_batchnorm_affine(tmp_path):
    """`effnet_encoder.safetensors` (Stable Cascade's semantic compressor, for img2img): BatchNorm2d(16,
    affine=False), so no mapper.1.weight / bias; the config says so after loading."""
    import torch.nn as nn

    from _model_factories import PARITY_RTOL, make_torchvision_effnet_encoder, relative_error
    from wuerstchen_fast.models import load_effnet
    from wuerstchen_fast.testing.random_models import randomize_

    features, _ = make_torchvision_effnet_encoder()
    mapper = randomize_(nn.Sequential(nn.Conv2d(1280, 16, kernel_size=1, bias=False),
                                      nn.BatchNorm2d(16, affine=False)), 3).eval()
    sd = {**{f"backbone.{k}": v for k, v in features.state_dict().items()},
          **{f"mapper.{k}": v for k, v in mapper.state_dict().items()}}
    assert "mapper.1.weight" not in sd
    save_file(sd, tmp_path / "effnet_encoder.safetensors")
    model = load_effnet(tmp_path / "effnet_encoder.safetensors")
    assert model.config.affine is False
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(x), mapper(features(x))) <= PARITY_RTOL
