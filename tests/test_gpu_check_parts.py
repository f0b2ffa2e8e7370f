"""The parts of bench/gpu_check.sh: the pytest plugin (family-first order, deadline, per-test lines) and
the report's verdicts and output-folder limits."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "bench" / "gpu_check_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pytest(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.gpu_check_plugin", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def suite(tmp_path):
    """Two families of three tests per backend, one file that is not a family, one slow test."""
    for fam in ("a", "b"):
        (tmp_path / f"test_fam_{fam}.py").write_text(
            "import pytest\n"
            "@pytest.mark.parametrize('backend', ['triton', 'cuda'])\n"
            "@pytest.mark.parametrize('n', [1, 2, 3])\n"
            "def test_op(n, backend):\n    assert n > 0\n")
    (tmp_path / "test_other.py").write_text(
        "import time, pytest\n"
        "@pytest.mark.cuda\ndef test_marked():\n    pass\n"
        "def test_plain():\n    pass\n"
        "def test_zz_slow():\n    time.sleep(1.5)\n")
    (tmp_path / "conftest.py").write_text(
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'cuda: needs a GPU')\n")
    return tmp_path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_families_first_and_non_family_files_keep_only_cuda_tests(suite):
    results = suite / "r.jsonl"
    r = _pytest(suite, "--wf-order", "families", "--wf-families", "test_fam_*.py", "--wf-results", str(results),
                "test_fam_a.py", "test_fam_b.py", "test_other.py")
    assert r.returncode == 0, r.stdout + r.stderr
    ran = [x["nodeid"] for x in _lines(results) if "nodeid" in x]
    assert "test_other.py::test_marked" in ran and "test_other.py::test_plain" not in ran  # deselected
    # Round-robin over (file, backend): all four groups run once before any runs twice.
    first = ran[:5]
    assert first == ["test_fam_a.py::test_op[1-triton]", "test_fam_a.py::test_op[1-cuda]",
                     "test_fam_b.py::test_op[1-triton]", "test_fam_b.py::test_op[1-cuda]", "test_other.py::test_marked"]
    assert len(ran) == 13 and all(x["outcome"] == "passed" for x in _lines(results) if "nodeid" in x)


def test_deadline_stops_cleanly_and_says_what_did_not_run(suite):
    results, junit = suite / "r.jsonl", suite / "junit.xml"
    r = _pytest(suite, "--wf-deadline", "1", "--wf-results", str(results), "--junitxml", str(junit),
                "test_other.py::test_zz_slow", "test_fam_a.py")
    assert r.returncode == 2, r.stdout  # interrupted, as after Ctrl-C
    lines = _lines(results)
    assert [x["nodeid"] for x in lines if "nodeid" in x] == ["test_other.py::test_zz_slow"]
    stopped = next(x for x in lines if x.get("event") == "stopped")
    assert stopped["not_run"] == 6 and "deadline 1 s" in stopped["reason"]
    assert lines[-1]["event"] == "finished" and junit.exists()  # the reports are still written
    counts = _report().test_counts(lines)
    assert counts["passed"] == 1 and counts["not_run"] == 6 and counts["stopped"]
    assert _report().stage_status("tests", 2, lines, optional=False) == "partial"


def test_failures_are_recorded_with_their_error(tmp_path):
    (tmp_path / "test_bad.py").write_text("def test_wrong():\n    assert 1 == 2, 'kernel off by one'\n")
    results = tmp_path / "r.jsonl"
    r = _pytest(tmp_path, "--wf-results", str(results), "test_bad.py")
    assert r.returncode == 1
    lines = _lines(results)
    counts = _report().test_counts(lines)
    assert counts["failed"] == 1 and "kernel off by one" in counts["failures"][0]["error"]
    assert _report().stage_status("tests", 1, lines, optional=False) == "failed"


def test_stage_status_rules(tmp_path):
    rep = _report()
    assert rep.stage_status("build", 0, [], False) == "ok"
    assert rep.stage_status("build", 1, [], False) == "failed"
    assert rep.stage_status("bench", 124, [], False) == "timeout"
    assert rep.stage_status("compile", 137, [], True) == "optional-timeout"
    assert rep.stage_status("tests", 125, [], False) == "skipped"
    # "Not available" is accepted only while the tree has no tune module; once it exists, the stage must run.
    (tmp_path / "wuerstchen_fast").mkdir()
    assert rep.stage_status("verify", 3, [], False, tree=tmp_path) == "not-available"
    (tmp_path / "wuerstchen_fast" / "tune.py").write_text("")
    assert rep.stage_status("verify", 3, [], False, tree=tmp_path) == "failed"
    assert rep.stage_status("tests", 0, [{"event": "collected", "tests": 0}], False) == "failed"  # no test ran


def test_output_folder_limits(tmp_path):
    rep = _report()
    for i in range(8):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert rep.output_problems(tmp_path) == []
    (tmp_path / "f8.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = "\n".join(rep.output_problems(tmp_path))
    assert "11 files, over 8" in problems and "deeper than 2 folders" in problems and "bad name.txt" in problems
