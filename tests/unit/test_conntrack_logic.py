"""Unit tests for the pure logic of the conntrack probe: the /proc and netlink decoders, the
ct_recent decoder, diagnose(), metrics() and choose_mode(). No root, no BPF, no network:
the decoders run against contents recorded on a real kernel (pasted below), and readings
are built by hand in the shape ConntrackProbe.collect() returns."""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dpwatch.daemon.host import paths, sysctl
from dpwatch.daemon.config import Config
from dpwatch.probes import cdefs
from dpwatch.probes.conntrack import probe as ct_mod
from dpwatch.probes.base import Finding, Window
from dpwatch.probes.conntrack import findings as ct_findings
from dpwatch.probes.conntrack.findings import ENTRY_BYTES, remedy
from dpwatch.probes.conntrack.probe import (CT_MAX_SYSCTL, EVENTS, STAT_FIELDS, ConntrackProbe,
                                      NetnsSource, decode_recent, format_tuple, parse_proc_stat,
                                      sum_netlink_stats)
from fakes import FakeLruHash, FakeModule, FakePerCpuArray, Struct

# -- recorded contents ------------------------------------------------------------------------
#
# Recorded 2026-11-21 on the dev VM (kernel 6.18.44-fc-v445, 2 CPUs, pyroute2 0.9.7), as root:
#
#   ip netns add rec; ip netns exec rec ip link set lo up
#   ip netns exec rec nft -f ruleset.nft   # the ruleset, one line (the ';' after the chain's '}'
#       # is needed: without it nft 1.x says "syntax error, unexpected '}'"):
#       table inet t { chain input { type filter hook input priority 0; ct state new,established accept; }; }
#   ip netns exec rec python traffic.py    # 5 TCP connections to 127.0.0.1:8080 (echo), 4 UDP
#       # datagrams to a bound 127.0.0.1:5353, 3 to closed ports 6000-6002, and 2 raw TCP
#       # SYN+FIN segments (invalid flags) to 127.0.0.1:9999
#   ip netns exec rec cat /proc/net/stat/nf_conntrack          -> PROC_STAT_AFTER_TRAFFIC
#   ip netns exec rec ./race   # C: 3000 fresh UDP sockets, each sending its first datagram from
#       # two threads pinned to CPU 0 and CPU 1 at once (the parallel-DNS race) -> clash_resolve
#   then, back to back, inside the netns with /work/main/.venv/bin/python:
#       open("/proc/thread-self/net/stat/nf_conntrack").read()  -> PROC_STAT_AFTER_RACE
#       pyroute2.Conntrack().stat()                             -> NETLINK_STAT_AFTER_RACE
#       (Conntrack().count() was 3022 = 0xbce, conntrack_max_size() 262144, buckets 262144)
#   ip netns del rec
#
# This kernel no longer counts found/insert (always 0); drop/early_drop stay 0 because
# nf_conntrack_max is global and was not lowered on a shared machine.

PROC_STAT_AFTER_TRAFFIC = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop "
    "icmp_error  expect_new expect_create expect_delete search_restart\n"
    "00000009  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
    "00000000 00000000  00000000 00000000 00000000 00000000\n"
    "00000009  00000000 00000000 00000000 00000008 00000000 00000000 00000000 00000000 00000000 00000000 "
    "00000000 00000000  00000000 00000000 00000000 00000000\n"
)

PROC_STAT_AFTER_RACE = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop "
    "icmp_error  expect_new expect_create expect_delete search_restart\n"
    "00000bce  00000009 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
    "00000000 00000000  00000000 00000000 00000000 00000000\n"
    "00000bce  0000000a 00000000 00000000 00000008 00000000 00000000 00000000 00000000 00000000 00000000 "
    "00000000 00000000  00000000 00000000 00000000 00000000\n"
)

NETLINK_STAT_AFTER_RACE = [
    {'cpu': 0, 'found': 0, 'invalid': 0, 'insert': 0, 'insert_failed': 0, 'drop': 0, 'early_drop': 0,
     'error': 0, 'search_restart': 0, 'clash_resolve': 9, 'chain_toolong': 0},
    {'cpu': 1, 'found': 0, 'invalid': 8, 'insert': 0, 'insert_failed': 0, 'drop': 0, 'early_drop': 0,
     'error': 0, 'search_restart': 0, 'clash_resolve': 10, 'chain_toolong': 0},
]

ZERO = {f: 0 for f in STAT_FIELDS}


# -- parse_proc_stat ----------------------------------------------------------------------------

def test_parse_proc_stat_recorded_after_traffic():
    # invalid: 0 + 8 (the two SYN+FIN segments and the packets around them); entries (9 per row)
    # is not a counter and is not summed.
    assert parse_proc_stat(PROC_STAT_AFTER_TRAFFIC) == {**ZERO, "invalid": 8}


def test_parse_proc_stat_recorded_after_race():
    # clashres 0x9 + 0xa = 19 (hex: read as decimal, "0000000a" would not even parse);
    # invalid 0x0 + 0x8 = 8; entries 0xbce per row is ignored.
    assert parse_proc_stat(PROC_STAT_AFTER_RACE) == {
        "found": 0, "invalid": 8, "insert": 0, "insert_failed": 0, "drop": 0, "early_drop": 0,
        "search_restart": 0, "clash_resolve": 19}


def test_parse_proc_stat_matches_netlink_recorded_at_the_same_moment():
    assert parse_proc_stat(PROC_STAT_AFTER_RACE) == sum_netlink_stats(NETLINK_STAT_AFTER_RACE)


def test_parse_proc_stat_every_column_lands_in_its_field():
    # The recorded header with a distinct hex value per column, two rows.
    header = PROC_STAT_AFTER_RACE.splitlines()[0]
    cols = header.split()
    row1 = " ".join(f"{0x10 * (i + 1):08x}" for i in range(len(cols)))  # 0x10, 0x20, ...
    row2 = " ".join(f"{i + 1:08x}" for i in range(len(cols)))           # 1, 2, ...
    out = parse_proc_stat(f"{header}\n{row1}\n{row2}\n")
    # column i (0-based) sums to 0x10*(i+1) + (i+1) = 17*(i+1)
    assert out == {"clash_resolve": 17 * 2, "found": 17 * 3, "invalid": 17 * 5, "insert": 17 * 9,
                   "insert_failed": 17 * 10, "drop": 17 * 11, "early_drop": 17 * 12,
                   "search_restart": 17 * 17}


