"""Unit tests for the frag probe: counters_from_snmp, the sockstat parser, collect() (the
reassembly sysctls go into the reading), the findings (probes/frag/findings.py, through
FragProbe.diagnose) and metrics(), with readings built by hand in the shape
FragProbe.collect() returns. No root, no BPF, no netlink."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dpwatch.daemon.config import Config
from dpwatch.daemon.host import paths, sysctl
from dpwatch.daemon.host.snmp import parse_snmp, parse_snmp6
from dpwatch.probes.base import Finding, Window
from dpwatch.probes.frag.findings import FRAG_DROP_REASONS, SYSCTLS
from dpwatch.probes.frag.probe import COUNTERS, FragProbe, counters_from_snmp, parse_sockstat_frag
from dpwatch.probes.mtu.model import Link
from test_snmp import SNMP6_RECORDED, SNMP_RECORDED

PROC_FIXTURES = str(Path(__file__).parent / "fixtures" / "proc")


# -- probes/frag/probe.py: counters_from_snmp ------------------------------------------------------------

def test_counters_from_snmp_recorded():
    out = counters_from_snmp(parse_snmp(SNMP_RECORDED), parse_snmp6(SNMP6_RECORDED))
    zero = {(name, fam): 0 for name in COUNTERS for fam in ("ipv4", "ipv6")}
    assert out == {**zero, ("dest_unreach_in", "ipv4"): 1406, ("dest_unreach_out", "ipv4"): 1405,
                   ("dest_unreach_in", "ipv6"): 1, ("dest_unreach_out", "ipv6"): 1}


def test_counters_from_snmp_exact_mapping():
    # A distinct value per source counter shows where each lands.
    v4 = {"Ip": {"FragCreates": 1, "FragOKs": 2, "FragFails": 3, "ReasmReqds": 4, "ReasmOKs": 5,
                 "ReasmFails": 6, "ReasmTimeout": 7, "InReceives": 999},
          "Icmp": {"InDestUnreachs": 8, "OutDestUnreachs": 9, "InMsgs": 999}}
    v6 = {"Ip6FragCreates": 11, "Ip6FragOKs": 12, "Ip6FragFails": 13, "Ip6ReasmReqds": 14,
          "Ip6ReasmOKs": 15, "Ip6ReasmFails": 16, "Ip6ReasmTimeout": 17, "Icmp6InDestUnreachs": 18,
          "Icmp6OutDestUnreachs": 19, "Icmp6OutPktTooBigs": 999}
    assert counters_from_snmp(v4, v6) == {
        ("frag_creates", "ipv4"): 1, ("frag_creates", "ipv6"): 11,
        ("frag_oks", "ipv4"): 2, ("frag_oks", "ipv6"): 12,
        ("frag_fails", "ipv4"): 3, ("frag_fails", "ipv6"): 13,
        ("reasm_reqds", "ipv4"): 4, ("reasm_reqds", "ipv6"): 14,
        ("reasm_oks", "ipv4"): 5, ("reasm_oks", "ipv6"): 15,
        ("reasm_fails", "ipv4"): 6, ("reasm_fails", "ipv6"): 16,
        ("reasm_timeout", "ipv4"): 7, ("reasm_timeout", "ipv6"): 17,
        ("dest_unreach_in", "ipv4"): 8, ("dest_unreach_in", "ipv6"): 18,
        ("dest_unreach_out", "ipv4"): 9, ("dest_unreach_out", "ipv6"): 19,
    }


def test_counters_from_snmp_without_ipv6():
    # SnmpFiles.read() returns {} for snmp6 when IPv6 is disabled.
    out = counters_from_snmp(parse_snmp(SNMP_RECORDED), {})
    assert set(out) == {(name, "ipv4") for name in COUNTERS}
    assert out[("dest_unreach_out", "ipv4")] == 1405


def test_counters_from_snmp_missing_tables():
    assert counters_from_snmp({}, {}) == {}
    assert counters_from_snmp({"Ip": {"FragCreates": 5}}, {}) == {("frag_creates", "ipv4"): 5}


# -- probes/frag/probe.py: collect ---------------------------------------------------------------------------

HIGH_THRESH = 4194304
SYSCTL_VALUES = {"net.ipv4.ipfrag_time": 30, "net.ipv4.ipfrag_high_thresh": HIGH_THRESH}


def test_frag_collect_reads_the_fixture_tree():
    """collect() over tests/unit/fixtures/proc: the snmp counters, the reassembly memory from
    sockstat(6), and the reassembly sysctls into info["sysctls"], which the finding quotes."""
    p = FragProbe(Config())
    with paths.roots(proc_root=PROC_FIXTURES):
        p.attach(None)
        try:
            reading = p.collect({})
        finally:
            p.close()
    snmp = reading["counters"]["snmp"]
    assert (snmp[("frag_creates", "ipv4")], snmp[("reasm_fails", "ipv4")], snmp[("reasm_timeout", "ipv4")]) == (10, 1, 1)
    assert (snmp[("frag_creates", "ipv6")], snmp[("reasm_fails", "ipv6")]) == (6, 1)
    assert reading["gauges"] == {"frag_memory": {("ipv4",): 2048, ("ipv6",): 0}}
    assert reading["info"] == {"sysctls": SYSCTL_VALUES} and list(SYSCTL_VALUES) == list(SYSCTLS)
    with paths.roots(proc_root="/nonexistent"):  # findings read nothing from the host
        found = {f.id: f for f in p.diagnose(Window(10, None, reading))}
    ev = found["frag.reassembly_failures"].evidence
    assert (ev["net.ipv4.ipfrag_time"], ev["net.ipv4.ipfrag_high_thresh"]) == (30, HIGH_THRESH)
    assert "(net.ipv4.ipfrag_time 30 s)" in found["frag.reassembly_failures"].summary


# -- probes/frag/findings.py, through FragProbe.diagnose ----------------------------------------------------

def refuse_sysctl(key):
    raise AssertionError(f"sysctl {key} read outside collect()")


@pytest.fixture
def frag_sysctls(monkeypatch):
    """Findings are pure: a sysctl read from diagnose() fails the test (collect() reads them)."""
    monkeypatch.setattr(sysctl, "read_int", refuse_sysctl)


def frag_reading(snmp: dict | None = None, drop_reasons: dict | None = None,
                 sysctls: dict | None = None) -> dict:
    counters = {"snmp": dict(snmp or {})}
    if drop_reasons is not None:
        counters["drop_reasons"] = {(r,): n for r, n in drop_reasons.items()}
    return {"counters": counters, "gauges": {},
            "info": {"sysctls": dict(SYSCTL_VALUES if sysctls is None else sysctls)}}


def by_id(findings: list[Finding]) -> dict[str, Finding]:
    out = {f.id: f for f in findings}
    assert len(out) == len(findings)
    return out


def test_frag_healthy(frag_sysctls):
    p = FragProbe(Config())
    base = {("frag_creates", "ipv4"): 100, ("reasm_fails", "ipv4"): 3, ("dest_unreach_out", "ipv4"): 7}
    old = frag_reading(base, {r: 5 for r in FRAG_DROP_REASONS})
    new = frag_reading({**base, ("dest_unreach_out", "ipv4"): 70, ("frag_oks", "ipv4"): 1},
                       {r: 5 for r in FRAG_DROP_REASONS})
    assert p.diagnose(Window(10, old, new)) == []
    assert p.diagnose(Window(10, None, frag_reading())) == []


@pytest.mark.parametrize("v4,v6,fires", [
    (10, 0, True),    # 1.0/s: at the threshold
    (9, 0, False),    # 0.9/s
    (6, 4, True),     # both families count
    (5, 4, False),
])
def test_frag_rate_threshold(frag_sysctls, v4, v6, fires):
    p = FragProbe(Config())
    assert p.config.frag_rate_warning == 1.0
    old = frag_reading({("frag_creates", "ipv4"): 1000, ("frag_creates", "ipv6"): 50})
    new = frag_reading({("frag_creates", "ipv4"): 1000 + v4, ("frag_creates", "ipv6"): 50 + v6})
    ids = [f.id for f in p.diagnose(Window(10, old, new))]
    assert ids == (["frag.fragmentation_active"] if fires else [])


def test_frag_rate_threshold_configured(frag_sysctls):
    p = FragProbe(Config(frag_rate_warning=5.0))
    new = frag_reading({("frag_creates", "ipv4"): 49})
    assert p.diagnose(Window(10, None, new)) == []
    new = frag_reading({("frag_creates", "ipv4"): 50})
    assert [f.id for f in p.diagnose(Window(10, None, new))] == ["frag.fragmentation_active"]


def test_frag_fails_alone_fire(frag_sysctls):
    p = FragProbe(Config())
    old = frag_reading({("frag_fails", "ipv6"): 2})
    new = frag_reading({("frag_fails", "ipv6"): 3})
    (f,) = p.diagnose(Window(60, old, new))
    # Nothing was fragmented: the failure is its own finding, never "the node is fragmenting".
    assert f.id == "frag.fragmentation_failed"
    assert f.evidence == {"fragmentation_failed": {"ipv4": 0, "ipv6": 1},
                          "fragments_created": {"ipv4": 0, "ipv6": 0},
                          "fragmentation_failed_per_second": round(1 / 60, 3), "pkt_too_big_drops": 0,
                          "window_seconds": 60.0}
    assert f.impact == pytest.approx(1 / 60)


def test_frag_fragmentation_active_exact(frag_sysctls):
    p = FragProbe(Config())
    old = frag_reading({("frag_creates", "ipv4"): 100, ("frag_creates", "ipv6"): 10,
                        ("frag_fails", "ipv4"): 1}, {"PKT_TOO_BIG": 4, "DUP_FRAG": 0})
    new = frag_reading({("frag_creates", "ipv4"): 130, ("frag_creates", "ipv6"): 20,
                        ("frag_fails", "ipv4"): 6}, {"PKT_TOO_BIG": 9, "DUP_FRAG": 0})
    f, failed = p.diagnose(Window(20, old, new))
    assert (f.id, f.probe, f.severity) == ("frag.fragmentation_active", "frag", "warning")
    assert f.summary.startswith("This node created 40 IP fragments in 20s (2.0/s). ")
    assert failed.id == "frag.fragmentation_failed" and failed.impact == pytest.approx(0.25)
    assert failed.summary.startswith("5 packets in 20s were bigger than the MTU")
    assert f.evidence == {"fragments_created": {"ipv4": 30, "ipv6": 10},
                          "fragmentation_failed": {"ipv4": 5, "ipv6": 0},
                          "fragments_created_per_second": 2.0, "pkt_too_big_drops": 5,
                          "window_seconds": 20.0}
    assert len(f.remediation) == 2
    assert f.impact == pytest.approx(2.0)


def _link(name, kind, mtu, netns=1, up=True):
    return Link(netns=netns, ifindex=hash(name) % 1000, name=name, kind=kind, mtu=mtu, up=up, master=None,
                lower=None, peer=None, underlay_family=None)


def test_frag_fragmentation_active_names_the_smaller_links(frag_sysctls):
    """With the mtu probe's audit at hand: the node's own links that are below the others are
    where it fragments (no overlay up); pods' ends, down links and lo do not count."""
    p = FragProbe(Config())
    links = [_link("lo", "loopback", 65536), _link("veth-a", "veth", 1500), _link("veth-b", "veth", 1400),
             _link("eth9", "device", 1280, up=False), _link("eth0", "veth", 1400, netns=2)]
    def own(links):  # what the mtu probe's reading hands the frag probe: its own netns' links
        return [{"name": ln.name, "kind": ln.kind, "mtu": ln.mtu, "up": ln.up} for ln in links if ln.netns == 1]
    new = frag_reading({("frag_creates", "ipv4"): 20})
    new["info"] = {"mtu_links": own(links)}
    (f,) = p.diagnose(Window(10, None, new))
    assert f.evidence["smaller_links"] == [{"name": "veth-b", "kind": "veth", "mtu": 1400}]
    assert f.evidence["largest_link_mtu"] == 1500
    assert ("here the node's own links differ: veth-b (MTU 1400) below the 1500 of the others" in f.summary
            and "typically an overlay" not in f.summary)
    # An overlay up: its overhead is the likelier cause, as without the audit.
    links.append(_link("vxlan0", "vxlan", 1450))
    new["info"] = {"mtu_links": own(links)}
    (f,) = p.diagnose(Window(10, None, new))
    assert "typically an overlay" in f.summary
    # All equal: nothing to name.
    new["info"] = {"mtu_links": own([_link("veth-a", "veth", 1500)])}
    (f,) = p.diagnose(Window(10, None, new))
    assert "smaller_links" not in f.evidence and "typically an overlay" in f.summary


