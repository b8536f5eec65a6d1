"""Unit tests for the pure logic of the frag and mtu probes and of daemon/host/snmp.py: the
/proc/net/snmp{,6} parsers against contents recorded on a real kernel (pasted below),
counters_from_snmp, decode_recent, diagnose() and metrics() with readings built by hand in
the shape FragProbe.collect() / MtuProbe.collect() return. No root, no BPF, no netlink."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dpwatch.daemon.host import sysctl
from dpwatch.daemon.config import Config
from dpwatch.probes.mtu.audit import Issue, Link, Snapshot, cni_remediation
from dpwatch.daemon.host.snmp import parse_snmp, parse_snmp6
from dpwatch.probes.base import Finding, Window
from dpwatch.probes.frag.probe import COUNTERS, FRAG_DROP_REASONS, FragProbe, counters_from_snmp, parse_sockstat_frag
from dpwatch.probes.mtu.probe import MtuProbe, decode_recent

# -- recorded contents ------------------------------------------------------------------------
#
# Recorded 2026-11-21 13:59 UTC on the dev VM (kernel 6.18.44-fc-v445), as root, in the init
# netns: `cat /proc/net/snmp` (complete, verbatim) and `cat /proc/net/snmp6` (90 lines; the
# excerpt below is lines 1-20 (every Ip6 counter up to Ip6FragCreates), 34-41 (Icmp6InMsgs ..
# Icmp6InPktTooBigs) and 55-56 (Icmp6OutDestUnreachs, Icmp6OutPktTooBigs), verbatim: the kernel
# pads names with spaces and a tab). Nothing fragmented on this machine, so the frag counters are
# genuinely 0; the 1405/1406 ICMP destination-unreachables are the UDP NoPorts traffic (Udp
# NoPorts 1405) answered to itself over lo.
SNMP_RECORDED = (
    'Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates OutTransmits\n'
    'Ip: 2 64 13149 0 0 0 0 0 13149 11116 0 0 0 0 0 0 0 0 0 11116\n'
    'Icmp: InMsgs InErrors InCsumErrors InDestUnreachs InTimeExcds InParmProbs InSrcQuenchs InRedirects InEchos InEchoReps InTimestamps InTimestampReps InAddrMasks InAddrMaskReps OutMsgs OutErrors OutRateLimitGlobal OutRateLimitHost OutDestUnreachs OutTimeExcds OutParmProbs OutSrcQuenchs OutRedirects OutEchos OutEchoReps OutTimestamps OutTimestampReps OutAddrMasks OutAddrMaskReps\n'
    'Icmp: 1406 0 0 1406 0 0 0 0 0 0 0 0 0 0 1405 0 0 0 1405 0 0 0 0 0 0 0 0 0 0\n'
    'IcmpMsg: InType3 OutType3\n'
    'IcmpMsg: 1406 1405\n'
    'Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n'
    'Tcp: 1 200 120000 -1 209 178 0 0 0 7265 5233 0 0 34 0\n'
    'Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n'
    'Udp: 73 1405 2999 4479 2999 0 0 0 0\n'
    'UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n'
    'UdpLite: 0 0 0 0 0 0 0 0 0\n'
)

SNMP6_RECORDED = (
    'Ip6InReceives                   \t4\n'
    'Ip6InHdrErrors                  \t0\n'
    'Ip6InTooBigErrors               \t0\n'
    'Ip6InNoRoutes                   \t2\n'
    'Ip6InAddrErrors                 \t0\n'
    'Ip6InUnknownProtos              \t0\n'
    'Ip6InTruncatedPkts              \t0\n'
    'Ip6InDiscards                   \t0\n'
    'Ip6InDelivers                   \t1\n'
    'Ip6OutForwDatagrams             \t0\n'
    'Ip6OutRequests                  \t10\n'
    'Ip6OutDiscards                  \t0\n'
    'Ip6OutNoRoutes                  \t0\n'
    'Ip6ReasmTimeout                 \t0\n'
    'Ip6ReasmReqds                   \t0\n'
    'Ip6ReasmOKs                     \t0\n'
    'Ip6ReasmFails                   \t0\n'
    'Ip6FragOKs                      \t0\n'
    'Ip6FragFails                    \t0\n'
    'Ip6FragCreates                  \t0\n'
    'Icmp6InMsgs                     \t1\n'
    'Icmp6InErrors                   \t1\n'
    'Icmp6OutMsgs                    \t9\n'
    'Icmp6OutErrors                  \t0\n'
    'Icmp6InCsumErrors               \t0\n'
    'Icmp6OutRateLimitHost           \t0\n'
    'Icmp6InDestUnreachs             \t1\n'
    'Icmp6InPktTooBigs               \t0\n'
    'Icmp6OutDestUnreachs            \t1\n'
    'Icmp6OutPktTooBigs              \t0\n'
)


# -- daemon/host/snmp.py -----------------------------------------------------------------------------

def test_parse_snmp_recorded():
    out = parse_snmp(SNMP_RECORDED)
    assert list(out) == ["Ip", "Icmp", "IcmpMsg", "Tcp", "Udp", "UdpLite"]
    assert out["Ip"]["FragCreates"] == 0
    assert out["Ip"]["ReasmFails"] == 0
    assert out["Ip"]["ReasmTimeout"] == 0
    assert out["Ip"]["InReceives"] == 13149
    assert out["Ip"]["OutTransmits"] == 11116
    assert out["Ip"]["Forwarding"] == 2
    assert len(out["Ip"]) == 20
    assert out["Icmp"]["OutDestUnreachs"] == 1405
    assert out["Icmp"]["InDestUnreachs"] == 1406
    assert len(out["Icmp"]) == 29
    assert out["IcmpMsg"] == {"InType3": 1406, "OutType3": 1405}
    assert out["Tcp"]["MaxConn"] == -1  # negative values parse
    assert out["Udp"]["NoPorts"] == 1405
    assert out["UdpLite"] == {k: 0 for k in out["Udp"]}


def test_parse_snmp_ignores_blank_lines():
    text = "\n" + SNMP_RECORDED.replace("\n", "\n\n") + "  \n"
    assert parse_snmp(text) == parse_snmp(SNMP_RECORDED)
    assert parse_snmp("") == {}


def test_parse_snmp_unpaired_header_in_the_middle():
    lines = SNMP_RECORDED.splitlines()
    del lines[3]  # the Icmp value line: the Icmp header is now followed by the IcmpMsg header
    del lines[-1]  # and the last value line, so the line count stays even
    with pytest.raises(ValueError, match=r"unpaired snmp lines: \['Icmp:'\] / \['IcmpMsg:'\]"):
        parse_snmp("\n".join(lines))


def test_parse_snmp_unpaired_header_at_the_end():
    # A trailing header without its value line (a truncated read) must not be dropped silently.
    lines = SNMP_RECORDED.splitlines()
    with pytest.raises(ValueError, match=r"unpaired snmp lines: \['UdpLite:'\]"):
        parse_snmp("\n".join(lines[:-1]))
    with pytest.raises(ValueError, match="unpaired"):
        parse_snmp(lines[0])


def test_parse_snmp_header_value_count_mismatch():
    lines = SNMP_RECORDED.splitlines()
    lines[5] = "IcmpMsg: 1406"
    with pytest.raises(ValueError, match="IcmpMsg: has 2 names and 1 values"):
        parse_snmp("\n".join(lines))
    lines = SNMP_RECORDED.splitlines()
    lines[1] += " 7"
    with pytest.raises(ValueError, match="Ip: has 20 names and 21 values"):
        parse_snmp("\n".join(lines))


def test_parse_snmp6_recorded():
    out = parse_snmp6(SNMP6_RECORDED)
    assert len(out) == 30
    assert out["Ip6ReasmTimeout"] == 0
    assert out["Icmp6OutPktTooBigs"] == 0
    assert out["Icmp6InPktTooBigs"] == 0
    assert out["Ip6InReceives"] == 4
    assert out["Ip6OutRequests"] == 10
    assert out["Icmp6OutMsgs"] == 9
    assert out["Icmp6InDestUnreachs"] == 1
    assert out["Icmp6OutDestUnreachs"] == 1


@pytest.mark.parametrize("line", ["Ip6InReceives", "Ip6InReceives 4 5", "Ip6InReceives\t4 extra"])
def test_parse_snmp6_bad_line(line):
    with pytest.raises(ValueError, match="bad snmp6 line"):
        parse_snmp6(SNMP6_RECORDED + line + "\n")


def test_parse_snmp6_non_integer():
    with pytest.raises(ValueError):
        parse_snmp6("Ip6InReceives  four\n")


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


# -- probes/frag/probe.py: diagnose -------------------------------------------------------------------------

HIGH_THRESH = 4194304


@pytest.fixture
def frag_sysctls(monkeypatch):
    values = {"net.ipv4.ipfrag_time": 30, "net.ipv4.ipfrag_high_thresh": HIGH_THRESH}
    # An unexpected key raises KeyError, so the test notices a new sysctl read.
    monkeypatch.setattr(sysctl, "read_int", lambda key: values[key])
    return values


def frag_reading(snmp: dict | None = None, drop_reasons: dict | None = None) -> dict:
    counters = {"snmp": dict(snmp or {})}
    if drop_reasons is not None:
        counters["drop_reasons"] = {(r,): n for r, n in drop_reasons.items()}
    return {"counters": counters, "gauges": {}}


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
    frag_sysctls["net.ipv4.ipfrag_high_thresh"] = high
    p = FragProbe(Config())
    new = frag_reading({("reasm_fails", "ipv4"): 71, ("reasm_timeout", "ipv4"): 0},
                       {"PKT_TOO_BIG": 0, "FRAG_REASM_TIMEOUT": 0, "DUP_FRAG": 0, "FRAG_TOO_FAR": 0})
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


# -- probes/mtu/probe.py: decode_recent -----------------------------------------------------------------

NOW = 10_000_000_000


def test_decode_recent_sent():
    key = SimpleNamespace(daddr=bytes([10, 0, 0, 9]), dir=0, mtu=0)
    value = SimpleNamespace(count=3, last_ns=NOW - 1_260_000_000)
    assert decode_recent(key, value, NOW) == {"direction": "sent", "dst": "10.0.0.9", "mtu": None,
                                              "count": 3, "seconds_ago": 1.3}


def test_decode_recent_received():
    key = SimpleNamespace(daddr=bytes([192, 0, 2, 7]), dir=1, mtu=1380)
    value = SimpleNamespace(count=1, last_ns=NOW)
    assert decode_recent(key, value, NOW) == {"direction": "received", "dst": "192.0.2.7", "mtu": 1380,
                                              "count": 1, "seconds_ago": 0.0}


def test_decode_recent_unknown_dir_and_future_timestamp():
    key = SimpleNamespace(daddr=[198, 18, 0, 1], dir=7, mtu=1400)  # a ctypes array works like a list
    value = SimpleNamespace(count=2, last_ns=NOW + 5_000_000)  # another CPU's clock, just ahead
    assert decode_recent(key, value, NOW) == {"direction": "7", "dst": "198.18.0.1", "mtu": 1400,
                                              "count": 2, "seconds_ago": 0.0}


# -- probes/mtu/probe.py: diagnose ---------------------------------------------------------------------------

def mtu_mode(name: str):
    (m,) = [m for m in MtuProbe.modes if m.name == name]
    return m


@pytest.fixture
def mtu_probe(monkeypatch):
    p = MtuProbe(Config())
    p.mode = mtu_mode("tracepoint")
    calls: list[str] = []

    def route_mtu(dst):
        calls.append(dst)
        return 1400
    monkeypatch.setattr(p, "route_mtu", route_mtu)
    p.route_calls = calls
    return p


def mtu_reading(frag_needed=None, issues=(), recent=(), pmtu=(), interface_mtu=None) -> dict:
    return {"counters": {"frag_needed": dict(frag_needed or {})},
            "gauges": {"interface_mtu": dict(interface_mtu or {}), "mismatches": {(): len(issues)}},
            "info": {"issues": list(issues), "recent": list(recent), "pmtu": list(pmtu)}}


def dev(name, kind, mtu, netns=4026531840):
    return {"netns": netns, "name": name, "kind": kind, "mtu": mtu}


VETH = Issue("veth_mismatch", [dev("veth1", "veth", 1500), dev("eth0", "veth", 1450, 4026532500)],
             None, 1450, "veth1 (1500) and its peer eth0 (1450) differ.",
             ["ip link set dev veth1 mtu 1450", "recreate the pods"])
OVERLAY = Issue("overlay_too_big", [dev("vxlan.calico", "vxlan", 1500), dev("eth0", "device", 1500)],
                50, 1450, "vxlan.calico (1500) + 50 bytes does not fit eth0 (1500).",
                ["ip link set dev vxlan.calico mtu 1450", "recreate the pods"])
BRIDGE = Issue("bridge_ports_differ", [dev("br0", "bridge", 1500), dev("veth9", "veth", 1480)],
               None, 1480, "bridge br0 ports differ (1500, 1480).",
               ["ip link set dev br0 mtu 1480"])


def test_mtu_healthy(mtu_probe):
    r = mtu_reading({("ipv4", "sent"): 5, ("ipv6", "received"): 2},
                    recent=[{"direction": "sent", "dst": "10.0.0.9", "mtu": None, "count": 5,
                             "seconds_ago": 1.0}],
                    interface_mtu={("eth0", "device"): 1500})
    assert mtu_probe.diagnose(Window(10, r, r)) == []
    assert mtu_probe.diagnose(Window(10, None, mtu_reading())) == []
    assert mtu_probe.route_calls == []


def test_mtu_mismatch_exact(mtu_probe):
    mtu_probe.own_ino = 4026531840  # the daemon's netns: veth1's, the bigger end
    r = mtu_reading(issues=[VETH, OVERLAY, BRIDGE])
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert (f.id, f.probe, f.severity) == ("mtu.mismatch", "mtu", "critical")
    assert f.summary == (
        "The MTU audit found 3 problem(s): veth1 (1500) and its peer eth0 (1450) differ. "
        "vxlan.calico (1500) + 50 bytes does not fit eth0 (1500). bridge br0 ports differ (1500, 1480). "
        "Packets bigger than the smallest MTU on the path are dropped silently or fragmented: "
        "connections hang on large transfers while small ones work.")
    assert f.evidence == {
        "mismatches": [
            {"kind": "veth_mismatch", "devices": VETH.devices, "overhead": None, "safe_mtu": 1450,
             "node_end_bigger": True},
            {"kind": "overlay_too_big", "devices": OVERLAY.devices, "overhead": 50, "safe_mtu": 1450},
            {"kind": "bridge_ports_differ", "devices": BRIDGE.devices, "overhead": None, "safe_mtu": 1480},
        ],
        "safe_mtu": 1450}
    # de-duplicated, in first-seen order, then the CNI settings for the safe MTU with the overhead
    # of the issue that set it (Cilium wants the underlay MTU: 1450 + 50)
    assert f.remediation == ["ip link set dev veth1 mtu 1450", "recreate the pods",
                             "ip link set dev vxlan.calico mtu 1450",
                             "ip link set dev br0 mtu 1480"] + cni_remediation(1450, 50)
    assert "--set MTU=1500" in f.remediation[4]
    assert f.impact == 3.0
    # The pod's end the bigger one (or the daemon's netns unknown): the node's sends fit.
    mtu_probe.own_ino = 4026532500
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.evidence["mismatches"][0]["node_end_bigger"] is False


def test_mtu_mismatch_safe_without_overhead(mtu_probe):
    r = mtu_reading(issues=[BRIDGE, VETH])
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.evidence["safe_mtu"] == 1450
    assert f.remediation == ["ip link set dev br0 mtu 1480", "ip link set dev veth1 mtu 1450",
                             "recreate the pods"] + cni_remediation(1450, None)
    assert "--set MTU=1450" in f.remediation[3]


def test_mtu_mismatch_no_cni_lines_twice(mtu_probe):
    cni = cni_remediation(1450, 50)
    issue = Issue("pod_above_overlay", [dev("eth0", "veth", 1500, 4026532500)], 50, 1450,
                  "pod eth0 (1500) is above the overlay MTU (1450).", ["lower the pod MTU"] + cni)
    r = mtu_reading(issues=[issue, OVERLAY])
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.remediation == ["lower the pod MTU"] + cni + ["ip link set dev vxlan.calico mtu 1450",
                                                           "recreate the pods"]


def test_mtu_mismatch_no_safe_mtu_many_issues(mtu_probe):
    issues = [Issue("veth_mismatch", [], None, None, f"issue {i}.", [f"step {i % 2}"]) for i in range(5)]
    r = mtu_reading(issues=issues)
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.evidence["safe_mtu"] is None
    assert f.remediation == ["step 0", "step 1"]  # no CNI lines without a safe MTU
    assert f.summary.startswith("The MTU audit found 5 problem(s): issue 0. issue 1. issue 2. ... Packets")
    assert f.impact == 5.0


def test_mtu_pmtu_frag_needed_exact(mtu_probe):
    old = mtu_reading({("ipv4", "sent"): 5, ("ipv6", "received"): 1})
    recent = [
        {"direction": "sent", "dst": "10.0.0.9", "mtu": None, "count": 3, "seconds_ago": 0.5},
        {"direction": "received", "dst": "192.0.2.7", "mtu": 1380, "count": 2, "seconds_ago": 4.0},
        {"direction": "received", "dst": "192.0.2.8", "mtu": 1200, "count": 9, "seconds_ago": 10.5},
        {"direction": "sent", "dst": "10.0.0.10", "mtu": None, "count": 1, "seconds_ago": 30.0},
    ]
    pmtu = [{"netns": 4026531840, "dst": "2001:db8::1", "dev": "eth0", "mtu": 1280, "expires": 590},
            {"netns": 4026531840, "dst": "198.51.100.1", "dev": "eth0", "mtu": None, "expires": 0}]
    new = mtu_reading({("ipv4", "sent"): 8, ("ipv6", "received"): 3}, recent=recent, pmtu=pmtu)
    (f,) = mtu_probe.diagnose(Window(10, old, new))
    assert (f.id, f.probe, f.severity) == ("mtu.pmtu_frag_needed", "mtu", "warning")
    # only the sent row inside the window asks for the route MTU; rows older than 10s are ignored
    assert mtu_probe.route_calls == ["10.0.0.9"]
    assert f.summary == (
        "5 ICMP frag-needed/packet-too-big messages in 10s (ipv4 sent: 3, ipv6 received: 2). "
        "A path has a smaller MTU than senders use (announced: 1280, 1380, 1400). "
        "If anything on the path drops ICMP, this becomes a black hole.")
    assert f.evidence == {
        "frag_needed": {"ipv4_sent": 3, "ipv6_received": 2},
        "recent": [{"direction": "sent", "dst": "10.0.0.9", "mtu": 1400, "count": 3},
                   {"direction": "received", "dst": "192.0.2.7", "mtu": 1380, "count": 2}],
        "pmtu_cache": pmtu, "announced_mtus": [1280, 1380, 1400], "window_seconds": 10.0}
    assert f.remediation[0] == ("set the sending side's MTU to the announced MTU (or lower): "
                                "ip link set dev <dev> mtu 1280")
    assert f.impact == 0.5


def test_mtu_pmtu_frag_needed_nothing_announced(mtu_probe):
    new = mtu_reading({("ipv6", "sent"): 4})
    (f,) = mtu_probe.diagnose(Window(2, None, new))
    assert f.id == "mtu.pmtu_frag_needed"
    assert f.summary == ("4 ICMP frag-needed/packet-too-big messages in 2s (ipv6 sent: 4). A path has a "
                         "smaller MTU than senders use. If anything on the path drops ICMP, this becomes "
                         "a black hole.")
    assert f.evidence["announced_mtus"] == []
    assert f.remediation[0].endswith("mtu <announced>")
    assert mtu_probe.route_calls == []


def test_mtu_both_findings(mtu_probe):
    new = mtu_reading({("ipv4", "sent"): 1}, issues=[VETH])
    assert [f.id for f in mtu_probe.diagnose(Window(10, None, new))] == ["mtu.mismatch",
                                                                          "mtu.pmtu_frag_needed"]


# -- probes/mtu/probe.py: metrics ----------------------------------------------------------------------------

def test_mtu_metrics_exact():
    p = MtuProbe(Config(mtu_max_interfaces=2))
    p.mode = mtu_mode("tracepoint")
    r = mtu_reading({("ipv4", "sent"): 8, ("ipv6", "sent"): 2, ("ipv6", "received"): 3},
                    issues=[VETH, OVERLAY, BRIDGE],
                    interface_mtu={("vxlan.calico", "vxlan"): 1450, ("lo", "loopback"): 65536,
                                   ("eth0", "device"): 1500})
    assert exposition(p, r) == [
        "# TYPE dpwatch_icmp_frag_needed_sent_total counter",
        'dpwatch_icmp_frag_needed_sent_total{family="ipv4"} 8.0',
        'dpwatch_icmp_frag_needed_sent_total{family="ipv6"} 2.0',
        "# TYPE dpwatch_icmp_frag_needed_received_total counter",
        'dpwatch_icmp_frag_needed_received_total{family="ipv6"} 3.0',
        "# TYPE dpwatch_interface_mtu_bytes gauge",
        'dpwatch_interface_mtu_bytes{interface="eth0",kind="device"} 1500.0',
        'dpwatch_interface_mtu_bytes{interface="lo",kind="loopback"} 65536.0',
        "# TYPE dpwatch_mtu_mismatches gauge",
        "dpwatch_mtu_mismatches 3.0",
    ]


def test_mtu_metrics_default_cap_and_empty():
    p = MtuProbe(Config())
    assert p.config.mtu_max_interfaces == 512
    r = mtu_reading(interface_mtu={(f"veth{i}", "veth"): 1450 for i in range(3)})
    lines = exposition(p, r)
    assert [ln for ln in lines if ln.startswith("dpwatch_interface_mtu_bytes")] == [
        f'dpwatch_interface_mtu_bytes{{interface="veth{i}",kind="veth"}} 1450.0' for i in range(3)]
    assert "dpwatch_mtu_mismatches 0.0" in lines
    assert not any(ln.startswith("dpwatch_icmp_frag_needed") for ln in lines)