def test_parse_proc_stat_ignores_blank_lines_and_surrounding_space():
    text = "\n\n" + PROC_STAT_AFTER_RACE.replace("\n", "\n\n") + "   \n"
    assert parse_proc_stat(text)["clash_resolve"] == 19


@pytest.mark.parametrize("text", [
    "",
    "\n \n",
    PROC_STAT_AFTER_RACE.splitlines()[0] + "\n",   # header only
])
def test_parse_proc_stat_no_rows(text):
    with pytest.raises(ValueError, match="no data rows"):
        parse_proc_stat(text)


def test_parse_proc_stat_wrong_column_count():
    lines = PROC_STAT_AFTER_RACE.splitlines()
    short = lines[2].rsplit(" ", 1)[0]  # one column missing
    with pytest.raises(ValueError, match="row has 16 columns, header has 17"):
        parse_proc_stat("\n".join([lines[0], lines[1], short]))
    with pytest.raises(ValueError, match="row has 18 columns, header has 17"):
        parse_proc_stat("\n".join([lines[0], lines[1] + " 00000000"]))


@pytest.mark.parametrize("bad", ["0000000g", "zz", "1.5", "n/a"])
def test_parse_proc_stat_non_hex(bad):
    lines = PROC_STAT_AFTER_RACE.splitlines()
    cells = lines[2].split()
    cells[1] = bad  # the clashres column
    with pytest.raises(ValueError):
        parse_proc_stat("\n".join([lines[0], lines[1], " ".join(cells)]))


# -- sum_netlink_stats ----------------------------------------------------------------------------

def test_sum_netlink_stats_recorded():
    # 'cpu', 'error' and 'chain_toolong' are not ours and are not summed.
    assert sum_netlink_stats(NETLINK_STAT_AFTER_RACE) == {
        "found": 0, "invalid": 8, "insert": 0, "insert_failed": 0, "drop": 0, "early_drop": 0,
        "search_restart": 0, "clash_resolve": 19}


def test_sum_netlink_stats_missing_and_none_count_as_zero():
    per_cpu = [{"cpu": 0, "drop": None, "found": 3, "early_drop": 7},
               {"cpu": 1, "drop": 2, "insert_failed": None},
               {}]
    assert sum_netlink_stats(per_cpu) == {**ZERO, "found": 3, "drop": 2, "early_drop": 7}
    assert sum_netlink_stats([]) == ZERO


# -- decode_recent ----------------------------------------------------------------------------------

