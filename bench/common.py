"""Measurement machinery of the benchmark suite (the fixtures in bench/conftest.py wrap it).

What a row records (in pytest-benchmark's `extra_info`, so it lands in the JSON):
    provider, baseline      who ran, and whether this row is its group's baseline
    flops, bytes            counts written in the bench (or counted by torch's FlopCounterMode)
    tflops, gbps            achieved rates from the median time
    frac_matmul_peak        tflops / the matmul ceiling measured in this session
    frac_copy_bw            gbps / the copy bandwidth measured in this session
    peak_mem_bytes          CUDA: max_memory_allocated during one call, minus what was allocated before
                            CPU: growth of the resident-set high-water mark during one call
    first_call_s            the first call (compilation, autotuning, lazy init): excluded from timing
    speedup_vs_baseline     baseline median / this median, same run (filled at the end of the session)

Timing: warm-up first; each timed call ends with `torch.cuda.synchronize()` on a GPU, so the host
clock sees the device work; calls rotate through several input sets (enough to overflow L2 for
memory-bound ops) so no run reads its inputs from cache; the median over the rounds is reported.
"""
from __future__ import annotations

import itertools
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

OP_PROVIDERS = ("eager", "compile", "triton", "cuda", "cpu")
"""Providers of a per-op bench: the pure-PyTorch reference (the baseline), that reference under
torch.compile (Inductor's fusion), and each registered backend of the op."""


def _device() -> str:
    d = os.environ.get("WF_BENCH_DEVICE")
    if d:
        return d
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = _device()
SIZE = os.environ.get("WF_BENCH_SIZE") or ("released" if DEVICE == "cuda" else "small")
"""'released' (the v2 sizes, for a GPU), 'small' (configs a 2-core CPU runs in minutes) or 'tiny' (the
parity tests' models: rehearsing bench/gpu_check.sh on a CPU, not for timing)."""


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- device facts

def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def device_slug() -> str:
    """File-name form of the device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2t'."""
    name = device_name().lower().replace("threads", "t")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def git_revision() -> str:
    rev = os.environ.get("WF_GIT_REV")
    if rev:
        return rev
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def l2_bytes() -> int:
    if DEVICE == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    return 32 << 20  # a generous guess at a CPU's last-level cache share


def n_input_sets(bytes_per_set: int, most: int = 16) -> int:
    """How many distinct input sets to rotate through so that together they are 3x the L2 (at least 2)."""
    return max(2, min(most, math.ceil(3 * l2_bytes() / max(1, bytes_per_set))))


# --------------------------------------------------------------------------------------- ceilings

def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


_CEILINGS: dict = {}


def ceilings() -> dict:
    """The device's measured ceilings, once per session: a large device-to-device copy (bytes read +
    written) and a large matmul (bf16 8192^3 on a GPU, fp32 2048^3 on a CPU)."""
    if _CEILINGS:
        return _CEILINGS
    with torch.no_grad():
        if DEVICE == "cuda":
            n, reps, m, dtype = 1 << 28, 20, 8192, torch.bfloat16  # 1 GiB fp32 copy
        else:
            n, reps, m, dtype = 1 << 25, 5, 2048, torch.float32  # 128 MiB copy
        src = torch.rand(n, device=DEVICE)
        dst = torch.empty_like(src)
        t_copy = _median_time(lambda: dst.copy_(src), reps)
        del src, dst
        a = torch.randn(m, m, device=DEVICE, dtype=dtype)  # random data: zeros run faster than real data
        b = torch.randn(m, m, device=DEVICE, dtype=dtype)
        t_mm = _median_time(lambda: a @ b, reps)
        del a, b
    _CEILINGS.update(copy_gbps=2 * n * 4 / t_copy / 1e9, matmul_tflops=2 * m ** 3 / t_mm / 1e12,
                     matmul=f"{str(dtype).replace('torch.', '')} {m}^3", copy=f"{n * 4 >> 20} MiB fp32")
    return _CEILINGS


