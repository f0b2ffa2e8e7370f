"""Test set-up shared by every test.

With no CUDA GPU, Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before Triton is first imported (it decides at decoration time), hence here, first.
`DEVICE` is where kernel tests run: "cuda" on a GPU machine, else "cpu".
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


def pytest_report_header(config):
    from wuerstchen_fast._extension import build_info

    return [f"wuerstchen_fast: device={DEVICE} TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} "
            f"_C={build_info()}"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: on a machine without one they are deselected (and counted in
    the summary), not skipped one by one; bench/gpu_check.sh runs them on a GPU."""
    if DEVICE == "cuda":
        return
    gpu = [item for item in items if item.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
        config._wf_gpu_only = len(gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_wf_gpu_only", 0)
    if n:
        terminalreporter.write_line(f"wuerstchen_fast: {n} GPU-only tests (marked cuda) not run: no CUDA device here")
