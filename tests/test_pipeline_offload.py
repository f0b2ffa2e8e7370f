"""Model CPU offload through its movement protocol: each module visits the execution device only while
it runs, one at a time, in the order of the call. On this CPU-only machine the execution device is
`cpu:0`, which moves nothing but is told apart from the CPU home (`cpu`) in the record."""
import pytest
import torch

from _pipeline_folders import tiny_repos  # noqa: F401  (fixture)
from wuerstchen_fast.pipeline import load_pipeline, offload

GPU = torch.device("cpu", 0)  # stands in for cuda:0


@pytest.fixture
def moves(monkeypatch):
    record = []
    real = offload.move_module

    def recording(module, device):
        record.append((module, torch.device(device)))
        real(module, device)

    monkeypatch.setattr(offload, "move_module", recording)
    return record


def test_offload_moves_each_stage_in_and_out_in_order(tiny_repos, moves):
    plain = load_pipeline(*tiny_repos, device="cpu")
    pipe = load_pipeline(*tiny_repos, device="cpu")
    names = {id(m): n for n, m in [("prior text encoder", pipe.prior_text.model), ("Stage C", pipe.prior),
                                   ("decoder text encoder", pipe.decoder_text.model), ("Stage B", pipe.decoder),
                                   ("Stage A", pipe.vqgan)]}
    assert pipe.enable_model_cpu_offload(device=GPU) is pipe
    assert sorted(names[id(m)] for m, d in moves) == sorted(names.values())  # all sent home first
    assert all(d == torch.device("cpu") for _, d in moves)
    moves.clear()

    kw = dict(prompt="a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
              prior_guidance_scale=4.0, decoder_guidance_scale=0.0, seed=0, output_type="pt", progress=False)
    images = pipe(**kw).images
    events = [(names[id(m)], "in" if d == GPU else "out") for m, d in moves]
    assert events == [
        ("prior text encoder", "in"), ("prior text encoder", "out"),  # the prompt
        ("prior text encoder", "in"), ("prior text encoder", "out"),  # the negative (guidance on)
        ("Stage C", "in"), ("Stage C", "out"),
        ("decoder text encoder", "in"), ("decoder text encoder", "out"),
        ("Stage B", "in"), ("Stage B", "out"),
        ("Stage A", "in"), ("Stage A", "out"),
    ]
    assert pipe.device == GPU and torch.equal(images, plain(**kw).images)
    with pytest.raises(ValueError, match="model CPU offload is on"):
        pipe.to("cpu")


def test_offload_moves_once_for_nested_and_shared_use(moves):
    m = torch.nn.Linear(2, 2)
    a = offload.ModelOffload(["m"], lambda name: m, GPU)
    b = offload.ModelOffload(["m"], lambda name: m, GPU)  # a second pipeline sharing the module
    moves.clear()
    with a.placed("m"):
        with b.placed("m"):
            pass
        assert [d for _, d in moves] == [GPU]  # still in use by the outer block: not sent home
    assert [d for _, d in moves] == [GPU, torch.device("cpu")]


def test_offload_needs_a_device_that_exists(tiny_repos, monkeypatch):
    pipe = load_pipeline(*tiny_repos, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine, also on a GPU runner
    with pytest.raises(ValueError, match="no CUDA device is available"):
        pipe.enable_model_cpu_offload()
