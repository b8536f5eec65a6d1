"""The benchmark's smoke run: every stage with tiny durations, so `make bench` cannot rot.
It asserts that each stage produced its numbers, never anything about speed."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_smoke(tmp_path):
    out = tmp_path / "smoke.md"
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out.read_text()
    for heading in ("## Budgets", "## 1. Datapath impact", "## 2. In-kernel cost per BPF program",
                    "## 3. Daemon cost"):
        assert heading in report, heading
    assert "skb__kfree_skb" in report          # the program's cost was read
    assert report.count("MET") + report.count("MISS") >= 8  # every budget got a verdict
    assert "n/a" not in report.split("## Budgets")[1].split("##")[0]