def count_flops(fn: Callable, *args) -> float:
    """FLOPs of one call of fn(*args) by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------- peak memory

class PeakMemory:
    """Peak memory of what runs inside the block (see the module docstring for what is measured)."""

    def __init__(self):
        self.bytes: int | None = None
        self.kind = "cuda_max_allocated_delta" if DEVICE == "cuda" else "rss_high_water_delta"

    @staticmethod
    def _rss_kib(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self._before = self._rss_kib("VmRSS")
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._before
        elif self._before is not None:
            hwm = self._rss_kib("VmHWM")
            self.bytes = None if hwm is None else max(0, hwm - self._before) * 1024
        return False


# --------------------------------------------------------------------------------------- providers

def op_callable(op_name: str, provider: str, *args, **kwargs) -> Callable:
    """A callable running op `op_name` the way `provider` does, or pytest.skip with the registry's reasons.

    eager    the op's pure-PyTorch reference (the registry's torch implementation): the baseline
    compile  that reference under torch.compile(fullgraph=True, dynamic=False)
    triton / cuda / cpu   the public op with backend=<provider> (dispatch included, as users call it)
    """
    from wuerstchen_fast import ops
    from wuerstchen_fast.ops import registry

    spec = registry.get_op(op_name)
    ref = spec.impls["torch"].fn
    if provider == "eager":
        return ref
    if provider == "compile":
        return torch.compile(ref, fullgraph=True, dynamic=False)
    if provider not in registry.BACKENDS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {OP_PROVIDERS}")
    reasons = spec.reasons(provider, *args, **kwargs)
    if provider == "triton" and not reasons and DEVICE != "cuda":
        reasons = ["Triton's interpreter on CPU is for correctness, its timings mean nothing"]
    if reasons:
        pytest.skip(f"{op_name}/{provider}: " + "; ".join(reasons))
    fn = getattr(ops, op_name, None) or spec.impls[provider].fn

    def call(*a, **k):
        return fn(*a, backend=provider, **k)

    return call


def skip_unless_backend_available(provider: str, op_name: str = "layer_norm_2d") -> None:
    """Skip a model-level provider whose backend cannot run here at all (reasons from the registry)."""
    from wuerstchen_fast.ops import registry

    reasons = registry.get_op(op_name).impls[provider].available()
    if provider == "triton" and not reasons and DEVICE != "cuda":
        reasons = ["Triton's interpreter on CPU is for correctness, its timings mean nothing"]
    if reasons:
        pytest.skip(f"backend {provider}: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------- measuring

_MEDIANS: dict = {}  # (group, provider) -> median seconds, and (group, None) -> baseline provider


def _budget() -> float:
    return float(os.environ.get("WF_BENCH_BUDGET_S", "1.0"))


def measure(benchmark, fn: Callable, input_sets: Sequence[tuple], *, group: str, provider: str,
            baseline: bool = False, flops: float | None = None, bytes: float | None = None,
            rounds: int | None = None, min_rounds: int = 3, max_rounds: int = 1000, **info):
    """Time `fn(*inputs)` rotating through `input_sets`; record the row's extra_info. Returns the
    first call's output (for a sanity check by the caller)."""
    sets = itertools.cycle(input_sets)

    def call():
        out = fn(*next(sets))
        sync()
        return out

    t0 = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - t0
    t0, n = time.perf_counter(), 0
    while n < 2 or (time.perf_counter() - t0 < 0.1 * _budget() and n < 20):  # warm-up
        call()
        n += 1
    per_call = (time.perf_counter() - t0) / n
    with PeakMemory() as peak:
        call()
    if rounds is None:
        rounds = int(min(max_rounds, max(min_rounds, _budget() / max(per_call, 1e-9))))

    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, device=DEVICE, size=SIZE,
                                input_sets=len(input_sets), first_call_s=round(first_s, 6),
                                loadavg_1min=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                                peak_mem_bytes=peak.bytes, peak_mem_kind=peak.kind, **info)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    if median:
        ceil = ceilings()
        ei = benchmark.extra_info
        if flops:
            ei.update(flops=flops, tflops=flops / median / 1e12,
                      frac_matmul_peak=flops / median / 1e12 / ceil["matmul_tflops"])
        if bytes:
            ei.update(bytes=bytes, gbps=bytes / median / 1e9, frac_copy_bw=bytes / median / 1e9 / ceil["copy_gbps"])
        _MEDIANS[(group, provider)] = median
        if baseline:
            _MEDIANS[(group, None)] = provider
        base = _MEDIANS.get((group, _MEDIANS.get((group, None))))
        if base:
            ei.update(speedup_vs_baseline=base / median, baseline_provider=_MEDIANS[(group, None)])
    return first


def fill_speedups(benchmarks: list) -> None:
    """speedup_vs_baseline for every row of the JSON (baseline median / row median, same group)."""
    base = {}
    for b in benchmarks:
        ei = b.get("extra_info", {})
        if ei.get("baseline"):
            base[b.get("group")] = (ei.get("provider"), b["stats"]["median"])
    for b in benchmarks:
        ei = b.setdefault("extra_info", {})
        if b.get("group") in base and b["stats"]["median"]:
            prov, med = base[b.get("group")]
            ei["baseline_provider"], ei["speedup_vs_baseline"] = prov, med / b["stats"]["median"]


# --------------------------------------------------------------------------------------- machine info

def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    from wuerstchen_fast._extension import build_info

    info = dict(
        device=device_name(), device_type=DEVICE, device_slug=device_slug(), size=SIZE,
        torch=torch.__version__, triton=_version("triton"), cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        diffusers=_version("diffusers"), transformers=_version("transformers"),
        python=platform.python_version(), torch_threads=torch.get_num_threads(),
        git_revision=git_revision(), extension=build_info(), ceilings=dict(ceilings()),
        loadavg=" ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else None,
        command=os.environ.get("WF_BENCH_COMMAND") or "python -m pytest " + " ".join(sys.argv[1:]),
    )
    if DEVICE == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1), driver=_driver())
    return info


def _driver() -> str | None:
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       text=True, stderr=subprocess.DEVNULL).strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def scrub(obj, replacements: dict | None = None):
    """Replace this machine's absolute paths (repo root, home, temp) in every string of a JSON tree."""
    if replacements is None:
        replacements = {str(ROOT): "<repo>", str(Path.home()): "~"}
        import tempfile

        replacements[tempfile.gettempdir()] = "<tmp>"
    if isinstance(obj, dict):
        return {k: scrub(v, replacements) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, replacements) for v in obj]
    if isinstance(obj, str):
        for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
            if old and old not in ("/", "."):
                obj = obj.replace(old, new)
        return obj
    return obj
