"""The drops findings (probes/drops/findings.py, one function per finding id) through
DropsProbe.diagnose() over readings built by hand in the shape DropsProbe.collect() returns,
with the sysctls collect() reads in their info (diagnose reads none: a sysctl read from it
fails the test), and the buffer-size suggestion. No BPF."""

from __future__ import annotations

import pytest

from dpwatch.daemon.config import Config
from dpwatch.daemon.host import sysctl
from dpwatch.daemon.host.kallsyms import KallsymsResolver
from dpwatch.probes.base import Finding, Window
from dpwatch.probes.drops import findings
from dpwatch.probes.drops.findings import DropsWindow, suggest_buffer
from dpwatch.probes.drops.probe import DropsProbe

MiB = 1 << 20
LOC_A = 0xffffffff81000000
LOC_B = 0xffffffff81000400
LOC_C = 0xffffffff81000800
LOC_D = 0xffffffff81000c00

SYSCTLS = {
    "net.core.rmem_default": 800_000,
    "net.core.rmem_max": 3_000_000,
    "net.core.somaxconn": 4096,
    "net.ipv4.tcp_max_syn_backlog": 16384,
}


def reading(drops: dict | None = None, locations: dict | None = None, facts: dict = SYSCTLS) -> dict:
    return {"counters": {"drops": dict(drops or {}), "locations": dict(locations or {})},
            "gauges": {}, "info": {"sysctls": dict(facts)}}


@pytest.fixture
def no_sysctl_reads(monkeypatch):
    """diagnose() reads no sysctl: collect() put them in the reading."""
    monkeypatch.setattr(sysctl, "read_int", lambda key: pytest.fail(f"sysctl {key} read"))


@pytest.fixture
def probe(no_sysctl_reads, tmp_path):
    p = DropsProbe(Config())
    # Synthetic addresses must not resolve against this machine's real /proc/kallsyms.
    p.kallsyms = KallsymsResolver(str(tmp_path / "no-kallsyms"))
    return p


def by_id(findings: list[Finding]) -> dict[str, Finding]:
    out = {f.id: f for f in findings}
    assert len(out) == len(findings), "finding ids must be unique"
    return out


# -- suggest_buffer ---------------------------------------------------------------------------

@pytest.mark.parametrize("rmem_max, rmem_default, want", [
    (None, None, 4 * MiB),              # unreadable: the 4 MiB floor
    (212992, 212992, 4 * MiB),          # Linux defaults
    (1 * MiB, 0, 4 * MiB),              # 4x exactly a power of two
    (1 * MiB + 1, None, 8 * MiB),       # just above: the next power of two
    (3_000_000, 800_000, 16 * MiB),
    (800_000, 3_000_000, 16 * MiB),     # the larger of the two counts
    (16 * MiB, None, 64 * MiB),
    (32 * MiB, None, 64 * MiB),         # 128 MiB capped at 64 MiB
    (64 * MiB, 64 * MiB, 64 * MiB),
    (100 * MiB, None, 100 * MiB),       # never advise shrinking a buffer
    (None, 100 * MiB, 100 * MiB),
])
def test_suggest_buffer(rmem_max, rmem_default, want):
    assert suggest_buffer(rmem_max, rmem_default) == want


# -- DropsProbe.diagnose ----------------------------------------------------------------------

def mixed_window(seconds=7.0, facts=SYSCTLS):
    old = reading(
        {("SOCKET_RCVBUFF", "ipv4"): 100, ("SOCKET_RCVBUFF", "ipv6"): 10,
         ("TCP_LISTEN_OVERFLOW", "ipv4"): 5, ("CONSUMED", "ipv4"): 1000,
         ("NOT_DROPPED_YET", "other"): 7},
        {(LOC_A, "SOCKET_RCVBUFF"): 50, (LOC_B, "TCP_LISTEN_OVERFLOW"): 1, (LOC_D, "CONSUMED"): 10})
    new = reading(
        {("SOCKET_RCVBUFF", "ipv4"): 300, ("SOCKET_RCVBUFF", "ipv6"): 60,
         ("TCP_LISTEN_OVERFLOW", "ipv4"): 25, ("NETFILTER_DROP", "ipv6"): 30,
         ("CONSUMED", "ipv4"): 500_000, ("NOT_DROPPED_YET", "other"): 90_000},
        {(LOC_A, "SOCKET_RCVBUFF"): 250, (LOC_C, "SOCKET_RCVBUFF"): 50,
         (LOC_B, "TCP_LISTEN_OVERFLOW"): 21, (LOC_C, "NETFILTER_DROP"): 30,
         (LOC_D, "CONSUMED"): 499_000}, facts)
    return Window(seconds, old, new)