class CtRecentKey(ctypes.Structure):
    """struct ct_recent_key of bpf/conntrack.c, as BCC builds it."""
    _fields_ = [("netns", ctypes.c_uint32), ("l3", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("kind", ctypes.c_uint8), ("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16)]


class CtRecentVal(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


def make_key(netns, l3, proto, kind, saddr: bytes, daddr: bytes, sport=0, dport=0) -> CtRecentKey:
    """The key's bytes as the BPF program writes them: ports in network byte order."""
    raw = (struct.pack("=IHBB", netns, l3, proto, kind) + saddr.ljust(16, b"\0") + daddr.ljust(16, b"\0")
           + struct.pack("!HH", sport, dport))
    return CtRecentKey.from_buffer_copy(raw)


NOW = 5_000_000_000_000
NS_A = 4026531840
NS_B = 4026532500


def test_ct_recent_key_layout():
    assert ctypes.sizeof(CtRecentKey) == 44
    assert ctypes.sizeof(CtRecentVal) == 16
    k = make_key(1, socket.AF_INET, 6, 0, b"\1\2\3\4", b"\5\6\7\10", 40000, 8080)
    # The raw u16 BCC hands over is the network-order value read in host order.
    assert k.sport == socket.htons(40000)
    assert k.dport == socket.htons(8080)


def test_decode_recent_ipv4_tcp():
    k = make_key(NS_B, socket.AF_INET, 6, 0, socket.inet_aton("198.18.0.2"), socket.inet_aton("198.18.0.1"),
                 40000, 8080)
    v = CtRecentVal(3, NOW - 1_260_000_000)
    assert decode_recent(k, v, NOW) == {
        "netns": NS_B, "event": "table_full", "l3": socket.AF_INET, "proto": 6,
        "src": "198.18.0.2", "dst": "198.18.0.1", "sport": 40000, "dport": 8080,
        "count": 3, "seconds_ago": 1.3, "flow": "tcp 198.18.0.2:40000 -> 198.18.0.1:8080"}


def test_decode_recent_ipv6_udp_last_ns_in_the_future():
    k = make_key(NS_A, socket.AF_INET6, 17, 1, socket.inet_pton(socket.AF_INET6, "fd00::2"),
                 socket.inet_pton(socket.AF_INET6, "fd00::1"), 53000, 53)
    v = CtRecentVal(1, NOW + 300_000_000)  # stamped after `now` was taken: clamped to 0, not -0.3
    assert decode_recent(k, v, NOW) == {
        "netns": NS_A, "event": "early_drop", "l3": socket.AF_INET6, "proto": 17,
        "src": "fd00::2", "dst": "fd00::1", "sport": 53000, "dport": 53,
        "count": 1, "seconds_ago": 0.0, "flow": "udp [fd00::2]:53000 -> [fd00::1]:53"}


def test_decode_recent_icmp_and_unknown_kind():
    k = make_key(NS_A, socket.AF_INET, 1, 7, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))
    v = CtRecentVal(12, NOW - 2_049_000_000)
    assert decode_recent(k, v, NOW) == {
        "netns": NS_A, "event": "7", "l3": socket.AF_INET, "proto": 1,
        "src": "10.0.0.1", "dst": "10.0.0.2", "sport": 0, "dport": 0,
        "count": 12, "seconds_ago": 2.0, "flow": "icmp 10.0.0.1 -> 10.0.0.2"}


def test_decode_recent_simplenamespace_key():
    # Any object with the field names works (bytes for the address arrays).
    k = SimpleNamespace(netns=NS_B, l3=socket.AF_INET6, proto=58, kind=len(EVENTS),
                        saddr=socket.inet_pton(socket.AF_INET6, "2001:db8::10"),
                        daddr=socket.inet_pton(socket.AF_INET6, "2001:db8::20"),
                        sport=0, dport=0)
    v = SimpleNamespace(count=2, last_ns=NOW - 30_000_000_000)
    rec = decode_recent(k, v, NOW)
    assert (rec["event"], rec["seconds_ago"], rec["flow"]) == (
        "2", 30.0, "icmpv6 [2001:db8::10] -> [2001:db8::20]")


@pytest.mark.parametrize("proto, l3, expected", [
    (132, socket.AF_INET, "sctp 1.1.1.1:1 -> 2.2.2.2:2"),
    (47, socket.AF_INET, "47 1.1.1.1 -> 2.2.2.2"),
    (6, socket.AF_INET6, "tcp [1.1.1.1]:1 -> [2.2.2.2]:2"),
])
def test_format_tuple(proto, l3, expected):
    assert format_tuple({"proto": proto, "l3": l3, "src": "1.1.1.1", "dst": "2.2.2.2",
                         "sport": 1, "dport": 2}) == expected


# -- readings, fixtures -----------------------------------------------------------------------

EST_KEY = "net.netfilter.nf_conntrack_tcp_timeout_established"
K8S_LINE = ("on Kubernetes, set the same through kube-proxy's conntrack.maxPerCore/min "
            "so it does not reset them")
INSERT_FAILED_REMEDY = [
    "add 'options single-request-reopen' (glibc) to the pods' resolv.conf, or use "
    "dnsConfig.options in the pod spec",
    "run NodeLocal DNSCache so pod DNS does not cross conntrack/DNAT",
    "or send DNS over TCP ('options use-vc')",
]


def max_line(new_max: int, mib: int) -> str:
    return (f"sysctl -w net.netfilter.nf_conntrack_max={new_max}   # about {mib} MiB of "
            "kernel memory when full")


def hash_line(buckets: int) -> str:
    return (f"echo {buckets} > /sys/module/nf_conntrack/parameters/hashsize   "
            "# nf_conntrack_buckets: keep max/buckets at 4 or below")


def stats(ino: int, **fields) -> dict:
    assert set(fields) <= set(STAT_FIELDS)
    return {(ino, f): fields.get(f, 0) for f in STAT_FIELDS}


def ct_reading(stat: dict | None = None, entries: dict | None = None, maxes: dict | None = None,
               buckets: dict | None = None, nf: int | None = None, events: tuple | None = None,
               recent: list | None = None, est: int | None = 7200) -> dict:
    counters = {"stats": dict(stat or {})}
    if nf is not None:
        counters["netfilter_drops"] = {(): nf}
    if events is not None:
        counters["events"] = {("table_full",): events[0], ("early_drop",): events[1]}
    info = {"sources": {}, "sysctls": {EST_KEY: est}}
    if recent is not None:
        info["recent"] = recent
    return {"counters": counters,
            "gauges": {"entries": dict(entries or {}), "max": dict(maxes or {}),
                       "buckets": dict(buckets or {})},
            "info": info}


@pytest.fixture
def sysctls(monkeypatch):
    """diagnose() reads no sysctl (collect() put them in the reading): a read fails the test."""
    monkeypatch.setattr(sysctl, "read_int", lambda key: pytest.fail(f"sysctl {key} read"))


def mode(name: str):
    (m,) = [m for m in ConntrackProbe.modes if m.name == name]
    return m


def make_probe(mode_name="stats", multi=False, **config) -> ConntrackProbe:
    p = ConntrackProbe(Config(**config))
    p.mode = mode(mode_name)
    p.multi = multi
    return p


@pytest.fixture
def probe(sysctls):
    return make_probe()


def by_id(findings: list[Finding]) -> dict[str, Finding]:
    out = {f.id: f for f in findings}
    assert len(out) == len(findings), "finding ids must be unique"
    return out


def base_ev(entries, maximum, fill, drops=0, dps=0.0, early=0, failed=0, seconds=60.0) -> dict:
    return {"entries": entries, "max": maximum, "fill_percent": fill, "drops": drops,
            "drops_per_second": dps, "early_drops": early, "insert_failed": failed,
            "window_seconds": seconds}


# -- diagnose: single netns --------------------------------------------------------------------

def test_healthy_table_no_findings(probe):
    old = ct_reading(stats(NS_A, drop=100, insert_failed=4, early_drop=9, clash_resolve=19),
                     {NS_A: 900}, {NS_A: 262144}, {NS_A: 65536})
    new = ct_reading(stats(NS_A, drop=100, insert_failed=4, early_drop=9, clash_resolve=40),
                     {NS_A: 3022}, {NS_A: 262144}, {NS_A: 65536})
    assert probe.diagnose(Window(60.0, old, new)) == []


def test_pressure_at_exactly_80_percent(probe):
    old = ct_reading(stats(NS_A), {NS_A: 70000}, {NS_A: 100000}, {NS_A: 25000})
    new = ct_reading(stats(NS_A), {NS_A: 80000}, {NS_A: 100000}, {NS_A: 25000})
    (f,) = probe.diagnose(Window(60.0, old, new))
    assert (f.id, f.probe, f.severity, f.title) == (
        "conntrack.table_pressure", "conntrack", "warning", "Conntrack table filling up")
    assert f.summary == ("The conntrack table is 80.0% full (80000 of 100000). At 95% and above, "
                         "bursts of new connections will be dropped.")
    assert f.evidence == base_ev(80000, 100000, 80.0)
    # base = max(2*80000, 2*100000, 131072) = 200000 -> 262144; 262144*320 B = 80 MiB;
    # 262144 // 4 = 65536 buckets > 25000 -> the hashsize line.
    assert f.remediation == [max_line(262144, 80), hash_line(65536), K8S_LINE]
    assert f.impact == 0.8


def test_no_pressure_at_79_9_percent(probe):
    new = ct_reading(stats(NS_A), {NS_A: 79900}, {NS_A: 100000}, {NS_A: 25000})
    assert probe.diagnose(Window(60.0, new, new)) == []


def test_pressure_thresholds_follow_config(sysctls):
    p = make_probe(conntrack_pressure_percent=50.0, conntrack_full_percent=70.0)
    new = ct_reading(stats(NS_A), {NS_A: 50000}, {NS_A: 100000}, {NS_A: 65536})
    (f,) = p.diagnose(Window(60.0, new, new))
    assert f.id == "conntrack.table_pressure"
    assert f.summary.endswith("At 70% and above, bursts of new connections will be dropped.")
    new = ct_reading(stats(NS_A), {NS_A: 70000}, {NS_A: 100000}, {NS_A: 65536})
    (f,) = p.diagnose(Window(60.0, new, new))
    assert (f.id, f.severity) == ("conntrack.table_full", "critical")


def test_full_at_95_percent_without_drops(probe):
    old = ct_reading(stats(NS_A, drop=7), {NS_A: 90000}, {NS_A: 100000}, {NS_A: 25000})
    new = ct_reading(stats(NS_A, drop=7), {NS_A: 95000}, {NS_A: 100000}, {NS_A: 25000})
    (f,) = probe.diagnose(Window(60.0, old, new))
    assert (f.id, f.severity, f.title) == ("conntrack.table_full", "critical", "Conntrack table full")
    assert f.summary == ("The conntrack table holds 95000 of 100000 entries (95.0%). Nothing was dropped "
                         "or evicted in this window yet: the next burst of new flows will be.")
    assert f.claims == ("fill_percent",)
    assert f.evidence == base_ev(95000, 100000, 95.0)
    assert f.remediation == [max_line(262144, 80), hash_line(65536), K8S_LINE]
    assert f.impact == 1.0  # no drops: the rate is 0, so a nominal 1.0


def test_just_below_full_is_pressure(probe):
    new = ct_reading(stats(NS_A), {NS_A: 94999}, {NS_A: 100000}, {NS_A: 25000})
    (f,) = probe.diagnose(Window(60.0, new, new))
    assert (f.id, f.evidence["fill_percent"]) == ("conntrack.table_pressure", 95.0)  # 94.999 rounded


def test_drops_at_low_fill_are_table_full(probe):
    old = ct_reading(stats(NS_A, drop=100, early_drop=2), {NS_A: 1100}, {NS_A: 262144}, {NS_A: 65536})
    new = ct_reading(stats(NS_A, drop=136, early_drop=5), {NS_A: 1200}, {NS_A: 262144}, {NS_A: 65536})
    (f,) = probe.diagnose(Window(60.0, old, new))
    assert (f.id, f.severity) == ("conntrack.table_full", "critical")
    # 1200 / 262144 = 0.4578% -> 0.5; 36 drops / 60 s = 0.6/s
    assert f.evidence == base_ev(1200, 262144, 0.5, drops=36, dps=0.6, early=3)
    assert f.summary == ("The conntrack table holds 1200 of 262144 entries (0.5%), and 36 packets were "
                         "dropped in 60s because no entry could be created. New connections fail "
                         "silently: applications see timeouts. 3 entries were evicted early in 60s to "
                         "make room (early_drop): flows not yet assured (unanswered, or UDP younger "
                         "than 2 s) lose their state, and their next packets, replies included, need a "
                         "new entry or are dropped.")
    assert f.claims == ("drops", "early_drops")
    # base = max(2400, 524288, 131072) = 524288 (a power of two already); 160 MiB;
    # 131072 buckets > 65536
    assert f.remediation == [max_line(524288, 160), hash_line(131072), K8S_LINE]
    assert f.impact == pytest.approx(0.6)


def test_early_drops_alone_are_table_full(probe):
    """Entries are evicted early only when the table is at its limit: the table was full in the
    window, even when entries have expired since and no packet was dropped."""
    old = ct_reading(stats(NS_A, early_drop=5), {NS_A: 60000}, {NS_A: 100000}, {NS_A: 25000})
    new = ct_reading(stats(NS_A, early_drop=125), {NS_A: 70000}, {NS_A: 100000}, {NS_A: 25000})
    (f,) = probe.diagnose(Window(60.0, old, new))
    assert (f.id, f.severity) == ("conntrack.table_full", "critical")
    assert f.evidence == base_ev(70000, 100000, 70.0, early=120)
    assert f.claims == ("early_drops",)
    assert "dropped" not in f.summary.split(". ")[0] and "120 entries were evicted early in 60s" in f.summary
    assert f.impact == pytest.approx(2.0)  # 120 evictions / 60 s


def test_first_window_without_old_reading_counts_everything(probe):
    new = ct_reading(stats(NS_A, drop=10), {NS_A: 5}, {NS_A: 262144}, {NS_A: 262144})
    (f,) = probe.diagnose(Window(5.0, None, new))
    assert (f.id, f.evidence["drops"], f.evidence["drops_per_second"]) == ("conntrack.table_full", 10, 2.0)


def test_insert_failed(probe):
    old = ct_reading(stats(NS_A, insert_failed=30), {NS_A: 3022}, {NS_A: 262144}, {NS_A: 262144})
    new = ct_reading(stats(NS_A, insert_failed=42), {NS_A: 3022}, {NS_A: 262144}, {NS_A: 262144})
    (f,) = probe.diagnose(Window(60.0, old, new))
    assert (f.id, f.probe, f.severity, f.title) == (
        "conntrack.insert_failed", "conntrack", "warning", "Conntrack insert failures")
    assert f.summary == (
        "12 conntrack entries could not be inserted in 60s (0.20/s). The usual cause is the UDP race: "
        "two packets of a new flow (A and AAAA DNS queries sent in parallel from one socket) race to "
        "create the same entry, and one is dropped: a 5 s DNS timeout.")
    assert f.evidence == base_ev(3022, 262144, 1.2, failed=12)
    assert f.remediation == INSERT_FAILED_REMEDY
    assert f.impact == pytest.approx(0.2)


def test_insert_failed_and_table_full_together(probe):
    old = ct_reading(stats(NS_A, drop=1, insert_failed=1), {NS_A: 99000}, {NS_A: 100000}, {NS_A: 25000})
    new = ct_reading(stats(NS_A, drop=21, insert_failed=4), {NS_A: 99000}, {NS_A: 100000}, {NS_A: 25000})
    found = by_id(probe.diagnose(Window(10.0, old, new)))
    assert sorted(found) == ["conntrack.insert_failed", "conntrack.table_full"]
    assert found["conntrack.table_full"].evidence == base_ev(99000, 100000, 99.0, drops=20, dps=2.0,
                                                             failed=3, seconds=10.0)
    assert found["conntrack.insert_failed"].impact == pytest.approx(0.3)


def test_unlimited_max_no_fill_finding(probe):
    # nf_conntrack_max = 0: no limit, so no fill percentage and no fill-based finding.
    old = ct_reading(stats(NS_A, drop=3), {NS_A: 400000}, {NS_A: 0}, {NS_A: 65536})
    new = ct_reading(stats(NS_A, drop=3), {NS_A: 500000}, {NS_A: 0}, {NS_A: 65536})
    assert probe.diagnose(Window(60.0, old, new)) == []
    # Drops still raise table_full; the evidence has no fill_percent and the summary says '?'.
    new = ct_reading(stats(NS_A, drop=8), {NS_A: 500000}, {NS_A: 0}, {NS_A: 65536})
    (f,) = probe.diagnose(Window(60.0, old, new))
    assert f.id == "conntrack.table_full"
    assert f.evidence == {"entries": 500000, "max": 0, "drops": 5, "drops_per_second": 0.083,
                          "early_drops": 0, "insert_failed": 0, "window_seconds": 60.0}
    assert "holds 500000 of 0 entries (?%), and 5 packets" in f.summary
    # base = max(1000000, 0, 131072) -> 1048576 = 320 MiB; 262144 buckets > 65536
    assert f.remediation == [max_line(1048576, 320), hash_line(262144), K8S_LINE]


def test_missing_max_no_fill_finding(probe):
    new = ct_reading(stats(NS_A), {NS_A: 500000}, {}, {})
    assert probe.diagnose(Window(60.0, new, new)) == []


# -- diagnose: correlated and kprobe modes -----------------------------------------------------------

def full_window(nf=None, events=None, recent=None, multi_extra=False):
    old = ct_reading(stats(NS_A, drop=100), {NS_A: 1200}, {NS_A: 262144}, {NS_A: 262144},
                     nf=None if nf is None else 500, events=None if events is None else (10, 3),
                     recent=[] if recent is not None else None)
    new = ct_reading(stats(NS_A, drop=136), {NS_A: 1200}, {NS_A: 262144}, {NS_A: 262144},
                     nf=nf, events=events, recent=recent)
    return Window(60.0, old, new)


@pytest.mark.parametrize("nf_new, explained", [(540, 36), (520, 20), (500, 0)])
def test_correlated_evidence(sysctls, nf_new, explained):
    p = make_probe("correlated")
    (f,) = p.diagnose(full_window(nf=nf_new))
    assert f.id == "conntrack.table_full"
    assert f.evidence == {**base_ev(1200, 262144, 0.5, drops=36, dps=0.6),
                          "netfilter_drops": nf_new - 500, "netfilter_drops_explained": explained}


def test_correlated_pressure_has_no_netfilter_evidence(sysctls):
    p = make_probe("correlated")
    old = ct_reading(stats(NS_A), {NS_A: 80000}, {NS_A: 100000}, {NS_A: 25000}, nf=500)
    new = ct_reading(stats(NS_A), {NS_A: 80000}, {NS_A: 100000}, {NS_A: 25000}, nf=540)
    (f,) = p.diagnose(Window(60.0, old, new))
    assert f.id == "conntrack.table_pressure"
    assert f.evidence == base_ev(80000, 100000, 80.0)


def recent_flows(n: int, netns: int) -> list[dict]:
    out = []
    for i in range(n):
        k = make_key(netns, socket.AF_INET, 6, 0, socket.inet_aton(f"198.18.0.{i + 2}"),
                     socket.inet_aton("198.18.0.1"), 40000 + i, 8080)
        out.append(decode_recent(k, CtRecentVal(i + 1, NOW - (i + 1) * 1_000_000_000), NOW))
    return out


def shown(r: dict) -> dict:
    return {"flow": r["flow"], "netns": r["netns"], "event": r["event"], "count": r["count"],
            "seconds_ago": r["seconds_ago"]}


def test_kprobe_evidence(sysctls):
    p = make_probe("kprobe")
    recent = recent_flows(10, NS_A)
    (f,) = p.diagnose(full_window(events=(46, 5), recent=recent))
    assert f.id == "conntrack.table_full"
    assert f.evidence["kprobe_table_full_events"] == 36
    assert len(f.evidence["recent_drops"]) == 8
    assert f.evidence["recent_drops"][0] == {"flow": "tcp 198.18.0.2:40000 -> 198.18.0.1:8080",
                                             "netns": NS_A, "event": "table_full", "count": 1,
                                             "seconds_ago": 1.0}
    assert f.evidence["recent_drops"] == [shown(r) for r in recent[:8]]
    assert f.evidence == {**base_ev(1200, 262144, 0.5, drops=36, dps=0.6),
                          "kprobe_table_full_events": 36,
                          "recent_drops": [shown(r) for r in recent[:8]]}


def test_kprobe_no_events_no_recent(sysctls):
    p = make_probe("kprobe")
    (f,) = p.diagnose(full_window(events=(10, 3), recent=[]))
    assert f.evidence == {**base_ev(1200, 262144, 0.5, drops=36, dps=0.6), "kprobe_table_full_events": 0}


# -- diagnose: every netns ---------------------------------------------------------------------------

def multi_window(recent=None, events=None, a_failed=0):
    old = ct_reading({**stats(NS_A, drop=5), **stats(NS_B, drop=100)},
                     {NS_A: 100, NS_B: 250000}, {NS_A: 262144, NS_B: 262144},
                     {NS_A: 262144, NS_B: 262144},
                     events=None if events is None else (0, 0), recent=None if recent is None else [])
    new = ct_reading({**stats(NS_A, drop=5, insert_failed=a_failed), **stats(NS_B, drop=136)},
                     {NS_A: 120, NS_B: 252000}, {NS_A: 262144, NS_B: 262144},
                     {NS_A: 262144, NS_B: 262144}, events=events, recent=recent)
    return Window(60.0, old, new)


def test_multi_only_the_full_netns(sysctls):
    p = make_probe("stats", multi=True, conntrack_all_netns=True)
    (f,) = p.diagnose(multi_window())
    assert (f.id, f.title) == ("conntrack.table_full", f"Conntrack table full in netns {NS_B}")
    assert f.summary.startswith(f"The conntrack table in netns {NS_B} holds 252000 of 262144 entries "
                                "(96.1%), and 36 packets were dropped in 60s")
    assert f.evidence == {**base_ev(252000, 262144, 96.1, drops=36, dps=0.6), "netns": NS_B}
    # base = max(504000, 524288, 131072) = 524288; 131072 buckets is not more than 262144
    assert f.remediation == [max_line(524288, 160), K8S_LINE]


def test_multi_insert_failed_names_its_netns(sysctls):
    p = make_probe("stats", multi=True)
    found = by_id(p.diagnose(multi_window(a_failed=4)))
    assert sorted(found) == ["conntrack.insert_failed", "conntrack.table_full"]
    f = found["conntrack.insert_failed"]
    assert f.title == f"Conntrack insert failures in netns {NS_A}"
    assert f.evidence == {**base_ev(120, 262144, 0.0, failed=4), "netns": NS_A}
    assert found["conntrack.table_full"].evidence["netns"] == NS_B


def test_multi_kprobe_recent_filtered_by_netns(sysctls):
    p = make_probe("kprobe", multi=True)
    recent = recent_flows(3, NS_A) + recent_flows(10, NS_B)
    recent.sort(key=lambda r: r["seconds_ago"])  # as collect() orders them
    (f,) = p.diagnose(multi_window(recent=recent, events=(36, 0)))
    assert f.evidence["netns"] == NS_B
    assert f.evidence["kprobe_table_full_events"] == 36
    mine = [r for r in recent if r["netns"] == NS_B][:8]
    assert len(mine) == 8
    assert f.evidence["recent_drops"] == [shown(r) for r in mine]
    assert {r["netns"] for r in f.evidence["recent_drops"]} == {NS_B}


def test_single_netns_kprobe_recent_not_filtered(sysctls):
    # One netns watched: drops recorded in other netns are still shown (they share the table limit).
    p = make_probe("kprobe")
    recent = recent_flows(2, NS_B)
    (f,) = p.diagnose(full_window(events=(46, 5), recent=recent))
    assert f.evidence["recent_drops"] == [shown(r) for r in recent]
    assert "netns" not in f.evidence


def test_single_mode_title_has_no_netns(probe):
    (f,) = probe.diagnose(full_window())
    assert f.title == "Conntrack table full"
    assert "netns" not in f.evidence


# -- remedy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entries, maximum, buckets, expected", [
    # small table: the floor of 131072 (40 MiB), 32768 buckets > 16384
    (10, 0, 16384, [max_line(131072, 40), hash_line(32768), K8S_LINE]),
    (None, None, None, [max_line(131072, 40), hash_line(32768), K8S_LINE]),
    # buckets equal to new_max // 4: no hashsize line
    (10, 65536, 32768, [max_line(131072, 40), K8S_LINE]),
    (10, 65536, 32767, [max_line(131072, 40), hash_line(32768), K8S_LINE]),
    # 2 * 70000 = 140000 -> 262144 (80 MiB)
    (70000, 65537, 65536, [max_line(262144, 80), K8S_LINE]),
    # 2 * 65537 = 131074 -> 262144; its 65536 buckets are fewer than the 100000 in use
    (100, 65537, 100000, [max_line(262144, 80), K8S_LINE]),
    # 2 * 262144 = 524288 exactly
    (262144, 262144, 65536, [max_line(524288, 160), hash_line(131072), K8S_LINE]),
])
def test_remedy(entries, maximum, buckets, expected):
    assert remedy(entries, maximum, buckets, 7200) == expected


def test_remedy_mib_estimate_uses_entry_bytes():
    line = remedy(3_000_000, 0, None, None)[0]
    new_max = 1 << 23  # 6_000_000 -> 8388608
    assert line == max_line(new_max, round(new_max * ENTRY_BYTES / (1 << 20)))
    assert line == max_line(8388608, 2560)


@pytest.mark.parametrize("est, line", [
    (None, None),
    (7200, None),
    (86400, None),
    (86401, "sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=86400   "
            "# now 86401 s: idle established flows hold entries for 1 days"),
    (432000, "sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=86400   "
             "# now 432000 s: idle established flows hold entries for 5 days"),
])
def test_remedy_tcp_timeout(sysctls, est, line):
    out = remedy(1000, 262144, 262144, est)
    expected = [max_line(524288, 160)] + ([line] if line else []) + [K8S_LINE]
    assert out == expected
    # diagnose() advises on the timeout collect() read into the reading.
    old = ct_reading(stats(NS_A), {NS_A: 1000}, {NS_A: 262144}, {NS_A: 262144}, est=est)
    new = ct_reading(stats(NS_A, drop=1), {NS_A: 1000}, {NS_A: 262144}, {NS_A: 262144}, est=est)
    (f,) = make_probe().diagnose(Window(60.0, old, new))
    assert f.remediation == expected


# -- metrics ---------------------------------------------------------------------------------------

class OneShot:
    def __init__(self, families):
        self.families = list(families)

    def collect(self, inputs=None):
        return iter(self.families)


def exposition(probe: ConntrackProbe, reading: dict) -> list[str]:
    reg = CollectorRegistry()
    reg.register(OneShot(probe.metrics(reading)))
    text = generate_latest(reg).decode()
    assert "_created" not in text
    return [ln for ln in text.splitlines() if not ln.startswith("# HELP")]


METRIC_STATS = dict(found=0, invalid=8, insert=0, insert_failed=2, drop=36, early_drop=4,
                    search_restart=1, clash_resolve=19)


def test_metrics_single_netns(probe):
    r = ct_reading(stats(NS_A, **METRIC_STATS), {NS_A: 3022}, {NS_A: 262144}, {NS_A: 262144})
    fams = list(probe.metrics(r))
    assert [(f.name, f.type) for f in fams] == [
        ("dpwatch_conntrack_entries", "gauge"), ("dpwatch_conntrack_max_entries", "gauge"),
        ("dpwatch_conntrack_drops", "counter"), ("dpwatch_conntrack_early_drops", "counter"),
        ("dpwatch_conntrack_insert_failed", "counter"), ("dpwatch_conntrack_invalid", "counter"),
        ("dpwatch_conntrack_search_restarts", "counter")]
    assert exposition(probe, r) == [
        "# TYPE dpwatch_conntrack_entries gauge",
        "dpwatch_conntrack_entries 3022.0",
        "# TYPE dpwatch_conntrack_max_entries gauge",
        "dpwatch_conntrack_max_entries 262144.0",
        "# TYPE dpwatch_conntrack_drops_total counter",
        "dpwatch_conntrack_drops_total 36.0",
        "# TYPE dpwatch_conntrack_early_drops_total counter",
        "dpwatch_conntrack_early_drops_total 4.0",
        "# TYPE dpwatch_conntrack_insert_failed_total counter",
        "dpwatch_conntrack_insert_failed_total 2.0",
        "# TYPE dpwatch_conntrack_invalid_total counter",
        "dpwatch_conntrack_invalid_total 8.0",
        "# TYPE dpwatch_conntrack_search_restarts_total counter",
        "dpwatch_conntrack_search_restarts_total 1.0",
    ]


def test_metrics_multi_netns(sysctls):
    p = make_probe(multi=True)
    r = ct_reading({**stats(NS_B, drop=36, invalid=8), **stats(NS_A, drop=1)},
                   {NS_B: 252000, NS_A: 120}, {NS_A: 262144, NS_B: 262144}, {NS_A: 262144})
    lines = exposition(p, r)
    samples = [ln for ln in lines if not ln.startswith("#")]
    assert samples == [
        f'dpwatch_conntrack_entries{{netns="{NS_A}"}} 120.0',
        f'dpwatch_conntrack_entries{{netns="{NS_B}"}} 252000.0',
        f'dpwatch_conntrack_max_entries{{netns="{NS_A}"}} 262144.0',
        f'dpwatch_conntrack_max_entries{{netns="{NS_B}"}} 262144.0',
        f'dpwatch_conntrack_drops_total{{netns="{NS_A}"}} 1.0',
        f'dpwatch_conntrack_drops_total{{netns="{NS_B}"}} 36.0',
        f'dpwatch_conntrack_early_drops_total{{netns="{NS_A}"}} 0.0',
        f'dpwatch_conntrack_early_drops_total{{netns="{NS_B}"}} 0.0',
        f'dpwatch_conntrack_insert_failed_total{{netns="{NS_A}"}} 0.0',
        f'dpwatch_conntrack_insert_failed_total{{netns="{NS_B}"}} 0.0',
        f'dpwatch_conntrack_invalid_total{{netns="{NS_A}"}} 0.0',
        f'dpwatch_conntrack_invalid_total{{netns="{NS_B}"}} 8.0',
        f'dpwatch_conntrack_search_restarts_total{{netns="{NS_A}"}} 0.0',
        f'dpwatch_conntrack_search_restarts_total{{netns="{NS_B}"}} 0.0',
    ]
    assert "dpwatch_conntrack_kernel_events" not in "\n".join(lines)


def test_metrics_kernel_events_only_with_events(probe):
    r = ct_reading(stats(NS_A, drop=36), {NS_A: 1}, {NS_A: 262144}, {}, events=(46, 5))
    lines = exposition(probe, r)
    assert lines[-3:] == [
        "# TYPE dpwatch_conntrack_kernel_events_total counter",
        'dpwatch_conntrack_kernel_events_total{event="early_drop"} 5.0',
        'dpwatch_conntrack_kernel_events_total{event="table_full"} 46.0',
    ]
    assert "dpwatch_conntrack_drops_total 36.0" in lines
    no_events = exposition(probe, ct_reading(stats(NS_A, drop=36), {NS_A: 1}, {NS_A: 262144}, {}))
    assert not any("kernel_events" in ln for ln in no_events)


def test_metrics_empty_reading(probe):
    fams = list(probe.metrics(ct_reading()))
    assert [f.samples for f in fams] == [[]] * 7


# -- choose_mode, fallback_modes, cflags ----------------------------------------------------------

ALL_TARGETS = ("__nf_conntrack_alloc", "early_drop")


def ct_features(kprobes=True, targets=ALL_TARGETS, headers_exact=True):
    asked = []

    def kprobe_target(fn):
        asked.append(fn)
        return fn in targets
    return SimpleNamespace(kprobes=kprobes, kprobe_target=kprobe_target, headers_exact=headers_exact,
                           has_tracepoint=lambda name: False, raw_tracepoints=True, fentry=False,
                           kfree_skb_reason=True, tracefs=None, asked=asked)


@pytest.fixture
def ct_sysctl(monkeypatch):
    """Whether CT_MAX_SYSCTL exists, decided by the test (other paths: the real answer)."""
    state = {"present": True}
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: state["present"] if p == CT_MAX_SYSCTL else real(p))
    return state


