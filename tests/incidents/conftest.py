"""The incident library's fixtures: each test is one reproduced node incident (see harness.py).
At the end of the run, a table of every incident's top finding and its time to answer."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # harness.py

from harness import RESULTS  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{os.sep}incidents{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.incident)
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("incident library: top finding and time to answer")
    width = max(len(r["incident"]) for r in RESULTS)
    for r in RESULTS:
        got = r["top"] or "(nothing above info)"
        secs = f"{r['seconds']:5.1f} s" if r["seconds"] is not None else "   -  "
        mark = "ok " if r["ok"] else "BAD"
        tr.write_line(f"{mark} {r['incident'].ljust(width)}  {secs}  {got}  (expected {r['expected']})")