def test_specific_findings(probe):
    findings = probe.diagnose(mixed_window())
    # 300 real drops in 7s is 42.9/s, under the 50/s warning: no drops.top_reasons. The
    # CONSUMED and NOT_DROPPED_YET increases (~84,000/s) would be far above it if counted.
    assert [f.id for f in findings] == ["drops.socket_receive_buffer", "drops.listen_overflow",
                                        "drops.netfilter"]
    assert all(f.probe == "drops" and f.severity == "warning" for f in findings)


def test_socket_receive_buffer_finding(probe):
    f = by_id(probe.diagnose(mixed_window()))["drops.socket_receive_buffer"]
    assert f.title == "Socket receive buffers overflow"
    assert f.evidence == {
        "drops": 250,
        "drops_per_second": 35.714,
        "window_seconds": 7.0,
        "by_protocol": {"ipv4": 200, "ipv6": 50},
        "top_locations": [
            {"location": "0xffffffff81000000", "reason": "SOCKET_RCVBUFF", "count": 200},
            {"location": "0xffffffff81000800", "reason": "SOCKET_RCVBUFF", "count": 50},
        ],
        "net.core.rmem_default": 800_000,
        "net.core.rmem_max": 3_000_000,
    }
    # 4 x 3,000,000 rounded up to a power of two; the default is twice the current one.
    assert f.remediation[0] == "sysctl -w net.core.rmem_max=16777216"
    assert f.remediation[1] == "sysctl -w net.core.rmem_default=1600000"
    assert f.remediation[2] == ("let the application ask for a bigger buffer: "
                                "setsockopt(SO_RCVBUF, 16777216) (the kernel caps it at rmem_max)")
    assert f.impact == 250 / 7
    assert f.as_dict()["impact"] == 35.714
    assert f.summary.startswith("250 packets were dropped because a socket's receive buffer was "
                                "full (35.714/s).")
    assert "(rmem_default 800000 B, rmem_max 3000000 B)" in f.summary


def test_listen_overflow_finding(probe):
    f = by_id(probe.diagnose(mixed_window()))["drops.listen_overflow"]
    assert f.evidence == {
        "drops": 20,
        "drops_per_second": 2.857,
        "window_seconds": 7.0,
        "by_protocol": {"ipv4": 20},
        "top_locations": [{"location": "0xffffffff81000400", "reason": "TCP_LISTEN_OVERFLOW",
                           "count": 20}],
        "net.core.somaxconn": 4096,
        "net.ipv4.tcp_max_syn_backlog": 16384,
    }
    # The drops probe cannot see the listener's backlog: somaxconn is advised only for a backlog
    # it caps (node.listen_queue_overflow, which reads the listeners, says which).
    assert f.remediation == [
        "ss -ltn | awk '$2 >= $3'   # the full listener: Recv-Q at Send-Q; Send-Q is its backlog",
        "a backlog below somaxconn (4096): raise the application's listen() backlog (e.g. nginx "
        "'listen ... backlog=8192') or make it accept faster; no sysctl helps",
        "only a backlog equal to somaxconn is capped by it: sysctl -w net.core.somaxconn=8192, then "
        "restart the application so it calls listen() again",
    ]
    assert "net.core.somaxconn=4096" in f.summary


def test_netfilter_finding(probe):
    f = by_id(probe.diagnose(mixed_window()))["drops.netfilter"]
    assert f.evidence == {
        "drops": 30, "drops_per_second": 4.286, "window_seconds": 7.0, "by_protocol": {"ipv6": 30},
        "top_locations": [{"location": "0xffffffff81000800", "reason": "NETFILTER_DROP", "count": 30}],
    }
    assert f.remediation[0].startswith("nft list ruleset -a")
    assert f.impact == 30 / 7


def test_remediation_with_small_and_unreadable_sysctls(probe):
    facts = {"net.core.rmem_default": None, "net.core.rmem_max": None,
             "net.core.somaxconn": 128, "net.ipv4.tcp_max_syn_backlog": None}
    found = by_id(probe.diagnose(mixed_window(facts=facts)))
    rcv = found["drops.socket_receive_buffer"]
    assert rcv.remediation[:2] == ["sysctl -w net.core.rmem_max=4194304",
                                   "sysctl -w net.core.rmem_default=1048576"]
    assert rcv.evidence["net.core.rmem_max"] is None
    assert "sysctl -w net.core.somaxconn=4096," in found["drops.listen_overflow"].remediation[2]


