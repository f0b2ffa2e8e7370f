"""The record keeping of bench/gpu_check.sh: summary.json, the stage verdicts, the output folder's limits.

    python bench/gpu_check_report.py env --out FILE          versions, device facts and measured ceilings
    python bench/gpu_check_report.py build-info --out FILE [--expect-cuda]
    python bench/gpu_check_report.py build-current --out FILE [--arch ARCHS]   exit 0 when _C needs no build
    python bench/gpu_check_report.py init --out DIR --rev REV --rehearse 0|1 --result NAME
    python bench/gpu_check_report.py stage --out DIR --name NAME --rc RC --seconds S --budget B --work WORK
    python bench/gpu_check_report.py pack --out DIR --work WORK
    python bench/gpu_check_report.py finish --out DIR --work WORK --seconds S

`stage` prints the stage's status (one word) and records it with what the stage left in WORK (the
env and build facts, the per-test and per-benchmark JSON lines of bench/gpu_check_plugin.py, the
tuning cache). Statuses: ok; partial (its deadline stopped a test run early, nothing failed); failed;
timeout (killed at its budget); optional-timeout (the same, for the optional stage); skipped (no time
was left); not-available (the verification stage in a tree that has no wuerstchen_fast/tune.py).
Only `env` and `build-info` import torch; the rest stays quick.

The output folder comes back from the GPU machine only as at most 8 files of at most 16 MiB, no
subfolders deeper than 2, names of letters, digits, '.', '_' and '-': `finish` checks that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = "summary.json"
MAX_FILES, MAX_FILE_BYTES = 8, 16 << 20
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
TIMEOUT_RCS = (124, 137)  # timeout(1): the budget ran out (124), or the command ignored INT and was killed (137)
NO_TIME_RC = 125
NOT_AVAILABLE_RC = 3
PYTEST_INTERRUPTED, PYTEST_NO_TESTS = 2, 5


# ------------------------------------------------------------------------------------------ files

def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _write_json(path: Path, data) -> None:
    """Atomically: a run killed while writing leaves the previous file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill
    return rows


# ------------------------------------------------------------------------------------------ facts

def env_facts() -> dict:
    import platform

    import torch

    from bench import common

    facts = dict(python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count(),
                 torch=torch.__version__, cuda=torch.version.cuda, triton=common._version("triton"),
                 diffusers=common._version("diffusers"), transformers=common._version("transformers"),
                 device=common.device_name(), device_type=common.DEVICE, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2 ** 30, 1), driver=common._driver(),
                     l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
    t0 = time.perf_counter()
    facts["ceilings"] = dict(common.ceilings())
    facts["ceilings_s"] = round(time.perf_counter() - t0, 2)
    return facts


def build_facts(expect_cuda: bool) -> dict:
    from wuerstchen_fast._extension import build_info

    info = build_info()
    if info is None:
        raise SystemExit("gpu_check: wuerstchen_fast._C did not load after the build (see the build log above)")
    if expect_cuda and not info.get("with_cuda"):
        raise SystemExit(f"gpu_check: _C was built without CUDA kernels ({info}); is CUDA_HOME / nvcc found?")
    return dict(info)