def test_frag_reassembly_failures_exact(frag_sysctls):
    p = FragProbe(Config())
    drops_old = {"PKT_TOO_BIG": 0, "FRAG_REASM_TIMEOUT": 10, "DUP_FRAG": 1, "FRAG_TOO_FAR": 0}
    drops_new = {"PKT_TOO_BIG": 0, "FRAG_REASM_TIMEOUT": 13, "DUP_FRAG": 8, "FRAG_TOO_FAR": 2}
    old = frag_reading({("reasm_fails", "ipv4"): 50, ("reasm_timeout", "ipv4"): 20,
                        ("reasm_fails", "ipv6"): 0}, drops_old)
    new = frag_reading({("reasm_fails", "ipv4"): 60, ("reasm_timeout", "ipv4"): 23,
                        ("reasm_fails", "ipv6"): 4, ("reasm_timeout", "ipv6"): 1}, drops_new)
    (f,) = p.diagnose(Window(10, old, new))
    assert (f.id, f.probe, f.severity) == ("frag.reassembly_failures", "frag", "warning")
    assert f.summary == (
        "14 reassembly failures (4 timeouts) in 10s: whole packets are lost. 4 fragment sets timed out "
        "incomplete (net.ipv4.ipfrag_time 30 s): a fragment was lost on the way (a firewall that drops "
        "fragments, or loss on the path). 7 duplicate or overlapping fragments and 2 fragments too far "
        "out of order (net.ipv4.ipfrag_max_dist) were dropped with their sets.")
    assert f.evidence == {"reassembly_failed": {"ipv4": 10, "ipv6": 4},
                          "reassembly_timeouts": {"ipv4": 3, "ipv6": 1},
                          "failed_without_timeout": {"ipv4": 7, "ipv6": 3},
                          "drop_reasons": {"FRAG_REASM_TIMEOUT": 3, "DUP_FRAG": 7, "FRAG_TOO_FAR": 2},
                          "net.ipv4.ipfrag_time": 30,
                          "net.ipv4.ipfrag_high_thresh": HIGH_THRESH,
                          "window_seconds": 10.0}
    # bad fragments, not memory: no advice to give reassembly more of it
    assert not any("ipfrag_high_thresh" in r for r in f.remediation)
    assert any("tcpdump" in r for r in f.remediation) and any("ipfrag_max_dist" in r for r in f.remediation)
    assert f.impact == pytest.approx(1.4)


