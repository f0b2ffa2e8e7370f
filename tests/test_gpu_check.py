"""bench/gpu_check.sh: the plan fits one device call, bad arguments speak, and the whole script runs on
this CPU at tiny shapes (--rehearse), so it cannot rot before a GPU session uses it."""
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
WHEELS = ROOT / "bench" / "prepare_wheels.sh"
STAGES = ["env", "wheels", "build", "verify", "tests", "bench", "compile"]
DEVICE_CALL_S, PLAN_S = 600, 540  # one device command may run 10 minutes; the plan keeps one minute spare

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(*args, cwd=None, env=None, timeout=120):
    return subprocess.run(["bash", str(Path(cwd or ROOT) / "bench" / "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def plan_budgets(text: str) -> dict:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\[(\w+)\] budget (\d+) s", text, re.M)}


def test_dry_run_plan_fits_one_device_call(tmp_path):
    out = tmp_path / "out"
    r = run("--dry-run", "--out", str(out), "--rev", "abc123", "--wheels", str(tmp_path))
    assert r.returncode == 0, r.stderr
    budgets = plan_budgets(r.stdout)
    assert list(budgets) == STAGES, r.stdout  # every stage, in this order
    assert sum(budgets.values()) <= PLAN_S < DEVICE_CALL_S
    assert f"total budget: {sum(budgets.values())} s of {PLAN_S} s" in r.stdout
    text = r.stdout
    assert "setup.py -q build_ext --inplace" in text
    assert text.count("wuerstchen_fast.tune --check-only --device cuda") == 3  # fp32, bf16, fp16
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"--dtype {dtype}" in text
    assert "--wf-order families" in text and "--timeout 60" in text and f"--junitxml {out}/tests-junit.xml" in text
    assert "test_stage_c_step[auto-cudagraphs]" in text and "test_e2e_sample[60+12-diffusers]" in text
    assert "test_e2e_sample[29+12-auto]" in text and "test_stage_a_decode[auto]" in text
    assert f"--benchmark-json {out}/<device>-" in text and "-abc123.json" in text
    assert "test_stage_c_step[diffusers-compile]" in text and "(optional" in text
    assert (out / "gpu_check.log").read_text() == text  # the log holds what was printed
    assert [p.name for p in out.iterdir()] == ["gpu_check.log"]  # nothing ran


def test_dry_run_only_some_stages(tmp_path):
    r = run("--dry-run", "--out", str(tmp_path), "--only", "tests,bench")
    assert r.returncode == 0, r.stderr
    assert list(plan_budgets(r.stdout)) == ["tests", "bench"]


@pytest.mark.parametrize("args, message", [
    ([], "--out DIR is required"),
    (["--out"], "--out needs a value"),
    (["--out", "--dry-run"], "--out needs a value"),
    (["--out", "x", "--frobnicate"], "unknown argument '--frobnicate'"),
    (["--out", "x", "--arch", "sm90"], "is not a TORCH_CUDA_ARCH_LIST"),
    (["--out", "x", "--only", "tests,lunch"], "--only: unknown stage 'lunch'"),
    (["--out", "x", "--wheels", "/nonexistent/wheels"], "wheels folder '/nonexistent/wheels' does not exist"),
])
def test_bad_arguments_fail_with_a_message_and_usage(tmp_path, args, message):
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "usage:" in r.stderr and "--rehearse" in r.stderr


def test_help_exits_zero():
    r = run("--help")
    assert r.returncode == 0 and "--out DIR" in r.stdout and "--dry-run" in r.stdout


def test_prepare_wheels_dry_run_and_bad_arguments(tmp_path):
    r = subprocess.run(["bash", str(WHEELS), "--dry-run", "--dest", str(tmp_path / "w")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pip download --no-deps --only-binary=:all:" in r.stdout
    for name in ("diffusers==", "open_clip_torch==", "ftfy==", "wcwidth=="):
        assert name in r.stdout
    assert "importlib_metadata" not in r.stdout  # diffusers needs it only on Python < 3.8
    assert not (tmp_path / "w").exists()
    r = subprocess.run(["bash", str(WHEELS), "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr


def test_travelling_tree_leaves_room_for_the_wheels():
    """What travels to a GPU machine (tracked files + wheels/) must stay under the device tool's 64 MiB.
    The wheels take 8.3 MiB (bench/prepare_wheels.sh); the tracked files may take 48 MiB, which leaves
    ~8 MiB for growth (result files, weights) before the limit."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    tracked = sum((ROOT / f).stat().st_size for f in files.split("\0") if f and (ROOT / f).is_file())
    assert tracked <= 48 * 2 ** 20, f"tracked files {tracked / 2 ** 20:.1f} MiB: with the wheels, near the 64 MiB limit"


# ------------------------------------------------------------------------------------------ rehearsal

def _probe_wheel(folder: Path) -> None:
    """A one-module wheel, so the wheels stage installs something real without a registry."""
    name, ver = "wf_rehearsal_probe", "1.0"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{name}-{ver}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
             f"{name}-{ver}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n"}
    record = f"{name}-{ver}.dist-info/RECORD"
    lines = [f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()},"
             f"{len(v.encode())}" for k, v in files.items()]
    files[record] = "\n".join(lines + [f"{record},,"]) + "\n"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / f"{name}-{ver}-py3-none-any.whl", "w") as z:
        for k, v in files.items():
            z.writestr(k, v)


def _copy_tree(dest: Path) -> None:
    """The files that travel to a GPU machine (tracked and untracked-not-ignored), then the built _C, last,
    so it is newer than its sources and the build stage finds it up to date."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    for so in (ROOT / "wuerstchen_fast").glob("_C*.so"):
        shutil.copy(so, dest / "wuerstchen_fast" / so.name)


@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_keeps_what_finished(tmp_path):
    tree, out, wheels = tmp_path / "tree", tmp_path / "out", tmp_path / "wheels"
    _copy_tree(tree)
    _probe_wheel(wheels)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["WF_CHECK_WHEELS_IMPORT"] = "import wf_rehearsal_probe; assert wf_rehearsal_probe.VALUE == 42"
    r = run("--rehearse", "--out", str(out), "--python", sys.executable, "--wheels", str(wheels), "--rev", "rehearse1",
            cwd=tree, env=env, timeout=1500)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode == 0, log[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {k: v["status"] for k, v in summary["stages"].items()}
    tune_exists = (tree / "wuerstchen_fast" / "tune.py").exists()
    assert status == {"env": "ok", "wheels": "ok", "build": "ok", "verify": "ok" if tune_exists else "not-available",
                      "tests": status["tests"], "bench": status["bench"], "compile": "optional-timeout"}, log[-6000:]
    # Tests: the deadline stops the run early; the families came first, so both ran.
    assert status["tests"] in ("ok", "partial")
    t = summary["tests"]
    assert t["passed"] >= 2 and t["failed"] == 0
    assert {"tests/test_ops_ddpm.py", "tests/test_layer_norm_2d.py"} <= set(t["by_file"])
    assert (out / "tests-junit.xml").exists()
    # Benchmarks: rows landed in the result file, which make_table renders with the check's verdicts.
    assert status["bench"] in ("ok", "partial")
    result = out / f"{summary['result']}.json"
    data = json.loads(result.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert "test_stage_c_step[diffusers]" in names and "test_stage_c_step[auto]" in names
    assert data["machine_info"]["wf"]["gpu_check"]["stages"]["build"]["status"] == "ok"
    assert summary["env"]["ceilings"]["copy_gbps"] > 0 and summary["build"]["cpu_isa"]
    # The compile stage ran out of its (deliberately short) budget: everything before it is still there.
    assert "<== [compile] optional-timeout" in log
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and summary["output_problems"] == [], files
    assert {"gpu_check.log", "summary.json", "logs.tar.gz", "tests-junit.xml", result.name} <= set(files)