def stale_reason(arch: str | None, tree: Path = ROOT) -> str | None:
    """Why the in-place _C must be (re)built, or None when it is current: it loads under this torch, was
    built for `arch` (None: any), and is newer than every build input. On a warm machine a rerun of the
    check then skips the compile; a fresh tree has no _C (it is not tracked), so it always builds."""
    libs = sorted((tree / "wuerstchen_fast").glob("_C*.so"))
    if not libs:
        return "no compiled _C in the tree"
    inputs = [tree / "setup.py", tree / "csrc" / "sources.txt"]
    for folder in ("csrc", "kernels/cuda"):
        inputs += [p for p in (tree / folder).rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
    newest = max(p.stat().st_mtime for p in inputs if p.exists())
    if min(lib.stat().st_mtime for lib in libs) < newest:
        return "a source is newer than _C"
    import torch

    from wuerstchen_fast._extension import build_info

    info = build_info()
    if info is None:
        return "_C does not load here"
    if info.get("torch_version") != torch.__version__:
        return f"_C was built for torch {info.get('torch_version')}, this is {torch.__version__}"
    if arch and (not info.get("with_cuda") or info.get("cuda_archs") != arch):
        return f"_C was built for CUDA archs {info.get('cuda_archs')!r}, not {arch!r}"
    return None


def test_counts(rows: list) -> dict:
    """Outcome counts of a pytest run from its JSON lines (bench/gpu_check_plugin.py)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, collected, stopped, by_file = [], None, None, {}
    for r in rows:
        if r.get("event") == "collected":
            collected = r["tests"]
        elif r.get("event") == "stopped":
            stopped = r
        elif "nodeid" in r:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            f = by_file.setdefault(r["nodeid"].split("::")[0], {"passed": 0, "failed": 0, "skipped": 0})
            f[r["outcome"]] = f.get(r["outcome"], 0) + 1
            if r["outcome"] == "failed":
                failures.append({"nodeid": r["nodeid"], "when": r.get("when"), "error": r.get("error", "")[-600:]})
    ran = sum(counts.values())
    return dict(collected=collected, ran=ran, **counts, not_run=(collected - ran) if collected is not None else None,
                stopped=stopped.get("reason") if stopped else None, by_file=by_file, failures=failures)


def bench_rows(rows: list) -> list:
    out = []
    for r in rows:
        if "nodeid" not in r:
            continue
        ei = r.get("extra_info") or {}
        out.append(dict(nodeid=r["nodeid"], outcome=r["outcome"], group=r.get("group"), median_s=r.get("median"),
                        min_s=r.get("min"), rounds=r.get("rounds"), provider=ei.get("provider"),
                        peak_mem_bytes=ei.get("peak_mem_bytes"), tflops=ei.get("tflops"),
                        reason=r.get("reason"), error=(r.get("error") or "")[-600:] or None))
    return out


def stage_status(name: str, rc: int, rows: list, optional: bool, tree: Path = ROOT) -> str:
    if rc == NO_TIME_RC:
        return "skipped"
    if rc in TIMEOUT_RCS:
        return "optional-timeout" if optional else "timeout"
    if name == "verify" and rc == NOT_AVAILABLE_RC:
        # Accepted only while the tree has no tune module: once it exists the stage must really run.
        return "failed" if (tree / "wuerstchen_fast" / "tune.py").exists() else "not-available"
    if rows:  # a pytest stage: its JSON lines know more than the exit status
        counts = test_counts(rows)
        if counts["failed"]:
            return "failed"
        if rc == PYTEST_NO_TESTS or counts["ran"] == 0:
            return "failed"
        if counts["stopped"] and rc in (0, PYTEST_INTERRUPTED):
            return "partial"
    return "ok" if rc == 0 else "failed"


# ------------------------------------------------------------------------------------------ commands

def cmd_init(a) -> int:
    out = Path(a.out)
    _write_json(out / SUMMARY, dict(schema=1, rev=a.rev, rehearse=bool(int(a.rehearse)), result=a.result,
                                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), stages={}))
    return 0


def cmd_stage(a) -> int:
    out, work = Path(a.out), Path(a.work)
    summary = _read_json(out / SUMMARY, {"stages": {}})
    rows = read_jsonl(work / f"{a.name}.jsonl") if a.name in ("tests", "bench", "compile") else []
    status = stage_status(a.name, a.rc, rows, bool(int(a.optional)))
    rec = dict(status=status, rc=a.rc, seconds=a.seconds, budget=a.budget)
    if a.name == "env":
        summary["env"] = _read_json(work / "env.json")
    elif a.name == "build":
        summary["build"] = _read_json(work / "build.json")
    elif a.name == "tests":
        summary["tests"] = test_counts(rows)
    elif a.name in ("bench", "compile"):
        summary[a.name] = bench_rows(rows)
    elif a.name == "verify":
        caches = sorted((work / "tune-cache").glob("*.json")) if (work / "tune-cache").is_dir() else []
        rec["cache_files"] = [c.name for c in caches]
        if len(caches) == 1:  # one file per machine fingerprint: this machine's
            (out / "tune-cache.json").write_bytes(caches[0].read_bytes())
    summary.setdefault("stages", {})[a.name] = rec
    _write_json(out / SUMMARY, summary)
    print(status)
    return 0


def cmd_pack(a) -> int:
    out, work = Path(a.out), Path(a.work)
    names = sorted(p for p in work.glob("*") if p.is_file() and p.suffix in (".log", ".jsonl", ".json"))
    ninja_logs = sorted((ROOT / "build").glob("temp.*/.ninja_log"))
    tmp = out / "logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in names:
            tar.add(p, arcname=f"logs/{p.name}")
        for p in ninja_logs:
            tar.add(p, arcname=f"logs/build-{p.parent.name}.ninja_log")
        cache = work / "tune-cache"
        if cache.is_dir():
            tar.add(cache, arcname="logs/tune-cache")
    os.replace(tmp, out / "logs.tar.gz")
    return 0


def output_problems(out: Path) -> list:
    """What would not come back from the GPU machine's output folder."""
    problems, files = [], []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if any(not NAME_OK.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_', '-'")
        if p.is_file():
            files.append(rel)
            if len(rel.parts) > 3:
                problems.append(f"{rel}: deeper than 2 folders")
            if p.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{rel}: {p.stat().st_size >> 20} MiB, over 16 MiB")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, over {MAX_FILES}: {', '.join(map(str, files))}")
    return problems


def cmd_finish(a) -> int:
    out = Path(a.out)
    summary = _read_json(out / SUMMARY, {"stages": {}})
    summary["seconds"] = a.seconds
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # The headline result files carry the check's verdicts, so bench/results/ keeps them with the numbers.
    for name in (f"{summary.get('result')}.json", f"{summary.get('result')}-compile.json"):
        data = _read_json(out / name)
        if data is not None:
            data.setdefault("machine_info", {}).setdefault("wf", {})["gpu_check"] = {
                k: summary.get(k) for k in ("rev", "rehearse", "stages", "tests", "seconds")}
            _write_json(out / name, data)
    summary["output_problems"] = output_problems(out)
    _write_json(out / SUMMARY, summary)
    print(f"gpu_check: {a.seconds} s in all")
    print(f"  {'stage':8s} {'status':17s} {'seconds':>7s} {'budget':>6s}")
    for name, rec in summary.get("stages", {}).items():
        print(f"  {name:8s} {rec['status']:17s} {rec['seconds']:7d} {rec['budget']:6d}")
    t = summary.get("tests")
    if t:
        print(f"  tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
              f"{t['not_run']} not run of {t['collected']}" + (f" ({t['stopped']})" if t.get("stopped") else ""))
        for f in t["failures"][:20]:
            print(f"    FAILED {f['nodeid']}")
    for row in summary.get("bench") or []:
        med = f"{row['median_s'] * 1e3:.2f} ms" if row.get("median_s") else row["outcome"]
        print(f"  bench {row['nodeid'].split('::')[-1]:44s} {med}")
    for p in summary["output_problems"]:
        print(f"  output folder: {p}")
    return 1 if summary["output_problems"] else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("build-info")
    p.add_argument("--out", required=True)
    p.add_argument("--expect-cuda", action="store_true")
    p = sub.add_parser("build-current", help="exit 0 when the in-place _C needs no build (see stale_reason)")
    p.add_argument("--arch", default=None)
    p.add_argument("--out", required=True, help="where to write its build facts when it is current")
    p = sub.add_parser("init")
    for k in ("--out", "--rev", "--rehearse", "--result"):
        p.add_argument(k, required=True)
    p = sub.add_parser("stage")
    for k in ("--out", "--name", "--work"):
        p.add_argument(k, required=True)
    for k in ("--rc", "--seconds", "--budget"):
        p.add_argument(k, type=int, required=True)
    p.add_argument("--optional", default="0")
    for name in ("pack", "finish"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--work", required=True)
        if name == "finish":
            p.add_argument("--seconds", type=int, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "env":
        facts = env_facts()
        _write_json(Path(a.out), facts)
        print(json.dumps(facts, indent=1, default=str))
        return 0
    if a.cmd == "build-current":
        reason = stale_reason(a.arch or None)
        if reason:
            print(f"gpu_check: _C must be built: {reason}")
            return 1
        facts = build_facts(expect_cuda=bool(a.arch))
        _write_json(Path(a.out), facts)
        print("gpu_check: _C is current, no build needed:", json.dumps(facts))
        return 0
    if a.cmd == "build-info":
        facts = build_facts(a.expect_cuda)
        _write_json(Path(a.out), facts)
        print("gpu_check: _C build info:", json.dumps(facts))
        return 0
    return {"init": cmd_init, "stage": cmd_stage, "pack": cmd_pack, "finish": cmd_finish}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
