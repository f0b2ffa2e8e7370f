"""pytest-benchmark infrastructure shared by every bench/bench_*.py (see bench/README.md).

Collects `bench_*.py` files (pytest's default only collects test_*.py), and offers fixtures:

    bench_device   "cuda" on a GPU machine, else "cpu" (WF_BENCH_DEVICE overrides)
    bench_size     "released" on a GPU, "small" on a CPU (WF_BENCH_SIZE overrides)
    ceilings       {copy_gbps, matmul_tflops, ...} measured once per session on this device
    op_provider    op_provider(op_name, provider, *args) -> callable, or a clean skip with the
                   registry's reasons (providers: bench.common.OP_PROVIDERS)
    measure        measure(benchmark, fn, input_sets, group=, provider=, baseline=, flops=, bytes=)
                   times fn over rotating inputs and fills the row's extra_info
    n_input_sets   n_input_sets(bytes_per_set) -> how many input sets overflow the L2 cache

Hooks: every result JSON gets machine_info["wf"] (device, versions, git revision, ceilings, the
command), the speedup of each row against its group's baseline, and no absolute paths of the
machine that ran it.
"""
from __future__ import annotations

import pytest

from bench import common


def pytest_collect_file(file_path, parent):
    # Paths named on the command line are collected by pytest itself whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    return [f"wuerstchen_fast bench: device={common.device_name()} size={common.SIZE} rev={common.git_revision()}"]


@pytest.fixture(scope="session")
def bench_device() -> str:
    return common.DEVICE


@pytest.fixture(scope="session")
def bench_size() -> str:
    return common.SIZE


@pytest.fixture(scope="session")
def ceilings() -> dict:
    return common.ceilings()


@pytest.fixture
def op_provider():
    return common.op_callable


@pytest.fixture
def measure():
    return common.measure


@pytest.fixture
def n_input_sets():
    return common.n_input_sets


# ------------------------------------------------------------------------------- result-file hooks

def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.pop("node", None)  # the host name says nothing about the hardware
    machine_info["wf"] = common.machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    common.fill_speedups(output_json.get("benchmarks", []))
    scrubbed = common.scrub(output_json)
    output_json.clear()
    output_json.update(scrubbed)