def test_frag_reassembly_timeouts_only(frag_sysctls):
    p = FragProbe(Config())
    (f,) = p.diagnose(Window(10, None, frag_reading({("reasm_timeout", "ipv6"): 1})))
    assert f.summary.startswith("0 reassembly failures (1 timeouts) in 10s: whole packets are lost. "
                                "1 fragment sets timed out incomplete")
    # no drops probe: the drop reasons read 0
    assert f.evidence["drop_reasons"] == {"FRAG_REASM_TIMEOUT": 0, "DUP_FRAG": 0, "FRAG_TOO_FAR": 0}
    assert not any("ipfrag_high_thresh" in r for r in f.remediation)
    assert f.impact == 0.0  # timeouts alone: no reassembly failures to rate


@pytest.mark.parametrize("high,suggested", [
    (4194304, 8388608),     # the kernel default (4 MiB) -> 8 MiB
    (2097152, 8388608),     # never below 8 MiB
    (8388608, 16777216),    # otherwise double
    (33554432, 67108864),
    (None, 8388608),        # unreadable sysctl
])
def test_frag_reassembly_memory_full(frag_sysctls, high, suggested):
    """Failures that are neither timeouts nor bad fragments: fragments refused while the
    reassembly memory is above ipfrag_high_thresh."""
    p = FragProbe(Config())
    new = frag_reading({("reasm_fails", "ipv4"): 71, ("reasm_timeout", "ipv4"): 0},
                       {"PKT_TOO_BIG": 0, "FRAG_REASM_TIMEOUT": 0, "DUP_FRAG": 0, "FRAG_TOO_FAR": 0},
                       {**SYSCTL_VALUES, "net.ipv4.ipfrag_high_thresh": high})
    new["gauges"]["frag_memory"] = {("ipv4",): 21736, ("ipv6",): 0}
    (f,) = p.diagnose(Window(10, None, new))
    assert f.id == "frag.reassembly_failures"
    assert f.evidence["net.ipv4.ipfrag_high_thresh"] == high
    assert f.evidence["failed_without_timeout"] == {"ipv4": 71, "ipv6": 0}
    assert f.evidence["reassembly_memory_bytes"] == {"ipv4": 21736, "ipv6": 0}
    assert (f"71 failed without a timeout or a bad fragment: the kernel refuses fragments while the "
            f"reassembly memory is above net.ipv4.ipfrag_high_thresh ({high} bytes); it holds 21736 "
            "bytes now.") in f.summary
    assert f.remediation[1] == f"sysctl -w net.ipv4.ipfrag_high_thresh={suggested}"
    assert f.remediation[2].endswith("sysctl -w net.ipv4.ipfrag_time=15")
    assert f.impact == pytest.approx(7.1)