def test_choose_mode_kprobe(ct_sysctl):
    p = ConntrackProbe(Config())
    feats = ct_features()
    m, why = p.choose_mode(feats)
    assert (m.name, m.degraded, m.bpf) == ("kprobe", False, True)
    assert why == "netlink counters plus kprobes on the allocation-failure and early-drop paths"
    assert sorted(set(feats.asked)) == sorted(ALL_TARGETS)


@pytest.mark.parametrize("kw", [
    {"kprobes": False},
    {"targets": ("__nf_conntrack_alloc",)},
    {"targets": ("early_drop",)},
    {"headers_exact": False},
])
def test_choose_mode_correlated_without_kprobe_needs(ct_sysctl, kw):
    m, why = ConntrackProbe(Config()).choose_mode(ct_features(**kw))
    assert (m.name, m.degraded, m.bpf) == ("correlated", True, False)
    assert why.startswith("netlink counters set against NETFILTER_DROP")


def test_choose_mode_stats_when_drops_disabled(ct_sysctl):
    m, why = ConntrackProbe(Config(disable=["drops"])).choose_mode(ct_features(kprobes=False))
    assert (m.name, m.degraded, m.bpf, why) == ("stats", True, False, "netlink counters only")
    # kprobe mode does not need the drops probe
    m, _ = ConntrackProbe(Config(disable=["drops"])).choose_mode(ct_features())
    assert m.name == "kprobe"
    m, _ = ConntrackProbe(Config(probes=["conntrack"])).choose_mode(ct_features(headers_exact=False))
    assert m.name == "stats"


