"""Tests that run a third-party engine (llama.cpp, onnxruntime) run in a child pytest process.

A crash inside such an engine (llama.cpp's AMX path segfaults on some Intel hosts) must fail those tests, not
end the suite. So the parent pytest does not run them itself: the first one of a module starts one child
pytest for all of that module's selected engine tests, the child reports every phase to a JSON-lines file,
and the parent replays the reports. Tests the child never finished are failed with its exit status (the
signal) and the tail of its output. When llama.cpp is broken on this machine altogether (tests/engines.py),
its tests are skipped with that reason instead. conftest.py imports the hooks below.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engines import llamacpp_problem, signal_name

_CHILD_REPORT = "WQEDGE_TEST_CHILD_REPORT"
_child_runs: dict[str, dict] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "engine(name): runs a third-party engine ('llama.cpp', 'onnxruntime'); the "
                                       "test runs in a child pytest process so a crash there cannot end the suite")


def pytest_runtest_logreport(report):
    path = os.environ.get(_CHILD_REPORT)
    if not path:
        return
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):
        longrepr = [str(longrepr[0]), int(longrepr[1] or 0), str(longrepr[2])]
    elif longrepr is not None:
        longrepr = str(longrepr)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "longrepr": longrepr, "duration": report.duration,
                            "sections": [list(s) for s in report.sections]}) + "\n")


def _exit_status(rc: int) -> str:
    return f"exited with status {rc}" if rc >= 0 else f"was killed by signal {signal_name(rc)}"


def _child(nodeids: list[str], config) -> tuple[dict[str, list[dict]], int, str]:
    """One child pytest over nodeids: ({nodeid: [report dicts]}, exit status, tail of its output).

    It runs in a scratch folder, not the checkout: `python -m` puts the working folder first on sys.path,
    and the checkout's wqedge/ (without the converters/runtime mapping of the install) would shadow the
    installed package. Paths are absolute and rootdir/inifile the parent's, so node ids stay the same."""
    work = Path(tempfile.mkdtemp(prefix="wqedge-engine-tests-"))
    report = work / "reports.jsonl"
    env = dict(os.environ, **{_CHILD_REPORT: str(report)})
    root = Path(config.rootpath)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--basetemp", str(work / "tmp"),
           "--rootdir", str(root)]
    if config.inipath:
        cmd += ["-c", str(config.inipath)]
    cmd += [str(root / n) for n in nodeids]
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, errors="replace", check=False)
        results: dict[str, list[dict]] = {}
        if report.exists():
            for line in report.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                results.setdefault(r["nodeid"], []).append(r)
        return results, proc.returncode, (proc.stdout + proc.stderr)[-6000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_child(item) -> dict:
    """Run every selected engine test of item's module in child pytests: {"results": {nodeid: [report
    dicts]}, "crashed": {nodeid: message}}. When a child dies inside a test, that test is failed with the
    child's exit status and output, and a new child runs the tests it had not reached."""
    module = item.nodeid.split("::")[0]
    if module in _child_runs:
        return _child_runs[module]
    pending = [it.nodeid for it in item.session.items
               if it.nodeid.split("::")[0] == module and it.get_closest_marker("engine") is not None]
    results: dict[str, list[dict]] = {}
    crashed: dict[str, str] = {}
    while pending:
        got, rc, tail = _child(pending, item.config)
        results.update(got)
        unfinished = [n for n in pending if not any(r["when"] == "teardown" for r in results.get(n, []))]
        if not unfinished:
            break
        why = (f"the child pytest running {module}'s engine tests {_exit_status(rc)} before this test finished. "
               f"Its output ended:\n{tail}")
        started = [n for n in unfinished if n in got]
        if not got:      # nothing ran at all (collection error, crash at import): no point in retrying
            crashed.update({n: why for n in unfinished})
            break
        culprit = started[0] if started else unfinished[0]
        crashed[culprit] = why
        pending = [n for n in unfinished if n != culprit]
    _child_runs[module] = {"results": results, "crashed": crashed}
    return _child_runs[module]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if os.environ.get(_CHILD_REPORT) or item.get_closest_marker("engine") is None:
        return None
    from _pytest.reports import TestReport
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    problem = llamacpp_problem() if "llama.cpp" in item.get_closest_marker("engine").args else None
    if problem:   # llama.cpp itself is broken on this machine (tests/engines.py): say so, don't crash
        rep = TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "skipped",
                         (str(item.path), item.location[1] or 0, f"Skipped: {problem}"), "setup")
        item.ihook.pytest_runtest_logreport(report=rep)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True
    run = _run_child(item)
    reports = run["results"].get(item.nodeid, [])
    finished = any(r["when"] == "teardown" for r in reports)
    for r in reports:
        longrepr = tuple(r["longrepr"]) if isinstance(r["longrepr"], list) else r["longrepr"]
        rep = TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, r["outcome"], longrepr,
                         r["when"], [tuple(s) for s in r["sections"]], r["duration"])
        item.ihook.pytest_runtest_logreport(report=rep)
    if not finished:
        why = run["crashed"].get(item.nodeid, "the child pytest did not report this test")
        rep = TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed", why,
                         "call" if reports else "setup")
        item.ihook.pytest_runtest_logreport(report=rep)
    # This process set nothing up for the item, but the tests before it may have set up fixtures of its module or
    # package: tear down what the next item does not share, as pytest's own protocol would (else, when this is
    # the last test of its module, the next module's setup fails with "previous item was not torn down properly").
    item.session._setupstate.teardown_exact(nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
