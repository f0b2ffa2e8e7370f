"""bench/make_table.py: RESULTS.md from result JSON files, newest first, one section per device."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _make_table():
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "bench" / "make_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(device, device_type, when, rev, rows):
    return {
        "datetime": when,
        "machine_info": {"wf": {"device": device, "device_type": device_type, "git_revision": rev, "size": "small",
                                "torch": "2.x", "command": "bench/run_cpu.sh",
                                "ceilings": {"copy_gbps": 10.0, "matmul_tflops": 0.1, "copy": "128 MiB fp32",
                                             "matmul": "float32 2048^3"}}},
        "benchmarks": [{"group": g, "name": f"test[{p}]", "stats": {"median": m, "min": m * 0.9},
                        "extra_info": dict(provider=p, baseline=p == "eager", **extra)} for g, p, m, extra in rows],
    }


def test_table_sections_order_and_columns(tmp_path):
    mt = _make_table()
    res = tmp_path / "results"
    res.mkdir()
    rows = [("ln", "eager", 2e-3, dict(gbps=5.0, frac_copy_bw=0.5, speedup_vs_baseline=1.0, peak_mem_bytes=2 ** 20)),
            ("ln", "cpu", 1e-3, dict(gbps=10.0, frac_copy_bw=1.0, speedup_vs_baseline=2.0))]
    (res / "a.json").write_text(json.dumps(_result("CPU X", "cpu", "2026-01-01T00:00:00", "old111", rows)))
    (res / "b.json").write_text(json.dumps(_result("CPU X", "cpu", "2026-02-01T00:00:00", "new222", rows)))
    (res / "c.json").write_text(json.dumps(_result("NVIDIA H100", "cuda", "2026-01-15T00:00:00", "gpu333", rows)))
    out = tmp_path / "RESULTS.md"
    assert mt.main(["--results", str(res), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.index("## CPU X (CPU)") < text.index("## NVIDIA H100 (GPU)")  # device with the newest run first
    assert text.index("new222") < text.index("old111")  # newest run first within a device
    assert "Command: `bench/run_cpu.sh`" in text and "CPU timings: not GPU results." in text
    assert "| ln | cpu | 1 ms | 900 µs | 10 GB/s | 100.0% copy | - | 2.00x |" in text
    assert "| ln | eager | 2 ms | 1.8 ms | 5 GB/s | 50.0% copy | 1 MiB | baseline |" in text


def test_missing_results_folder_is_an_error(tmp_path):
    assert _make_table().main(["--results", str(tmp_path / "nope"), "--out", str(tmp_path / "R.md")]) == 2


def test_committed_results_render():
    """Every committed result file parses and renders (the table is regenerated from them)."""
    mt = _make_table()
    runs = mt.load_runs(ROOT / "bench" / "results")
    text = mt.render(runs)
    for r in runs:
        assert r["file"] in text


def _gpu_result():
    """A result shaped like bench/gpu_check.sh's on an H200 (synthetic numbers, for the layout only)."""
    def row(name, group, provider, median, **extra):
        return {"name": name, "group": group, "stats": {"median": median, "min": median * 0.95},
                "extra_info": dict(provider=provider, baseline=provider in ("diffusers", "eager"), **extra)}
    c, e = "stage_c step B=2(CFG) 24x24 released bfloat16", "e2e sample 1024x1024 prior 60 + decoder 12 steps"
    rows = [row("test_stage_c_step[diffusers]", c, "diffusers", 10e-3, peak_mem_bytes=3 * 2 ** 30),
            row("test_stage_c_step[auto]", c, "auto", 6e-3, peak_mem_bytes=2 * 2 ** 30),
            row("test_stage_c_step[auto-cudagraphs]", c, "auto-cudagraphs", 4e-3, peak_mem_bytes=2 * 2 ** 30),
            row("test_e2e_sample[60+12-diffusers]", e, "diffusers", 1.2, flops=175e12),
            row("test_e2e_sample[60+12-auto]", e, "auto", 0.5, flops=175e12),
            row("test_e2e_sample[60+12-auto-cudagraphs]", e, "auto-cudagraphs", 0.3, flops=175e12),
            row("test_grn[eager-stage_c]", "grn fwd 2x24x24x6144 bfloat16 channels_last", "eager", 1e-4,
                gbps=1500.0, frac_copy_bw=0.35),
            row("test_grn[cuda-stage_c]", "grn fwd 2x24x24x6144 bfloat16 channels_last", "cuda", 4e-5,
                gbps=3600.0, frac_copy_bw=0.84),
            row("test_ddpm_step[triton-stage_b]", "ddpm_step stage_b 1x4x256x256 bfloat16", "triton", 1e-5,
                gbps=2000.0, frac_copy_bw=0.47)]
    return {"datetime": "2026-12-01T10:00:00", "benchmarks": rows,
            "machine_info": {"wf": {"device": "NVIDIA H200", "device_type": "cuda", "git_revision": "gpu444",
                                    "size": "released", "torch": "2.11.0+cu130", "command": "bench/gpu_check.sh",
                                    "ceilings": {"copy_gbps": 4300.0, "matmul_tflops": 790.0, "copy": "1024 MiB fp32",
                                                 "matmul": "bfloat16 8192^3"},
                                    "gpu_check": {"stages": {"build": {"status": "ok", "seconds": 71, "budget": 90},
                                                             "tests": {"status": "partial", "seconds": 120,
                                                                       "budget": 120}},
                                                  "tests": {"passed": 300, "failed": 1, "skipped": 2, "not_run": 448,
                                                            "collected": 751, "stopped": "deadline 100 s reached",
                                                            "failures": [{"nodeid": "tests/test_x.py::test_y[cuda]"}]}}}}}


def test_gpu_run_gets_a_headline_with_its_targets(tmp_path):
    mt = _make_table()
    res = tmp_path / "results"
    res.mkdir()
    (res / "nvidia-h200-20261201-1000-gpu444.json").write_text(json.dumps(_gpu_result()))
    out = tmp_path / "RESULTS.md"
    assert mt.main(["--results", str(res), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## NVIDIA H200 (GPU)" in text and "CPU timings" not in text
    head = text[text.index("#### Headline"):text.index("#### Every row")]
    # Best of ours against diffusers eager: 10 ms / 4 ms = 2.5x >= 2x; 1.2 s / 0.3 s = 4x >= 3x.
    assert "| Stage C step (v2, batch 2 for CFG) | 10 ms | 6 ms | 4 ms | 2.50x | 3 GiB / 2 GiB | >= 2x: reached |" in head
    assert "| sample() 1024x1024, 60+12 steps | 1.2 s | 500 ms | 300 ms | 4.00x | - / - | >= 3x: reached |" in head
    # 175 TFLOP at 790 TFLOP/s is a 222 ms floor; 300 ms is 1.35x of it, within 1.6x.
    assert "FLOP floor 222 ms" in head and "= 1.35x the floor; target <= 1.6x: reached" in head
    assert "| grn fwd 2x24x24x6144 bfloat16 channels_last | cuda | 3600 GB/s | 84.0% | reached |" in head
    assert "| ddpm_step stage_b 1x4x256x256 bfloat16 | triton | 2000 GB/s | 47.0% | **missed** |" in head
    assert "| tests | partial | 120 | 120 |" in head
    assert "300 passed, 1 failed, 2 skipped, 448 not run of 751 (deadline 100 s reached)" in head
    assert "- failed: `tests/test_x.py::test_y[cuda]`" in head
    assert "| stage_c step B=2(CFG) 24x24 released bfloat16 | auto-cudagraphs | 4 ms |" in text  # every row follows