def test_remediation_never_lowers_sysctls(probe):
    facts = {"net.core.rmem_default": 8 * MiB, "net.core.rmem_max": 128 * MiB,
             "net.core.somaxconn": 65535, "net.ipv4.tcp_max_syn_backlog": 262144}
    found = by_id(probe.diagnose(mixed_window(facts=facts)))
    assert found["drops.socket_receive_buffer"].remediation[:2] == [
        "sysctl -w net.core.rmem_max=134217728", "sysctl -w net.core.rmem_default=16777216"]
    assert "sysctl -w net.core.somaxconn=131070," in found["drops.listen_overflow"].remediation[2]


def test_not_drops_are_never_counted(probe):
    old = reading({("CONSUMED", "ipv4"): 0, ("NOT_DROPPED_YET", "ipv6"): 0})
    new = reading({("CONSUMED", "ipv4"): 10_000_000, ("NOT_DROPPED_YET", "ipv6"): 10_000_000},
                  {(LOC_D, "CONSUMED"): 10_000_000})
    assert probe.diagnose(Window(1.0, old, new)) == []
    w = DropsWindow.of(Window(1.0, old, new), probe.kallsyms.resolve)
    assert (w.by_reason, w.by_proto) == ({}, {})


def test_no_drops_no_findings(probe):
    assert probe.diagnose(Window(10.0, reading(), reading())) == []
    same = reading({("SOCKET_RCVBUFF", "ipv4"): 500})
    assert probe.diagnose(Window(10.0, same, same)) == []


@pytest.mark.parametrize("count, present", [(499, False), (500, True), (501, True)])
def test_top_reasons_threshold(probe, count, present):
    # 10 s window, default warning threshold 50/s: 500 drops is exactly at it.
    win = Window(10.0, reading({("NO_SOCKET", "ipv4"): 1000}),
                 reading({("NO_SOCKET", "ipv4"): 1000 + count}))
    findings = probe.diagnose(win)
    assert [f.id for f in findings] == (["drops.top_reasons"] if present else [])
    if present:
        assert findings[0].severity == "warning"
        assert findings[0].evidence["drops"] == count
        assert findings[0].evidence["threshold_per_second"] == 50.0


def test_top_reasons_custom_threshold(no_sysctl_reads):
    p = DropsProbe(Config(drops_rate_warning=5.0, drops_rate_critical=20.0))
    win = Window(2.0, None, reading({("NO_SOCKET", "ipv4"): 9}))     # 4.5/s
    assert p.diagnose(win) == []
    win = Window(2.0, None, reading({("NO_SOCKET", "ipv4"): 10}))    # 5/s
    assert [(f.id, f.severity) for f in p.diagnose(win)] == [("drops.top_reasons", "warning")]
    win = Window(2.0, None, reading({("NO_SOCKET", "ipv4"): 40}))    # 20/s, but answered
    assert [(f.id, f.severity) for f in p.diagnose(win)] == [("drops.top_reasons", "warning")]
    win = Window(2.0, None, reading({("SKB_CSUM", "ipv4"): 40}))     # 20/s
    assert [(f.id, f.severity) for f in p.diagnose(win)] == [("drops.top_reasons", "critical")]


@pytest.mark.parametrize("count, severity", [(9990, "warning"), (10_000, "critical"), (20_000, "critical")])
def test_top_reasons_severity(probe, count, severity):
    win = Window(10.0, None, reading({("SKB_CSUM", "ipv4"): count}))
    (f,) = probe.diagnose(win)
    assert (f.id, f.severity) == ("drops.top_reasons", severity)


