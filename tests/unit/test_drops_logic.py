"""Unit tests for the pure logic of the drops probe and the probe base classes, and the text
rendering of the triage report. No BPF: readings are built by hand in the shape
DropsProbe.collect() returns, with the sysctls collect() reads in their info (diagnose reads
none: a sysctl read from it fails the test)."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from dpwatch.daemon import triage
from dpwatch.daemon.host import btf
from dpwatch.daemon.host import sysctl
from dpwatch.daemon.config import Config
from dpwatch.daemon.host.kallsyms import KallsymsResolver
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.probes.drops import probe as drops_mod
from dpwatch.probes.base import SEVERITY_RANK, Finding, Window, counter_delta
from dpwatch.probes import cdefs
from dpwatch.probes.drops import findings
from dpwatch.probes.drops.findings import DropsWindow, suggest_buffer
from dpwatch.probes.drops.probe import DropsProbe, load_reason_names, protocol_name, reason_name
from fakes import FakeHash, FakeLruHash, FakeModule, FakePerCpuArray, Struct

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


# -- base: counter_delta and Window ---------------------------------------------------------

def test_counter_delta():
    old = {"a": 5, "b": 10, "c": 3, "gone": 7}
    new = {"a": 8, "b": 4, "c": 3, "d": 2}
    # b went down: evicted from the LRU and re-added, so its new value is the increase.
    # c did not change and "gone" is no longer in the map: neither is reported.
    assert counter_delta(old, new) == {"a": 3, "b": 4, "d": 2}
    assert counter_delta({}, {"x": 0}) == {}
    assert counter_delta({"x": 5}, {"x": 0}) == {}
    assert counter_delta({}, {}) == {}


def test_window_delta_and_rate():
    old = reading({("NO_SOCKET", "ipv4"): 10})
    new = reading({("NO_SOCKET", "ipv4"): 35, ("NO_SOCKET", "ipv6"): 5})
    win = Window(10.0, old, new)
    assert win.seconds == 10.0
    assert win.delta("drops") == {("NO_SOCKET", "ipv4"): 25, ("NO_SOCKET", "ipv6"): 5}
    assert win.delta("locations") == {}
    assert win.delta("no_such_group") == {}
    assert win.rate(25) == 2.5
    assert win.rate(0) == 0.0


def test_window_without_old_reading():
    new = reading({("NO_SOCKET", "ipv4"): 35})
    win = Window(4.0, None, new)
    assert win.delta("drops") == {("NO_SOCKET", "ipv4"): 35}
    assert win.rate(35) == 8.75


def test_window_zero_seconds_does_not_divide_by_zero():
    win = Window(0.0, None, reading())
    assert win.seconds == 1e-9
    assert win.rate(0) == 0.0
    assert Window(-3.0, None, reading()).seconds == 1e-9


def test_finding_as_dict_rounds_impact():
    f = Finding(id="x.y", probe="x", severity="warning", title="t", summary="s", impact=1 / 3)
    assert f.as_dict() == {"id": "x.y", "probe": "x", "severity": "warning", "title": "t",
                           "summary": "s", "evidence": {}, "remediation": [], "impact": 0.333}


# -- base: mode choice ------------------------------------------------------------------------

def features(tracepoints=("skb:kfree_skb",), reason=True):
    return SimpleNamespace(has_tracepoint=lambda name: name in tracepoints, kfree_skb_reason=reason,
                           raw_tracepoints=True, kprobes=True, fentry=False, tracefs=None)


def test_choose_mode():
    p = DropsProbe(Config())
    mode, why = p.choose_mode(features())
    assert (mode.name, mode.degraded, why) == ("tracepoint", False, "skb:kfree_skb with the reason field")
    mode, why = p.choose_mode(features(reason=False))
    assert (mode.name, mode.degraded) == ("tracepoint-noreason", True)
    assert why.startswith("skb:kfree_skb has no reason field")
    mode, why = p.choose_mode(features(tracepoints=(), reason=False))
    assert mode is None
    assert why == ("tracepoint: missing tracepoint:skb:kfree_skb, tracepoint_field:skb:kfree_skb:reason; "
                   "tracepoint-noreason: missing tracepoint:skb:kfree_skb")


# -- reason names -----------------------------------------------------------------------------

NAMES = {2: "NOT_SPECIFIED", 6: "SOCKET_RCVBUFF", 12: "NETFILTER_DROP", (1 << 16) | 1: "OVS_THING"}


@pytest.mark.parametrize("value, name", [
    (6, "SOCKET_RCVBUFF"),
    (12, "NETFILTER_DROP"),
    (999, "UNKNOWN_999"),
    (0, "UNKNOWN_0"),
    ((3 << 16) | 5, "SUBSYS_3_5"),
    (1 << 16, "SUBSYS_1_0"),
    ((1 << 16) | 1, "OVS_THING"),     # a named subsystem value keeps its name
    (0xFFFF, "UNKNOWN_65535"),
])
def test_reason_name(value, name):
    assert reason_name(NAMES, value) == name


def test_reason_name_without_names():
    assert reason_name({}, 6) == "UNKNOWN_6"


KFREE_SKB_FORMAT = (
    "name: kfree_skb\nID: 1\nformat:\n"
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n"
    "\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n"
    "\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n"
    "\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n"
    'print fmt: "protocol=%u location=%pS reason: %s", REC->protocol, REC->location, '
    '__print_symbolic(REC->reason, { 1, "CONSUMED" }, { 2, "NOT_SPECIFIED" }, { 6, "SOCKET_RCVBUFF" }, '
    '{ 40, "TCP_LISTEN_OVERFLOW" })\n'
)


def write_tracefs(root, text=KFREE_SKB_FORMAT):
    d = root / "events" / "skb" / "kfree_skb"
    d.mkdir(parents=True)
    (d / "format").write_text(text)
    return str(root)


def test_load_reason_names_from_tracefs(tmp_path, monkeypatch):
    monkeypatch.setattr(btf, "read_enum", lambda name: pytest.fail("BTF must not be read"))
    names, source = load_reason_names(write_tracefs(tmp_path))
    assert names == {1: "CONSUMED", 2: "NOT_SPECIFIED", 6: "SOCKET_RCVBUFF", 40: "TCP_LISTEN_OVERFLOW"}
    assert source == "tracefs:skb/kfree_skb/format"


def test_load_reason_names_from_btf(tmp_path, monkeypatch):
    monkeypatch.setattr(btf, "read_enum", lambda name: {2: "SKB_DROP_REASON_NOT_SPECIFIED",
                                                        6: "SKB_DROP_REASON_SOCKET_RCVBUFF"}
                        if name == "skb_drop_reason" else None)
    names, source = load_reason_names(str(tmp_path))  # no events/ tree here
    assert names == {2: "NOT_SPECIFIED", 6: "SOCKET_RCVBUFF"}
    assert source == "btf:enum skb_drop_reason"


def test_load_reason_names_none(tmp_path, monkeypatch):
    def broken(name):
        raise btf.BTFError("bad blob")
    monkeypatch.setattr(btf, "read_enum", broken)
    assert load_reason_names(str(tmp_path)) == ({}, "none (reasons shown as numbers)")


def test_cflags_with_reason(tmp_path, monkeypatch):
    p = DropsProbe(Config(drops_other_entries=100, drops_location_entries=0, drops_location_sample=4))
    p.mode = DropsProbe.modes[0]
    assert p.cflags(SimpleNamespace(tracefs=write_tracefs(tmp_path))) == [
        "-DDROPS_HAVE_REASON=1", "-DDROPS_CONSUMED=1", "-DDROPS_MAX_REASON=41", "-DDROPS_OTHER_MAX=100",
        "-DDROPS_LOC_MAX=0", "-DDROPS_LOC_SAMPLE=4"]
    assert p.info() == {"reason_names": 4, "reason_name_source": "tracefs:skb/kfree_skb/format",
                        "dense_reasons": 41, "location_entries": 0, "location_sample": 4}


def test_cflags_caps_the_dense_array(tmp_path):
    text = KFREE_SKB_FORMAT.replace('{ 40, "TCP_LISTEN_OVERFLOW" }', '{ 0x20003, "SUBSYS_NAME" }')
    p = DropsProbe(Config())
    p.mode = DropsProbe.modes[0]
    flags = p.cflags(SimpleNamespace(tracefs=write_tracefs(tmp_path, text)))
    assert "-DDROPS_MAX_REASON=1024" in flags
    assert p.max_reason == 1024


def test_cflags_without_reason():
    p = DropsProbe(Config())
    p.mode = DropsProbe.modes[1]
    assert p.cflags(SimpleNamespace(tracefs=None)) == [
        "-DDROPS_MAX_REASON=1", "-DDROPS_OTHER_MAX=256", "-DDROPS_LOC_MAX=1024",
        "-DDROPS_LOC_SAMPLE=16"]
    assert p.names == {0: "UNKNOWN"}


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


def test_metrics_skip_not_drops(probe):
    r = reading({("SOCKET_RCVBUFF", "ipv4"): 5, ("CONSUMED", "ipv4"): 100,
                 ("NOT_DROPPED_YET", "ipv6"): 3, ("NO_SOCKET", "ipv6"): 2})
    (fam,) = list(probe.metrics(r))
    assert fam.name == "dpwatch_skb_drops"
    assert [(s.name, s.labels, s.value) for s in fam.samples] == [
        ("dpwatch_skb_drops_total", {"reason": "NO_SOCKET", "protocol": "ipv6"}, 2.0),
        ("dpwatch_skb_drops_total", {"reason": "SOCKET_RCVBUFF", "protocol": "ipv4"}, 5.0),
    ]


# -- ranking in build_report ------------------------------------------------------------------

class FakeManager:
    def __init__(self, probe, fresh):
        self.probe, self.fresh = probe, fresh

    def collect(self, inputs=None):
        return {"drops": self.fresh, "_manager": {"counters": {}, "gauges": {}}}

    def active(self):
        return {"drops": self.probe}

    def statuses(self):
        return [{"name": "drops", "state": "attached", "mode": "tracepoint",
                 "reason": "skb:kfree_skb with the reason field"}]


def test_build_report_ranks_specific_findings_first(probe):
    old = reading({})
    new = reading({("SOCKET_RCVBUFF", "ipv4"): 3000, ("NETFILTER_DROP", "ipv4"): 2000,
                   ("NO_SOCKET", "ipv4"): 100})
    ring = SnapshotRing(4)
    ring.append({"drops": old}, mono=time.monotonic() - 10.0)
    report = triage.build_report(FakeManager(probe, new), ring, 10.0,
                                 SimpleNamespace(kernel_release="6.1.0-test"))
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
    report = triage.build_report(FakeManager(probe, new), ring, 10.0,
                                 SimpleNamespace(kernel_release="k"))
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


# -- constants shared with bpf/drops.c (bpf/drops.h) --------------------------------------------

def test_protocol_classes_and_loc_exact_come_from_the_header():
    d = cdefs.defines("drops.h")
    assert drops_mod.PROTOCOLS == ("ipv4", "ipv6", "arp", "other")
    assert len(drops_mod.PROTOCOLS) == d["DROPS_PCLASSES"]
    assert [d[f"DROPS_PCLASS_{p.upper()}"] for p in drops_mod.PROTOCOLS] == [0, 1, 2, 3]
    assert drops_mod.LOC_EXACT == d["DROPS_LOC_EXACT"] == 64
    assert [protocol_name(i) for i in range(6)] == ["ipv4", "ipv6", "arp", "other", "other", "other"]


def test_the_c_source_defines_no_header_constant():
    c_text = cdefs.header_text("drops.c")
    for name in cdefs.defines("drops.h"):
        assert not re.search(rf"#\s*define\s+{name}\b", c_text), f"{name} is defined in drops.c too"
        assert re.search(rf"\b{name}\b", c_text), f"{name} is not used by drops.c"
    assert DropsProbe(Config()).source_text().startswith(cdefs.header_text("drops.h"))


def test_one_function_per_finding_id():
    assert tuple(findings.FINDINGS) == DropsProbe.finding_ids


# -- collect ------------------------------------------------------------------------------------

def test_collect_reads_counts_locations_and_sysctls(monkeypatch):
    values = dict(SYSCTLS)
    monkeypatch.setattr(sysctl, "read_int", lambda key: values[key])
    p = DropsProbe(Config())
    p.names, p.max_reason = {3: "NO_SOCKET", 6: "SOCKET_RCVBUFF"}, 8
    p.module = FakeModule(
        drops_counts=FakePerCpuArray(8 * len(drops_mod.PROTOCOLS), {1 * 8 + 6: [3, 4], 3 * 8 + 3: [1, 0]}),
        drops_other=FakeHash({Struct(reason=(2 << 16) | 1, pclass=0): [2, 2]}, per_cpu=True, ncpus=2),
        drops_locs=FakeLruHash({Struct(location=LOC_A, reason=6, pad=0): 7}))
    r = p.collect()
    assert r["counters"] == {
        "drops": {("SOCKET_RCVBUFF", "ipv6"): 7, ("NO_SOCKET", "other"): 1, ("SUBSYS_2_1", "ipv4"): 4},
        "locations": {(LOC_A, "SOCKET_RCVBUFF"): 7}}
    assert r["info"] == {"sysctls": SYSCTLS}
    assert p.collect()["info"]["sysctls"] is r["info"]["sysctls"]  # unchanged: the same object
    values["net.core.rmem_max"] = 1
    assert p.collect()["info"]["sysctls"]["net.core.rmem_max"] == 1


def test_diagnose_without_sysctls_in_the_reading(probe):
    """A reading without info (an older snapshot) shows the sysctls as unreadable."""
    win = Window(1.0, None, {"counters": {"drops": {("SOCKET_RCVBUFF", "ipv4"): 5}, "locations": {}},
                             "gauges": {}})
    f = by_id(probe.diagnose(win))["drops.socket_receive_buffer"]
    assert (f.evidence["net.core.rmem_default"], f.evidence["net.core.rmem_max"]) == (None, None)