def test_parse_sockstat_frag():
    text = "sockets: used 14\nTCP: inuse 1 orphan 0 tw 1 alloc 2 mem 282\nFRAG: inuse 5 memory 21736\n"
    assert parse_sockstat_frag(text, "FRAG:") == 21736
    assert parse_sockstat_frag("TCP6: inuse 0\nFRAG6: inuse 0 memory 0\n", "FRAG6:") == 0
    assert parse_sockstat_frag(text, "FRAG6:") is None
    assert parse_sockstat_frag("FRAG: inuse 5 memory x\n", "FRAG:") is None


def test_frag_both_findings(frag_sysctls):
    p = FragProbe(Config())
    new = frag_reading({("frag_creates", "ipv4"): 100, ("reasm_fails", "ipv4"): 1})
    assert [f.id for f in p.diagnose(Window(10, None, new))] == [
        "frag.fragmentation_active", "frag.reassembly_failures"]


def test_frag_counter_reset_counts_new_value(frag_sysctls):
    # counter_delta: a counter that went down (netns recreated) counts its new value.
    p = FragProbe(Config())
    old = frag_reading({("frag_creates", "ipv4"): 5000})
    new = frag_reading({("frag_creates", "ipv4"): 12})
    (f,) = p.diagnose(Window(10, old, new))
    assert f.evidence["fragments_created"] == {"ipv4": 12, "ipv6": 0}


