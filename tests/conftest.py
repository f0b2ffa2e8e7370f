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