def test_refused_packets_alone_are_never_critical(probe):
    """NO_SOCKET drops are answered (TCP reset, ICMP port unreachable): a service down, not a
    datapath losing packets. A warning however fast; critical once other drops reach the rate."""
    (f,) = probe.diagnose(Window(10.0, None, reading({("NO_SOCKET", "ipv4"): 50_000})))
    assert (f.id, f.severity, f.impact) == ("drops.top_reasons", "warning", 5000.0)
    assert f.summary == ("The kernel dropped 50000 packets in 10s (5000.0/s, threshold 50.0/s). Top reason: "
                         "NO_SOCKET (50000): packets to ports where no socket listens, answered with a "
                         "TCP reset or an ICMP port unreachable: clients see 'connection refused'. A "
                         "server is down or restarting, or clients use a wrong address or port.")
    assert f.remediation[0].startswith("ss -ltnup")
    (f,) = probe.diagnose(Window(10.0, None, reading({("NO_SOCKET", "ipv4"): 50_000,
                                                      ("UNHANDLED_PROTO", "other"): 50_000,
                                                      ("OTHERHOST", "ipv4"): 10_000})))
    assert f.severity == "warning"  # nothing there to receive any of them
    (f,) = probe.diagnose(Window(10.0, None, reading({("NO_SOCKET", "ipv4"): 50_000,
                                                      ("SKB_CSUM", "ipv4"): 10_000})))
    assert f.severity == "critical"


def test_backlog_drops_are_softirqs_when_it_runs(no_sysctl_reads):
    """CPU_BACKLOG drops are softnet.backlog_drops' (the softirq probe reads the same event from
    softnet_stat in every mode): with the softirq probe on, they do not make the summary rank."""
    win = Window(10.0, None, reading({("CPU_BACKLOG", "ipv4"): 20_000}))
    (f,) = DropsProbe(Config(probes=["drops", "softirq"])).diagnose(win)
    assert (f.id, f.severity, f.impact) == ("drops.top_reasons", "info", 0.0)
    (f,) = DropsProbe(Config(probes=["drops"])).diagnose(win)
    assert (f.id, f.severity, f.impact) == ("drops.top_reasons", "critical", 2000.0)


@pytest.mark.parametrize("count, severity", [(9999, "warning"), (10_000, "critical")])
def test_specific_severity(probe, count, severity):
    for reason, fid in (("SOCKET_RCVBUFF", "drops.socket_receive_buffer"),
                        ("TCP_LISTEN_OVERFLOW", "drops.listen_overflow"),
                        ("NETFILTER_DROP", "drops.netfilter")):
        found = by_id(probe.diagnose(Window(10.0, None, reading({(reason, "ipv4"): count}))))
        assert set(found) == {fid, "drops.top_reasons"}
        assert found[fid].severity == severity
        # The specific finding explains every drop: the summary is only info.
        assert found["drops.top_reasons"].severity == "info"


def top_reasons_window():
    old = reading({("SOCKET_RCVBUFF", "ipv4"): 1000, ("CONSUMED", "ipv4"): 5})
    new = reading({("SOCKET_RCVBUFF", "ipv4"): 6000, ("NO_SOCKET", "ipv4"): 400,
                   ("NO_SOCKET", "ipv6"): 200, ("NETFILTER_DROP", "ipv4"): 400,
                   ("CONSUMED", "ipv4"): 99_999},
                  {(LOC_A, "SOCKET_RCVBUFF"): 5000, (LOC_B, "NO_SOCKET"): 600,
                   (LOC_C, "NETFILTER_DROP"): 400, (LOC_D, "CONSUMED"): 99_999})
    return Window(10.0, old, new)


def test_top_reasons_evidence(probe):
    found = by_id(probe.diagnose(top_reasons_window()))
    assert list(found) == ["drops.socket_receive_buffer", "drops.netfilter", "drops.top_reasons"]
    f = found["drops.top_reasons"]
    assert f.severity == "warning"
    assert f.title == "High packet drop rate"
    assert f.evidence == {
        "drops": 6000,
        "drops_per_second": 600.0,
        "window_seconds": 10.0,
        "threshold_per_second": 50.0,
        "top_reasons": [
            {"reason": "SOCKET_RCVBUFF", "drops": 5000, "drops_per_second": 500.0},
            {"reason": "NO_SOCKET", "drops": 600, "drops_per_second": 60.0},
            {"reason": "NETFILTER_DROP", "drops": 400, "drops_per_second": 40.0},
        ],
        # CONSUMED frees are not drops, so their location is not a top drop location.
        "top_locations": [
            {"location": "0xffffffff81000000", "reason": "SOCKET_RCVBUFF", "count": 5000},
            {"location": "0xffffffff81000400", "reason": "NO_SOCKET", "count": 600},
            {"location": "0xffffffff81000800", "reason": "NETFILTER_DROP", "count": 400},
        ],
    }
    assert f.summary == ("The kernel dropped 6000 packets in 10s (600.0/s, threshold 50.0/s). "
                         "Top reason: SOCKET_RCVBUFF (5000).")
    assert f.remediation[0].startswith("look up the top reason SOCKET_RCVBUFF ")


