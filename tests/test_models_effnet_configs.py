"""Semantic compressor parity with torchvision, and the named configs (v2 sizes built on the meta device)."""
from __future__ import annotations

import pytest
import torch

from _model_factories import PARITY_RTOL, make_torchvision_effnet_encoder, relative_error
from wuerstchen_fast.models import (EfficientNetEncoder, StageA, StageAConfig, StageB, StageBConfig, StageC,
                                    StageCConfig, load_effnet, preprocess_for_effnet, save_stage)


def test_effnet_loads_the_released_layout_and_matches_torchvision(tmp_path):
    features, mapper = make_torchvision_effnet_encoder()
    released = {**{f"backbone.{k}": v for k, v in features.state_dict().items()},
                **{f"mapper.{k}": v for k, v in mapper.state_dict().items()}}
    # The released Stage B checkpoint carries the compressor next to the decoder weights.
    torch.save({"state_dict": {"clip_mapper.weight": torch.zeros(2, 2)}, "effnet_state_dict": released},
               tmp_path / "model_v2_stage_b.pt")
    model = load_effnet(tmp_path / "model_v2_stage_b.pt")
    assert isinstance(model, EfficientNetEncoder) and not model.training
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # non-square -> 2x3
    with torch.no_grad():
        feats = features(x)
        assert relative_error(model.backbone(x), feats) <= PARITY_RTOL
        out = model(x)
        assert out.shape == (2, 16, 2, 3)
        assert relative_error(out, mapper(feats)) <= PARITY_RTOL
        save_stage(model, tmp_path / "own")
        assert torch.equal(load_effnet(tmp_path / "own")(x), out)


def test_effnet_preprocess_resizes_crops_and_normalizes():
    img = torch.rand(1, 3, 100, 150)
    x = preprocess_for_effnet(img, size=64)
    assert x.shape == (1, 3, 64, 64)
    flat = preprocess_for_effnet(torch.full((1, 3, 80, 80), 0.485), size=32)
    assert flat[0, 0].abs().max() < 1e-5  # the red channel mean maps to 0


# Released sizes (spec): Stage C ~994M, Stage B ~1055M, Stage A ~18.4M parameters.
V2_PARAMS = {"stage_c": (StageC, StageCConfig, 993.6e6), "stage_b": (StageB, StageBConfig, 1055.4e6),
             "stage_a": (StageA, StageAConfig, 18.41e6)}


@pytest.mark.parametrize("stage", sorted(V2_PARAMS))
def test_v2_configs_build_on_meta_with_the_released_parameter_counts(stage):
    cls, cfg_cls, expected = V2_PARAMS[stage]
    with torch.device("meta"):
        model = cls(cfg_cls.v2())
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    print(f"{stage} v2: {n / 1e6:.1f}M parameters")
    assert n == pytest.approx(expected, rel=0.002)


def test_v2_stage_details():
    c, b = StageCConfig.v2(), StageBConfig.v2()
    assert (c.c, c.depth, c.nhead, c.c_cond) == (1536, 32, 24, 1280) and StageCConfig.v1().c_cond == 1024
    assert b.c_hidden == [320, 640, 1280, 1280] and b.blocks == [4, 4, 14, 4] and b.nhead == [-1, 10, 20, 20]
    with torch.device("meta"):
        sb = StageB(b)
    # only the injecting levels have an effnet mapper: effnet_mappers.1..6 in the released state dict
    mapper_keys = sorted({k.split(".")[1] for k in sb.state_dict() if k.startswith("effnet_mappers.")})
    assert mapper_keys == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.parametrize("cls,cfg_cls", [(StageC, StageCConfig), (StageB, StageBConfig), (StageA, StageAConfig)])
def test_tiny_configs_run(cls, cfg_cls):
    model = cls(cfg_cls.tiny()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if cls is StageC:
            x = torch.randn(2, 16, 3, 4, generator=g)
            out = model(x, torch.rand(2, generator=g), torch.randn(2, 5, 24, generator=g))
        elif cls is StageB:
            x = torch.randn(2, 4, 8, 12, generator=g)
            out = model(x, torch.rand(2, generator=g), torch.randn(2, 16, 3, 3, generator=g),
                        torch.randn(2, 5, 20, generator=g))
        else:
            x = torch.rand(2, 3, 16, 12, generator=g)
            out = model.decode(model.encode(x))
    assert type(out) is torch.Tensor and out.shape == x.shape and torch.isfinite(out).all()


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by nhead"):
        StageCConfig(c=100, nhead=3)
    with pytest.raises(ValueError, match="nhead has 3 entries"):
        StageBConfig(nhead=[-1, 2, 2])
    with pytest.raises(ValueError, match="attention but nhead"):
        StageBConfig(c_hidden=[8], nhead=[-1], blocks=[1], level_config=["CTA"], inject_effnet=[False])
