"""Deliberately broken or mismatched checkpoints must fail loudly, naming what is wrong."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from _model_factories import make_diffusers_decoder, make_diffusers_prior, make_diffusers_vqgan
from wuerstchen_fast.models import (CheckpointError, load_effnet, load_stage_a, load_stage_b, load_stage_c, save_stage,
                                    to_original_layout)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    make_diffusers_prior(depth=1).save_pretrained(folder)
    return folder


def _copy_folder(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / WEIGHTS)
    edit(sd)
    save_file(sd, dst / WEIGHTS)
    return dst


def test_missing_key_is_named_with_the_expected_config(prior_folder, tmp_path):
    folder = _copy_folder(prior_folder, tmp_path / "p", lambda sd: sd.pop("blocks.0.channelwise.2.gamma"))
    with pytest.raises(CheckpointError) as e:
        load_stage_c(folder)
    msg = str(e.value)
    assert "missing keys: blocks.0.channelwise.2.gamma" in msg
    assert "unexpected keys: none" in msg and "StageCConfig(" in msg and "c=64" in msg


def test_unexpected_key_is_named(prior_folder, tmp_path):
    folder = _copy_folder(prior_folder, tmp_path / "p", lambda sd: sd.update({"blocks.9.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.9\.extra"):
        load_stage_c(folder)


def test_wrong_shape_is_named_with_both_shapes(prior_folder, tmp_path):
    def edit(sd):
        sd["blocks.0.depthwise.weight"] = torch.zeros(64, 1, 5, 5)
    folder = _copy_folder(prior_folder, tmp_path / "p", edit)
    with pytest.raises(CheckpointError) as e:
        load_stage_c(folder)
    assert "mis-shaped keys: blocks.0.depthwise.weight: checkpoint (64, 1, 5, 5) vs model (64, 1, 3, 3)" in str(e.value)


def test_config_that_does_not_match_the_weights(prior_folder, tmp_path):
    """A config.json from another model size: every mismatched key is reported, and the config."""
    folder = _copy_folder(prior_folder, tmp_path / "p", lambda sd: None)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"c": 64', '"c": 32'))
    with pytest.raises(CheckpointError) as e:
        load_stage_c(folder)
    assert "c=32" in str(e.value) and "mis-shaped keys: projection.weight: checkpoint (64, 16, 1, 1) vs model (32, 16, 1, 1)" in str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_truncated_file(fmt, tmp_path):
    model = make_diffusers_vqgan()
    path = tmp_path / f"vqgan.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": to_original_layout(model.state_dict())}, path)
    else:
        save_file(dict(model.state_dict()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_stage_a(path)


def test_not_a_checkpoint_at_all(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("this is a README, not weights")
    with pytest.raises(CheckpointError, match="first bytes match neither"):
        load_stage_a(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stage_a(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a diffusers model folder"):
        load_stage_a(tmp_path / "empty")


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "callback": print}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_stage_a(path)


def test_wrong_stage_is_recognized(tmp_path):
    make_diffusers_decoder().save_pretrained(tmp_path / "decoder")
    with pytest.raises(CheckpointError, match=r"WuerstchenDiffNeXt.*load_stage_b"):
        load_stage_c(tmp_path / "decoder")
    vq = make_diffusers_vqgan()
    torch.save({"state_dict": to_original_layout(vq.state_dict())}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match=r"does not look like a Stage C checkpoint: key 'projection.weight'"):
        load_stage_c(tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match=r"does not look like a Stage B checkpoint"):
        load_stage_b(tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match=r"does not look like a EfficientNet encoder checkpoint|no entries"):
        load_effnet(tmp_path / "vq.pt")
    save_stage(load_stage_a(tmp_path / "vq.pt"), tmp_path / "own")
    with pytest.raises(CheckpointError, match=r"holds a stage_a model, not stage_b; use load_stage_a"):
        load_stage_b(tmp_path / "own")


def test_pt_without_any_state_dict_entry(tmp_path):
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": torch.tensor(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"none of \['ema_state_dict', 'state_dict'\]"):
        load_stage_c(tmp_path / "x.pt")