def test_choose_mode_no_nf_conntrack(ct_sysctl):
    ct_sysctl["present"] = False
    for cfg in (Config(), Config(disable=["drops"])):
        assert ConntrackProbe(cfg).choose_mode(ct_features()) == (
            None, "nf_conntrack is not loaded (no /proc/sys/net/netfilter/nf_conntrack_max)")


def test_fallback_modes():
    p = ConntrackProbe(Config())
    p.mode = mode("kprobe")
    assert [m.name for m in p.fallback_modes(None)] == ["correlated", "stats"]
    p.mode = mode("correlated")
    assert [m.name for m in p.fallback_modes(None)] == ["stats"]
    p.mode = mode("stats")
    assert p.fallback_modes(None) == []
    p = ConntrackProbe(Config(disable=["drops"]))
    p.mode = mode("kprobe")
    assert [m.name for m in p.fallback_modes(None)] == ["stats"]


def test_cflags_and_multi_from_config():
    # CT_INFLIGHT_MAX is a constant of bpf/conntrack.h, not a flag.
    assert ConntrackProbe(Config()).cflags(None) == ["-DCT_RECENT_MAX=256"]
    assert ConntrackProbe(Config(conntrack_recent_entries=1000)).cflags(None)[0] == "-DCT_RECENT_MAX=1000"
    assert ConntrackProbe(Config()).multi is False
    assert ConntrackProbe(Config(conntrack_all_netns=True)).multi is True