# -- metrics helpers --------------------------------------------------------------------------------

class OneShot:
    def __init__(self, families):
        self.families = list(families)

    def collect(self, inputs=None):
        return iter(self.families)


def exposition(probe, reading: dict) -> list[str]:
    reg = CollectorRegistry()
    reg.register(OneShot(probe.metrics(reading)))
    text = generate_latest(reg).decode()
    assert "_created" not in text.replace("dpwatch_ip_fragments_created", "")
    return [ln for ln in text.splitlines() if not ln.startswith("# HELP")]


def test_frag_metrics_exact():
    p = FragProbe(Config())
    snmp = {("frag_creates", "ipv4"): 12, ("frag_creates", "ipv6"): 3, ("frag_fails", "ipv4"): 1,
            ("frag_oks", "ipv4"): 5, ("reasm_oks", "ipv6"): 2,  # not exported
            ("reasm_fails", "ipv4"): 2, ("reasm_timeout", "ipv6"): 4, ("reasm_reqds", "ipv4"): 30,
            ("dest_unreach_in", "ipv4"): 1406, ("dest_unreach_out", "ipv4"): 1405,
            ("dest_unreach_out", "ipv6"): 1}
    assert exposition(p, frag_reading(snmp)) == [
        "# TYPE dpwatch_ip_fragments_created_total counter",
        'dpwatch_ip_fragments_created_total{family="ipv4"} 12.0',
        'dpwatch_ip_fragments_created_total{family="ipv6"} 3.0',
        "# TYPE dpwatch_ip_fragmentation_failed_total counter",
        'dpwatch_ip_fragmentation_failed_total{family="ipv4"} 1.0',
        "# TYPE dpwatch_ip_reassembly_failed_total counter",
        'dpwatch_ip_reassembly_failed_total{family="ipv4"} 2.0',
        "# TYPE dpwatch_ip_reassembly_timeouts_total counter",
        'dpwatch_ip_reassembly_timeouts_total{family="ipv6"} 4.0',
        "# TYPE dpwatch_ip_fragments_received_total counter",
        'dpwatch_ip_fragments_received_total{family="ipv4"} 30.0',
        "# TYPE dpwatch_icmp_dest_unreachable_total counter",
        'dpwatch_icmp_dest_unreachable_total{direction="received",family="ipv4"} 1406.0',
        'dpwatch_icmp_dest_unreachable_total{direction="sent",family="ipv4"} 1405.0',
        'dpwatch_icmp_dest_unreachable_total{direction="sent",family="ipv6"} 1.0',
    ]


def test_frag_metrics_recorded():
    p = FragProbe(Config())
    snmp = counters_from_snmp(parse_snmp(SNMP_RECORDED), parse_snmp6(SNMP6_RECORDED))
    lines = exposition(p, frag_reading(snmp))
    assert 'dpwatch_ip_fragments_created_total{family="ipv6"} 0.0' in lines
    assert [ln for ln in lines if ln.startswith("dpwatch_icmp_dest_unreachable_total")] == [
        'dpwatch_icmp_dest_unreachable_total{direction="received",family="ipv4"} 1406.0',
        'dpwatch_icmp_dest_unreachable_total{direction="received",family="ipv6"} 1.0',
        'dpwatch_icmp_dest_unreachable_total{direction="sent",family="ipv4"} 1405.0',
        'dpwatch_icmp_dest_unreachable_total{direction="sent",family="ipv6"} 1.0',
    ]
    assert len([ln for ln in lines if not ln.startswith("#")]) == 14  # 5 families x 2 + 4
