"""The conntrack probe class: the /proc and netlink decoders (against contents recorded
on a real kernel, pasted below), the ct_recent decoder, metrics(), the mode choice, cflags and
collect() over its sources and the BPF maps (tests/fakes.py tables). No root, no BPF, no
network."""

from __future__ import annotations

import ctypes
import os
import socket
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dpwatch.daemon.config import Config
from dpwatch.daemon.host import paths, sysctl
from dpwatch.probes.conntrack import findings as ct_findings
from dpwatch.probes.conntrack import probe as ct_mod
from dpwatch.probes.conntrack.probe import (CT_MAX_SYSCTL, EVENTS, STAT_FIELDS, ConntrackProbe,
                                            NetnsSource, decode_recent, format_tuple, parse_proc_stat,
                                            sum_netlink_stats)
from fakes import FakeFeatures, FakeLruHash, FakeModule, FakePerCpuArray, Struct
from test_conntrack_findings import (EST_KEY, NOW, NS_A, NS_B, CtRecentKey, CtRecentVal,  # noqa: F401
                                     ct_reading, make_key, make_probe, mode, probe, stats, sysctls)

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
    return FakeFeatures(kprobes=kprobes, kprobe_target=kprobe_target, headers_exact=headers_exact,
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
