"""The triage report over the drops probe's findings: build_report's ranking (specific
findings before the broad one, critical first) and render_text (header, status line, evidence,
fixes, the probes' states). Managers and features are tests/fakes.py's."""

from __future__ import annotations

import time

from dpwatch.daemon import triage
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.probes.base import SEVERITY_RANK, Finding
from fakes import FakeFeatures, FakeManager
from test_drops_findings import (mixed_window, no_sysctl_reads, probe, reading,  # noqa: F401 - fixtures
                                 top_reasons_window)

# -- ranking in build_report ------------------------------------------------------------------

def manager(probe, fresh) -> FakeManager:
    return FakeManager({"drops": probe}, {"drops": fresh}, modes={"drops": "tracepoint"},
                       reasons={"drops": "skb:kfree_skb with the reason field"})


def test_build_report_ranks_specific_findings_first(probe):
    old = reading({})
    new = reading({("SOCKET_RCVBUFF", "ipv4"): 3000, ("NETFILTER_DROP", "ipv4"): 2000,
                   ("NO_SOCKET", "ipv4"): 100})
    ring = SnapshotRing(4)
    ring.append({"drops": old}, mono=time.monotonic() - 10.0)
    report = triage.build_report(manager(probe, new), ring, 10.0, FakeFeatures(kernel_release="6.1.0-test"))
    assert report["status"] == "warning"
    assert report["kernel"] == "6.1.0-test"
    assert report["findings"][-1]["severity"] == "info"  # 100 unexplained drops in 10 s < 50/s
    assert report["window_requested_seconds"] == 10.0
    assert 10.0 <= report["window_seconds"] < 70.0
    # The broad finding only adds NO_SOCKET (100 drops), so it ranks after both specific ones.
    assert [f["id"] for f in report["findings"]] == ["drops.socket_receive_buffer", "drops.netfilter",
                                                     "drops.top_reasons"]
    text = triage.render_text(report)
    assert "STATUS: WARNING  (2 warning, 1 info)" in text
    assert text.index("(drops.socket_receive_buffer)") < text.index("(drops.top_reasons)")


def test_build_report_critical_first(probe):
    new = reading({("NETFILTER_DROP", "ipv4"): 20_000, ("SOCKET_RCVBUFF", "ipv4"): 100})
    ring = SnapshotRing(4)
    ring.append({"drops": reading()}, mono=time.monotonic() - 10.0)
    report = triage.build_report(manager(probe, new), ring, 10.0, FakeFeatures(kernel_release="k"))
    assert report["status"] == "critical"
    assert [(f["id"], f["severity"]) for f in report["findings"]] == [
        ("drops.netfilter", "critical"), ("drops.socket_receive_buffer", "warning"),
        ("drops.top_reasons", "info")]
    assert triage.EXIT_CODES[report["status"]] == 2
    assert SEVERITY_RANK["critical"] > SEVERITY_RANK["warning"] > SEVERITY_RANK["info"]


# -- render_text ------------------------------------------------------------------------------

PROBES = [
    {"name": "drops", "state": "attached", "mode": "tracepoint",
     "reason": "skb:kfree_skb with the reason field"},
    {"name": "conntrack", "state": "unsupported", "mode": None, "reason": "no nf_conntrack"},
    {"name": "dns", "state": "degraded", "mode": "procfs", "reason": "no BTF",
     "diagnose_error": "KeyError: 'x'"},
]


def make_report(findings, status, window=10.0, requested=10.0):
    return {"node": "node-a", "kernel": "6.1.0-test", "generated_at": "2024-05-01T12:00:00+00:00",
            "window_seconds": window, "window_requested_seconds": requested, "status": status,
            "findings": [f.as_dict() for f in findings], "probes": PROBES}


def test_render_text(probe):
    findings = probe.diagnose(top_reasons_window())
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], -f.impact, f.id))
    text = triage.render_text(make_report(findings, "warning"))
    lines = text.splitlines()
    head = "dpwatch diagnose  node=node-a  kernel=6.1.0-test  window=10s  at 2024-05-01T12:00:00+00:00"
    assert lines[0] == head
    assert lines[1] == "=" * len(head)
    assert lines[2] == "STATUS: WARNING  (3 warning)"
    assert lines[3] == ""
    assert lines[4] == "1. [WARNING] Socket receive buffers overflow  (drops.socket_receive_buffer)"
    assert "2. [WARNING] High packet drop rate  (drops.top_reasons)" in lines
    assert "3. [WARNING] Netfilter drops packets  (drops.netfilter)" in lines
    assert "   evidence:" in lines
    assert "     drops                  5,000" in lines
    assert "     drops_per_second       500" in lines
    assert "     net.core.rmem_max      3,000,000" in lines
    assert "     by_protocol: ipv4=5,000" in lines
    assert "       - location=0xffffffff81000000  reason=SOCKET_RCVBUFF  count=5,000" in lines
    assert "   fix:" in lines
    assert "     $ sysctl -w net.core.rmem_max=16777216" in lines
    assert "     $ sysctl -w net.core.rmem_default=1600000" in lines
    assert any(l.startswith("     - let the application ask for a bigger buffer") for l in lines)
    assert any(l.startswith("     $ nft list ruleset -a") for l in lines)
    assert "Nothing abnormal seen in this window." not in text
    assert "note:" not in text
    i = lines.index("probes:")
    assert lines[i + 1:] == [
        "  drops        attached (tracepoint)",
        "  conntrack    unsupported: no nf_conntrack",
        "  dns          degraded (procfs): no BTF",
        "               diagnose failed: KeyError: 'x'",
    ]
    assert text.endswith("\n")


def test_render_text_listen_overflow_commands(probe):
    findings = probe.diagnose(mixed_window())
    text = triage.render_text(make_report(findings, "warning", window=7.0, requested=7.0))
    assert "STATUS: WARNING  (3 warning)" in text
    assert "\n     $ ss -ltn | awk '$2 >= $3'" in text
    assert "\n     - only a backlog equal to somaxconn is capped by it: sysctl -w net.core.somaxconn=8192" in text
    assert "     drops_per_second              2.857" in text


def test_render_text_no_findings():
    text = triage.render_text(make_report([], "ok", window=4.2, requested=60.0))
    lines = text.splitlines()
    assert lines[0] == ("dpwatch diagnose  node=node-a  kernel=6.1.0-test  window=4s  "
                        "at 2024-05-01T12:00:00+00:00")
    assert lines[2] == "STATUS: OK  (no findings)"
    assert lines[3] == "note: the daemon has data for 4s only, less than the 60s asked for"
    assert "Nothing abnormal seen in this window." in lines
    assert "evidence:" not in text and "fix:" not in text
    assert lines[lines.index("probes:") + 1] == "  drops        attached (tracepoint)"


def test_render_text_mixed_severities():
    findings = [
        Finding(id="x.crit", probe="x", severity="critical", title="C", summary="c"),
        Finding(id="x.warn", probe="x", severity="warning", title="W", summary="w"),
        Finding(id="x.info", probe="x", severity="info", title="I", summary="i",
                evidence={"ratio": 0.5, "names": ["a", "b"], "empty": {}}, remediation=["ss -s"]),
    ]
    text = triage.render_text(make_report(findings, "critical"))
    assert "STATUS: CRITICAL  (1 critical, 1 warning, 1 info)" in text
    assert "1. [CRITICAL] C  (x.crit)" in text
    assert "3. [INFO] I  (x.info)" in text
    assert "     ratio  0.5\n     names:\n       - a\n       - b\n" in text
    assert "empty" not in text
    assert "     $ ss -s\n" in text
