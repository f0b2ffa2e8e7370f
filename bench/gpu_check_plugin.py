"""pytest plugin of bench/gpu_check.sh: a time-boxed run that covers the most ground first and keeps
what finished.

    python -m pytest -p bench.gpu_check_plugin [--wf-order families] [--wf-deadline SECONDS]
                     [--wf-results FILE.jsonl] [--wf-families PATTERNS] ...

--wf-order families   round-robin over groups (test file, backend in the test id): the first test of
                      every group runs before the second of any, so a stage cut short by its budget has
                      still touched every kernel family and backend. Inside a group the collected order
                      is kept.
--wf-deadline S       start no new test once S seconds have passed since the session began (or since the
                      epoch time in WF_STAGE_START, where bench/gpu_check.sh started the stage); the session
                      stops as after Ctrl-C (reports and --junitxml / --benchmark-json are still written)
                      and the results file says how many tests did not run.
--wf-results FILE     one JSON line per finished test (nodeid, outcome, seconds; for a benchmark its
                      median, min, rounds, group and extra_info), written and flushed as each test ends,
                      so a run killed from outside still leaves every finished result.
--wf-families PATTERNS  comma-separated file-name patterns (fnmatch): in files that match none of them,
                      only the tests marked `cuda` are kept (the others are deselected).
"""
from __future__ import annotations

import fnmatch
import json
import os
import time
from pathlib import Path

import pytest

BACKENDS = ("triton", "cuda", "cpu", "torch")


def pytest_addoption(parser):
    group = parser.getgroup("wf-gpu-check", "time-boxed runs (bench/gpu_check.sh)")
    group.addoption("--wf-order", choices=("collected", "families"), default="collected",
                    help="'families': round-robin over (file, backend) groups so every family runs early")
    group.addoption("--wf-deadline", type=float, default=None, metavar="SECONDS",
                    help="start no new test after SECONDS; stop the session cleanly")
    group.addoption("--wf-results", default=None, metavar="FILE", help="append one JSON line per finished test")
    group.addoption("--wf-families", default=None, metavar="PATTERNS",
                    help="comma-separated file patterns; elsewhere keep only tests marked cuda")


def _backend(item) -> str:
    """The backend a test id names ('triton' in test_x[triton-fp32]), or '' when it names none."""
    callspec = getattr(item, "callspec", None)
    values = list(callspec.params.values()) if callspec is not None else []
    words = [str(v) for v in values] + item.name.partition("[")[2].rstrip("]").split("-")
    for w in words:
        for b in BACKENDS:
            if w == b or w.startswith(b + ","):
                return b
    return ""


def family_order(items: list) -> list:
    """Round-robin over (file, backend) groups, groups in order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault((item.path.name, _backend(item)), []).append(item)
    queues = list(groups.values())
    ordered = []
    while queues:
        for q in queues:
            ordered.append(q.pop(0))
        queues = [q for q in queues if q]
    return ordered


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    patterns = config.getoption("--wf-families")
    if patterns:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        keep, drop = [], []
        for item in items:
            in_family = any(fnmatch.fnmatch(item.path.name, p) for p in pats)
            (keep if in_family or item.get_closest_marker("cuda") else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if config.getoption("--wf-order") == "families":
        items[:] = family_order(items)


class _Recorder:
    def __init__(self, config):
        self.config = config
        self.deadline = config.getoption("--wf-deadline")
        path = config.getoption("--wf-results")
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed at unconfigure)
        self.t0 = time.monotonic()
        start = os.environ.get("WF_STAGE_START")
        if start:  # count the interpreter's start and the imports too
            self.t0 -= max(0.0, time.time() - float(start))
        self.started = 0
        self.total = 0

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, default=str) + "\n")
            self.file.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        self.total = len(session.items)
        self.write({"event": "collected", "tests": self.total})

    def pytest_runtest_logstart(self, nodeid, location):
        self.started += 1

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            record = {"nodeid": item.nodeid, "outcome": report.outcome, "when": report.when,
                      "seconds": round(report.duration, 3), "elapsed_s": round(time.monotonic() - self.t0, 1)}
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                record["reason"] = str(report.longrepr[2])
            elif report.outcome == "failed":
                record["error"] = str(report.longreprtext)[-2000:]
            bench = getattr(item, "funcargs", {}).get("benchmark")
            stats = getattr(getattr(bench, "stats", None), "stats", None)
            if stats is not None:
                record.update(group=getattr(bench, "group", None), median=stats.median, min=stats.min,
                              rounds=stats.rounds, extra_info=dict(getattr(bench, "extra_info", {})))
            self.write(record)

    def pytest_runtest_teardown(self, item, nextitem):
        if nextitem is None or self.deadline is None:
            return
        elapsed = time.monotonic() - self.t0
        if elapsed >= self.deadline:
            not_run = self.total - self.started
            self.write({"event": "stopped", "reason": f"deadline {self.deadline:g} s reached after {elapsed:.0f} s",
                        "not_run": not_run})
            item.session.shouldstop = (f"wf-deadline: {self.deadline:g} s reached, {not_run} of {self.total} "
                                       "tests not run")

    def pytest_sessionfinish(self, session, exitstatus):
        self.write({"event": "finished", "exitstatus": int(exitstatus),
                    "seconds": round(time.monotonic() - self.t0, 1)})

    def close(self):
        if self.file is not None:
            self.file.close()


def pytest_configure(config):
    config._wf_recorder = _Recorder(config)
    config.pluginmanager.register(config._wf_recorder, "wf-gpu-check-recorder")


def pytest_unconfigure(config):
    rec = getattr(config, "_wf_recorder", None)
    if rec is not None:
        rec.close()
