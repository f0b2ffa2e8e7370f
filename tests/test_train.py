"""Training entry points on CPU: each stage learns, fused == eager within tolerance, resume is exact,
checkpoints are atomic, and exported weights load with the model loaders."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import first_last, make_stage_a, make_tokenizer, tiny_overrides
from wuerstchen_fast.models import load_stage_b, load_stage_c
from wuerstchen_fast.training import load_config, train
from wuerstchen_fast.training.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    return {"tokenizer": make_tokenizer(d / "tokenizer"), "stage_a": make_stage_a(d / "stage_a")}


def _cfg(stage, out, assets, *extra):
    ov = tiny_overrides(stage, out) + [f"text_encoder.tokenizer={assets['tokenizer']}",
                                       f"stage_a.path={assets['stage_a']}"] + list(extra)
    return load_config(None, ov)


@pytest.mark.parametrize("stage", ["stage_c", "stage_b", "stage_a"])
def test_each_stage_learns(stage, tmp_path, assets):
    r = train(_cfg(stage, tmp_path / stage, assets, "train.steps=40"))
    assert len(r.losses) == 40 and r.step == 40
    first, last = first_last(r.losses)
    assert last < 0.8 * first, f"{stage}: loss did not decrease: first 8 steps {first:.4f}, last 8 {last:.4f}"
    assert (tmp_path / stage / "model" / "model.safetensors").is_file()
    assert (tmp_path / stage / "metrics.jsonl").read_text().count("\n") == 40


def test_stage_a_with_discriminator_runs(tmp_path, assets):
    r = train(_cfg("stage_a", tmp_path, assets, "train.steps=4", "objective.disc_weight=0.1", "objective.disc_start=2",
                   "log.sample_every=4"))
    assert all(torch.isfinite(torch.tensor(r.losses)))
    assert (tmp_path / "samples" / "step_00000004.png").is_file()


def _require(backend: str):
    from wuerstchen_fast.ops.registry import BackendUnavailableError, resolve

    try:
        resolve("layer_norm_2d", torch.randn(1, 8, 2, 2), backend=backend)
    except BackendUnavailableError as e:
        pytest.skip(f"backend {backend} cannot run here: {e}")


# Tolerance of fused vs eager loss curves: a fused kernel differs from the reference by float32 summation
# order (~1e-7 relative per op); through a few AdamW steps at lr 2e-3 that grows to ~1e-5 relative, so
# 1e-3 leaves room and still catches a wrong kernel (which shows up at >= 1e-2 in the first step).
CURVE_RTOL, CURVE_ATOL = 1e-3, 1e-6


@pytest.mark.parametrize("fused,steps", [("cpu,torch", 10), ("triton,torch", 2)])
def test_fused_backend_matches_eager(fused, steps, tmp_path, assets):
    """Same loss curve with the reference ops (`torch`) and with the fused ops: the cpu extension where it has
    the op (else the reference), and Triton (under the interpreter on CPU: slow, so only 2 steps)."""
    _require(fused.split(",")[0])
    eager = train(_cfg("stage_c", tmp_path / "eager", assets, f"train.steps={steps}", "train.backend=torch"))
    got = train(_cfg("stage_c", tmp_path / "fused", assets, f"train.steps={steps}", f"train.backend={fused}"))
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(eager.losses), rtol=CURVE_RTOL, atol=CURVE_ATOL)


@pytest.mark.parametrize("stage", ["stage_b", "stage_c"])
def test_resume_is_exact(stage, tmp_path, assets):
    """2N steps straight == N steps, stop (as a kill after the checkpoint), --resume, N steps: identical fp32
    parameters, EMA, optimizer moments and losses."""
    n = 3
    straight = train(_cfg(stage, tmp_path / "straight", assets, f"train.steps={2 * n}", "log.checkpoint_every=1"))
    first = train(_cfg(stage, tmp_path / "resumed", assets, f"train.steps={2 * n}", "log.checkpoint_every=1"), stop_after=n)
    assert first.stopped_early and first.model_dir is None
    (tmp_path / "resumed" / "checkpoints" / "step_99999999.tmp").mkdir()  # a kill mid-write: must be ignored
    second = train(_cfg(stage, tmp_path / "resumed", assets, f"train.steps={2 * n}", "log.checkpoint_every=1"), resume=True)
    assert first.losses + second.losses == straight.losses
    a = latest_checkpoint(tmp_path / "straight")
    b = latest_checkpoint(tmp_path / "resumed")
    assert a.name == b.name == f"step_{2 * n:08d}"
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}: {k} differs after resume"


def test_exported_weights_load_with_model_loaders(tmp_path, assets):
    train(_cfg("stage_b", tmp_path / "b", assets, "train.steps=2"))
    train(_cfg("stage_c", tmp_path / "c", assets, "train.steps=2", f"compressor.path={tmp_path / 'b' / 'compressor'}",
               f"text_encoder.path={tmp_path / 'b' / 'text_encoder'}"))
    ck = latest_checkpoint(tmp_path / "c")
    ema = load_file(str(ck / "ema.safetensors"))
    model = load_stage_c(tmp_path / "c" / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[f"model.{k}"]), k
    load_stage_c(ck / "model")
    load_stage_b(tmp_path / "b" / "model")
    # the text encoder saved by the Stage B run is the one the Stage C run used (same weights)
    assert (tmp_path / "c" / "text_encoder" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "text_encoder" / "model.safetensors").read_bytes()


def test_resume_without_checkpoint_fails_clearly(tmp_path, assets):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg("stage_c", tmp_path, assets, "train.steps=2"), resume=True)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(None, ["optim.learning_rate=1"])


def test_grad_checkpointing_same_curve_same_keys(tmp_path, assets):
    ref = train(_cfg("stage_b", tmp_path / "ref", assets, "train.steps=3"))
    ck = train(_cfg("stage_b", tmp_path / "ck", assets, "train.steps=3", "train.grad_checkpointing=true"))
    torch.testing.assert_close(torch.tensor(ck.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-7)
    assert load_file(str(tmp_path / "ck" / "model" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "ref" / "model" / "model.safetensors")).keys()


def test_effnet_space_fold_is_exact():
    """A decoder trained on (e + 1) / 42 and folded takes the raw e and computes the same function."""
    from wuerstchen_fast.models import StageB, StageBConfig
    from wuerstchen_fast.training.objectives import effnet_input, fold_effnet_space

    torch.manual_seed(0)
    model = StageB(StageBConfig.tiny()).eval()
    for m in model.effnet_mappers:  # non-trivial biases, so the fold's bias term is exercised
        if m is not None:
            torch.nn.init.normal_(m.bias)
    cfg = model.config
    x, r = torch.randn(2, cfg.c_in, 16, 16), torch.rand(2)
    e = torch.randn(2, cfg.effnet_embd, 3, 3) * 42 - 1
    clip = torch.randn(2, 4, cfg.clip_embd)
    with torch.no_grad():
        want = model(x, r, effnet_input(e, "prior"), clip)
        got = fold_effnet_space(model)(x, r, e, clip)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_stage_b_from_a_latent_cache_learns_resumes_and_exports_folded(tmp_path, assets):
    """data.cache_size: batches come from encoded samples; the run learns, resumes exactly and exports a
    decoder that (with effnet_space=prior) equals the trained one applied to (e + 1) / 42."""
    from wuerstchen_fast.training.objectives import effnet_input

    extra = ("data.cache_size=12", "objective.train_compressor=false", "objective.effnet_space=prior")
    r = train(_cfg("stage_b", tmp_path / "run", assets, "train.steps=40", *extra))
    first, last = first_last(r.losses)
    assert last < 0.8 * first, f"loss did not decrease: first 8 steps {first:.4f}, last 8 {last:.4f}"
    straight = train(_cfg("stage_b", tmp_path / "s", assets, "train.steps=4", "log.checkpoint_every=1", *extra))
    train(_cfg("stage_b", tmp_path / "r", assets, "train.steps=4", "log.checkpoint_every=1", *extra), stop_after=2)
    resumed = train(_cfg("stage_b", tmp_path / "r", assets, "train.steps=4", "log.checkpoint_every=1", *extra), resume=True)
    assert resumed.losses == straight.losses[2:]
    # the export: raw-e decoder == trained decoder on the prior-space input
    ema = load_file(str(latest_checkpoint(tmp_path / "s") / "ema.safetensors"))
    exported = load_stage_b(tmp_path / "s" / "model").eval()
    trained = load_stage_b(tmp_path / "s" / "model").eval()
    trained.load_state_dict({k[len("model."):]: v for k, v in ema.items() if k.startswith("model.")}, strict=False)
    cfg = exported.config
    x, t, e = torch.randn(1, cfg.c_in, 8, 8), torch.rand(1), torch.randn(1, cfg.effnet_embd, 2, 2) * 42 - 1
    clip = torch.randn(1, 4, cfg.clip_embd)
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t, e, clip), trained(x, t, effnet_input(e, "prior"), clip),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra,match", [
    (("stage=stage_c", "data.cache_size=8"), "needs stage='stage_b'"),
    (("data.cache_size=8", "objective.train_compressor=true"), "train_compressor=false"),
    (("data.cache_size=8", "objective.train_compressor=false", "log.sample_every=2"), "set one of them to 0"),
    (("objective.effnet_space=latent",), "effnet_space must be"),
    (("data.kind=folder", "data.short_captions=0.5"), "short_captions applies to"),
])
def test_config_rejects_inconsistent_cache_and_effnet_options(extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["stage=stage_b", *extra])
