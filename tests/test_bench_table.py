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