def test_module_constants():
    assert ct_mod.EVENTS == ("table_full", "early_drop")  # CT_EV_* order in bpf/conntrack.h
    assert ct_findings.ENTRY_BYTES == 320
    assert CT_MAX_SYSCTL == "/proc/sys/net/netfilter/nf_conntrack_max"


def test_netns_first_seen_in_window_is_a_baseline(sysctls):
    """Multi-netns: a namespace that appears after the window began brings its lifetime
    counters; they must not be read as drops in this window (its fill still counts)."""
    p = make_probe(multi=True)
    old = ct_reading(stats(NS_A), {NS_A: 10}, {NS_A: 1000})
    new = ct_reading({**stats(NS_A), **stats(NS_B, drop=5000, insert_failed=7)},
                     {NS_A: 10, NS_B: 10}, {NS_A: 1000, NS_B: 1000})
    assert p.diagnose(Window(60.0, old, new)) == []
    new_full = ct_reading({**stats(NS_A), **stats(NS_B, drop=5000)},
                          {NS_A: 10, NS_B: 990}, {NS_A: 1000, NS_B: 1000})
    (f,) = p.diagnose(Window(60.0, old, new_full))
    assert f.id == "conntrack.table_full" and f.evidence["drops"] == 0 and f.evidence["netns"] == NS_B


