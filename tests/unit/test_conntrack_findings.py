"""The conntrack findings (probes/conntrack/findings.py, one function per finding id)
through ConntrackProbe.diagnose() in each mode (stats, correlated, kprobe) and over every
netns, and the remedy arithmetic. No root, no BPF: readings are built by hand in the shape
ConntrackProbe.collect() returns, ct_recent keys in the bytes bpf/conntrack.c writes."""

from __future__ import annotations

import ctypes
import socket
import struct

import pytest

from dpwatch.daemon.config import Config
from dpwatch.daemon.host import sysctl
from dpwatch.probes.base import Finding, Window
from dpwatch.probes.conntrack import findings as ct_findings
from dpwatch.probes.conntrack.findings import ENTRY_BYTES, remedy
from dpwatch.probes.conntrack.probe import STAT_FIELDS, ConntrackProbe, decode_recent

# -- ct_recent keys and values --------------------------------------------------------------------

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


# -- diagnose: what counts in the window --------------------------------------------------------

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


def test_one_function_per_finding_id():
    assert tuple(ct_findings.FINDINGS) == ConntrackProbe.finding_ids
