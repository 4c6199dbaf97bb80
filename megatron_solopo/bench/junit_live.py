"""A pytest plugin that rewrites a JUnit XML file after EVERY test (pytest's --junitxml writes only at the end).

The GPU session runs its tests under a time cap: a run killed at the cap would lose pytest's own JUnit file,
so the session loads this plugin instead and the file always holds the tests finished so far:

    python3 -m pytest -v -p megatron_solopo.bench.junit_live --junit-live=PATH tests/...

The format is what `gpu_session_report.junit_summary` (and any JUnit reader) expects: testsuites > testsuite >
testcase (classname, name, time) with a failure / error / skipped child where the test did not pass. The
file is replaced atomically (written beside it, then renamed), so a reader never sees half of it.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from typing import Any


def pytest_addoption(parser) -> None:
    parser.addoption("--junit-live", default=None, metavar="PATH",
                     help="rewrite a JUnit XML file at PATH after every test (megatron_solopo.bench.junit_live)")


def pytest_configure(config) -> None:
    path = config.getoption("--junit-live")
    if path:
        config.pluginmanager.register(LiveJUnit(path), "solopo-junit-live")


def _split_nodeid(nodeid: str) -> tuple[str, str]:
    """'tests/a/test_b.py::TestC::test_d[x]' -> ('tests.a.test_b.TestC', 'test_d[x]'), as pytest's junitxml."""
    parts = nodeid.split("::")
    module = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
    classname = ".".join([module.replace("/", ".").replace("\\", "."), *parts[1:-1]])
    return classname, parts[-1]


def _skip_message(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


def _failure_message(text: str) -> str:
    """The first 'E   ...' line of a pytest traceback (the assertion), else its last line."""
    lines = text.strip().splitlines()
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    return (errors[0] if errors else (lines or [""])[-1])[:300]


class LiveJUnit:
    """Collects one record per test and rewrites the XML when the test's teardown ends."""

    def __init__(self, path: str):
        self.path = path
        self.started = time.time()
        self.cases: dict[str, dict[str, Any]] = {}
        self._write()  # an empty, valid file from the start

    def _case(self, nodeid: str) -> dict[str, Any]:
        if nodeid not in self.cases:
            self.cases[nodeid] = {"outcome": "passed", "time": 0.0, "message": "", "text": ""}
        return self.cases[nodeid]

    def pytest_runtest_logreport(self, report) -> None:
        case = self._case(report.nodeid)
        case["time"] += float(getattr(report, "duration", 0.0) or 0.0)
        if report.skipped and case["outcome"] == "passed":
            case.update(outcome="skipped", message=_skip_message(report))
        elif report.failed:
            if report.when == "call":
                case["outcome"] = "failure"
            elif case["outcome"] != "failure":
                case["outcome"] = "error"
            text = str(report.longrepr or "")
            case["text"] += text
            case["message"] = case["message"] or _failure_message(text)
        if report.when == "teardown":
            self._write()

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self._write()

    def _write(self) -> None:
        root = ET.Element("testsuites")
        counts = {k: sum(1 for c in self.cases.values() if c["outcome"] == k) for k in ("failure", "error", "skipped")}
        suite = ET.SubElement(root, "testsuite", name="pytest", tests=str(len(self.cases)),
                              failures=str(counts["failure"]), errors=str(counts["error"]),
                              skipped=str(counts["skipped"]), time=f"{time.time() - self.started:.3f}")
        for nodeid, case in self.cases.items():
            classname, name = _split_nodeid(nodeid)
            element = ET.SubElement(suite, "testcase", classname=classname, name=name, time=f"{case['time']:.3f}")
            if case["outcome"] != "passed":
                child = ET.SubElement(element, case["outcome"], message=case["message"])
                child.text = case["text"][-20000:] or None
        tmp = f"{self.path}.part"
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, self.path)