def test_recent_drops_outside_the_window_are_not_evidence(sysctls):
    p = make_probe("kprobe")
    recent = [{"flow": "tcp 198.18.0.2:1 -> 198.18.0.1:80", "netns": NS_A, "event": "table_full",
               "count": 1, "seconds_ago": 5.0},
              {"flow": "tcp 198.18.0.2:2 -> 198.18.0.1:80", "netns": NS_A, "event": "table_full",
               "count": 1, "seconds_ago": 500.0}]
    old = ct_reading(stats(NS_A), {NS_A: 64}, {NS_A: 64}, events=(0, 0))
    new = ct_reading(stats(NS_A, drop=2), {NS_A: 64}, {NS_A: 64}, events=(2, 0), recent=recent)
    (f,) = p.diagnose(Window(60.0, old, new))
    assert [r["flow"] for r in f.evidence["recent_drops"]] == ["tcp 198.18.0.2:1 -> 198.18.0.1:80"]


# -- constants shared with bpf/conntrack.c (bpf/conntrack.h) ------------------------------------

def test_events_come_from_the_header():
    d = cdefs.defines("conntrack.h")
    assert EVENTS == ("table_full", "early_drop")
    assert (d["CT_EV_TABLE_FULL"], d["CT_EV_EARLY_DROP"], d["CT_EVENTS"]) == (0, 1, len(EVENTS))
    assert d["CT_INFLIGHT_MAX"] == 4096