def test_top_reasons_impact_counts_only_uncovered_drops(probe):
    found = by_id(probe.diagnose(top_reasons_window()))
    # Only NO_SOCKET (600 in 10 s) has no specific finding of its own.
    assert found["drops.top_reasons"].impact == 60.0
    assert found["drops.socket_receive_buffer"].impact == 500.0
    assert found["drops.netfilter"].impact == 40.0


def test_top_reasons_impact_zero_when_all_covered(probe):
    win = Window(10.0, None, reading({("SOCKET_RCVBUFF", "ipv4"): 600, ("TCP_LISTEN_OVERFLOW", "ipv4"): 300,
                                      ("NETFILTER_DROP", "ipv6"): 100}))
    found = by_id(probe.diagnose(win))
    assert set(found) == {"drops.socket_receive_buffer", "drops.listen_overflow", "drops.netfilter",
                          "drops.top_reasons"}
    assert found["drops.top_reasons"].impact == 0.0
    assert found["drops.top_reasons"].evidence["drops_per_second"] == 100.0


def test_top_reasons_lists_at_most_eight(probe):
    counts = {(f"REASON_{i}", "ipv4"): 100 * (i + 1) for i in range(10)}
    (f,) = probe.diagnose(Window(10.0, None, reading(counts)))
    assert [r["reason"] for r in f.evidence["top_reasons"]] == [f"REASON_{i}" for i in range(9, 1, -1)]
    assert f.evidence["drops"] == 5500
    assert f.impact == 550.0


def test_top_locations_use_resolved_names(probe, tmp_path):
    ks = tmp_path / "kallsyms"
    ks.write_text("ffffffff81000000 T sock_queue_rcv_skb\nffffffff81000700 t nf_hook_slow\n")
    probe.kallsyms = KallsymsResolver(str(ks))
    probe.kallsyms.resolve([LOC_A + 0x10, LOC_C])
    win = Window(1.0, None, reading({("SOCKET_RCVBUFF", "ipv4"): 10},
                                    {(LOC_A + 0x10, "SOCKET_RCVBUFF"): 7, (LOC_C, "SOCKET_RCVBUFF"): 3}))
    f = by_id(probe.diagnose(win))["drops.socket_receive_buffer"]
    assert f.evidence["top_locations"] == [
        {"location": "sock_queue_rcv_skb+0x10", "reason": "SOCKET_RCVBUFF", "count": 7},
        {"location": "nf_hook_slow+0x100", "reason": "SOCKET_RCVBUFF", "count": 3},
    ]


def test_diagnose_resolves_the_locations_it_shows(probe, tmp_path):
    """Names are resolved when a report shows them (not in the background), then cached."""
    ks = tmp_path / "kallsyms"
    ks.write_text("ffffffff81000000 T sock_queue_rcv_skb\n")
    probe.kallsyms = KallsymsResolver(str(ks))
    win = Window(1.0, None, reading({("SOCKET_RCVBUFF", "ipv4"): 5}, {(LOC_A + 0x20, "SOCKET_RCVBUFF"): 5}))
    assert probe.kallsyms.cached(LOC_A + 0x20) is None
    f = by_id(probe.diagnose(win))["drops.socket_receive_buffer"]
    assert f.evidence["top_locations"][0]["location"] == "sock_queue_rcv_skb+0x20"
    ks.unlink()  # cached: the next report does not scan again
    f = by_id(probe.diagnose(win))["drops.socket_receive_buffer"]
    assert f.evidence["top_locations"][0]["location"] == "sock_queue_rcv_skb+0x20"


def test_diagnose_without_sysctls_in_the_reading(probe):
    """A reading without info (an older snapshot) shows the sysctls as unreadable."""
    win = Window(1.0, None, {"counters": {"drops": {("SOCKET_RCVBUFF", "ipv4"): 5}, "locations": {}},
                             "gauges": {}})
    f = by_id(probe.diagnose(win))["drops.socket_receive_buffer"]
    assert (f.evidence["net.core.rmem_default"], f.evidence["net.core.rmem_max"]) == (None, None)


def test_one_function_per_finding_id():
    assert tuple(findings.FINDINGS) == DropsProbe.finding_ids