def test_the_c_source_defines_no_header_constant():
    c_text = cdefs.header_text("conntrack.c")
    for name in cdefs.defines("conntrack.h"):
        assert not re.search(rf"#\s*define\s+{name}\b", c_text), f"{name} is defined in conntrack.c too"
        assert re.search(rf"\b{name}\b", c_text), f"{name} is not used by conntrack.c"
    source = ConntrackProbe(Config()).source_text()
    assert source.startswith(cdefs.header_text("conntrack.h"))


def test_one_function_per_finding_id():
    assert tuple(ct_findings.FINDINGS) == ConntrackProbe.finding_ids


# -- collect ---------------------------------------------------------------------------------------

class FixedSource:
    source = "netlink"

    def __init__(self, out: dict):
        self.out = out

    def read(self) -> dict:
        return self.out


def test_collect_reads_the_sources_and_the_sysctls(monkeypatch):
    values = {EST_KEY: 432000}
    monkeypatch.setattr(sysctl, "read_int", lambda key: values[key])
    p = make_probe("stats")
    p.sources = {NS_A: FixedSource({"stats": dict(ZERO, drop=3), "entries": 10, "max": 64, "buckets": None})}
    r = p.collect()
    assert r["counters"] == {"stats": {(NS_A, f): (3 if f == "drop" else 0) for f in STAT_FIELDS}}
    assert r["gauges"] == {"entries": {NS_A: 10}, "max": {NS_A: 64}, "buckets": {}}
    assert r["info"] == {"sources": {NS_A: "netlink"}, "sysctls": {EST_KEY: 432000}}
    assert p.collect()["info"]["sysctls"] is r["info"]["sysctls"]  # unchanged: the same object
    values[EST_KEY] = 7200
    assert p.collect()["info"]["sysctls"] == {EST_KEY: 7200}


def test_collect_kprobe_events_and_recent(monkeypatch):
    monkeypatch.setattr(sysctl, "read_int", lambda key: None)
    p = make_probe("kprobe")
    p.sources = {}
    key = Struct(netns=NS_B, l3=socket.AF_INET, proto=17, kind=1,  # kind CT_EV_EARLY_DROP
                 saddr=socket.inet_aton("10.0.0.2").ljust(16, b"\0"),
                 daddr=socket.inet_aton("10.0.0.1").ljust(16, b"\0"),
                 sport=socket.htons(5353), dport=socket.htons(53))
    p.module = FakeModule(ct_events=FakePerCpuArray(len(EVENTS), {0: [3, 1], 1: [0, 2]}),
                          ct_recent=FakeLruHash({key: Struct(count=4, last_ns=0)}))
    r = p.collect()
    assert r["counters"]["events"] == {("table_full",): 4, ("early_drop",): 2}
    (rec,) = r["info"]["recent"]
    assert (rec["event"], rec["flow"], rec["count"]) == ("early_drop", "udp 10.0.0.2:5353 -> 10.0.0.1:53", 4)


def test_netns_source_reads_files_under_the_proc_root(tmp_path):
    proc = tmp_path / "proc"
    (proc / "thread-self" / "net" / "stat").mkdir(parents=True)
    (proc / "thread-self" / "net" / "stat" / "nf_conntrack").write_text(PROC_STAT_AFTER_TRAFFIC)
    nf = proc / "sys" / "net" / "netfilter"
    nf.mkdir(parents=True)
    for name, value in (("count", 9), ("max", 262144), ("buckets", 65536)):
        (nf / f"nf_conntrack_{name}").write_text(f"{value}\n")
    src = object.__new__(NetnsSource)  # no worker thread: read in this thread's netns
    src.inode, src.path, src.source, src.error, src._ct, src._files = NS_A, "", "none", "", None, {}
    with paths.roots(proc_root=str(proc)):
        src._open_here(prefer_netlink=False)
    try:
        assert src.source == "procfs"
        assert src._read_here() == {"stats": parse_proc_stat(PROC_STAT_AFTER_TRAFFIC), "entries": 9,
                                    "max": 262144, "buckets": 65536}
    finally:
        for fh in src._files.values():
            fh.close()
