"""Unit tier: the DNS probe without a kernel: its compile flags and config checks, the
metrics text, and what it keeps between readings (probes/dns/tracking.py: the name history,
the per-server folding and the timeout sweep)."""

from __future__ import annotations

import ipaddress
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from dpwatch.daemon.config import Config, ConfigError
from dpwatch.probes.dns import tracking
from dpwatch.probes.dns.probe import DnsProbe
from fakes import FakeLruHash, Struct
from test_dns_findings import probe, reading


def test_cflags_ports_and_sizes():
    flags = probe(dns_ports="53,5353", dns_pending_entries=4096).cflags(None)
    assert "-DDNS_PORT0=53" in flags and "-DDNS_PORT1=5353" in flags and "-DDNS_PORT7=0" in flags
    assert "-DDNS_PENDING_MAX=4096" in flags and "-DDNS_DEDUP_NS=100000000ULL" in flags


@pytest.mark.parametrize("kw,msg", [
    ({"dns_ports": "53,abc"}, "--dns-ports"), ({"dns_ports": "70000"}, "--dns-ports"),
    ({"dns_ports": ",".join(str(p) for p in range(1, 10))}, "1 to 8"),
    ({"dns_timeout": 0.01}, "--dns-timeout"), ({"dns_names": "some"}, "--dns-names"),
    ({"dns_hook": "xdp"}, "--dns-hook"), ({"dns_top_servers": -1}, "--dns-top-servers"),
    ({"dns_error_percent": 0}, "--dns-error-percent"), ({"dns_cluster_domain": "a b"}, "--dns-cluster-domain"),
    ({"dns_search_nxdomain_min": 1}, "--dns-search-nxdomain-min"),
])
def test_bad_dns_config_is_named(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(**kw).validate()


def test_metrics_text():
    p = probe()
    r = reading(3, {"NOERROR": 2, "NXDOMAIN": 1}, {("NOERROR", 0): 1, ("NOERROR", 11): 1, ("NXDOMAIN", 16): 1},
                timeouts={"10.96.0.10": 2}, srv_q={"10.96.0.10": 3}, srv_r={("10.96.0.10", "NOERROR"): 2})
    r["counters"]["latency_sum"] = {"NOERROR": 0.3, "NXDOMAIN": 9.0}

    class C:
        def collect(self, inputs=None):
            return p.metrics(r)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(C())
    text = generate_latest(reg).decode()
    assert 'dpwatch_dns_queries_total{qtype="A"} 3.0' in text
    assert 'dpwatch_dns_responses_total{rcode="SERVFAIL"} 0.0' in text
    assert 'dpwatch_dns_request_duration_seconds_bucket{le="0.00025",rcode="NOERROR"} 1.0' in text
    assert 'dpwatch_dns_request_duration_seconds_bucket{le="0.512",rcode="NOERROR"} 2.0' in text
    assert 'dpwatch_dns_request_duration_seconds_bucket{le="8.192",rcode="NXDOMAIN"} 0.0' in text
    assert 'dpwatch_dns_request_duration_seconds_bucket{le="+Inf",rcode="NXDOMAIN"} 1.0' in text
    assert 'dpwatch_dns_timeouts_total{server="10.96.0.10"} 2.0' in text
    assert 'dpwatch_dns_timeouts_total{server="other"} 0.0' in text
    assert "dpwatch_dns_malformed_packets_total 0.0" in text


def test_name_history_is_bounded(monkeypatch):
    """Every sampler pass records the names' deltas for /diagnose windows; under churn (a new
    name per query) the history keeps at most NAME_HISTORY_MAX (interval, name) counts, oldest
    first out, whatever --max-window allows."""
    p = probe()
    batch = iter(range(10**9))
    state: dict = {}

    def fresh_names():  # 1024 new names each pass: the kernel LRU's default size
        for _ in range(1024):
            state[("NXDOMAIN", "A", f"n{next(batch)}.example.")] = 1
        return dict(state)
    monkeypatch.setattr(p, "read_names", fresh_names)
    for _ in range(tracking.NAME_HISTORY_MAX // 1024 + 5):
        p._record_names()
    hist = p.name_history
    assert hist.size <= tracking.NAME_HISTORY_MAX
    assert hist.size == sum(len(d) for _, d in hist.intervals)
    assert hist.size >= tracking.NAME_HISTORY_MAX - 1024  # only whole intervals go


def test_name_history_windows():
    """A window sums the intervals recorded inside it and what the LRU gained since the last
    record; intervals past --max-window (plus 10 s) are dropped."""
    h = tracking.NameHistory(max_window=60)
    a, b = ("NXDOMAIN", "A", "a."), ("NOERROR", "A", "b.")
    now = time.monotonic()
    h.record({a: 5}, now=now - 100)
    h.record({a: 7, b: 1}, now=now - 30)
    assert h.in_window({a: 7, b: 4}, 60) == {a: 2, b: 4}   # b's 3 since the last record
    assert h.in_window({a: 7, b: 1}, 200) == {a: 7, b: 1}
    h.record({a: 7, b: 1}, now=now + 1)    # nothing new: no interval; the one at now - 100 goes
    h.record({a: 8, b: 1}, now=now + 30)   # the one at now - 30 is 60 s old: kept
    assert [d for _, d in h.intervals] == [{a: 2, b: 1}, {a: 1}]


# -- per-server folding and the sweep, over tables shaped like BCC's -----------------------------

def PendingKey(server: bytes, sport: int, family: int) -> Struct:  # noqa: N802 - struct dns_key
    return Struct(server=server, sport=sport, family=family)


def ServerKey(addr: bytes, port: int, family: int) -> Struct:  # noqa: N802 - struct dns_server_key
    return Struct(addr=addr, port=port, family=family)


def v4(addr: str) -> bytes:
    return bytes(10) + b"\xff\xff" + ipaddress.IPv4Address(addr).packed


def server_row(queries: int, latency_ns: int = 0, rcodes: dict | None = None) -> list:
    """One per-CPU value of dns_servers, split over two CPUs."""
    rc = [0] * 16
    for i, n in (rcodes or {}).items():
        rc[i] = n
    half = Struct(queries=queries // 2, latency_ns=latency_ns // 2, rcodes=[n // 2 for n in rc])
    rest = Struct(queries=queries - queries // 2, latency_ns=latency_ns - latency_ns // 2,
                  rcodes=[n - n // 2 for n in rc])
    return [half, rest]


def test_servers_fold_into_top_labels_and_other():
    folding = tracking.ServerFolding(top=2, entries=256)
    tbl = FakeLruHash({ServerKey(v4("10.0.0.1"), 53, 4): server_row(10, 20_000_000, {0: 8, 3: 2}),
                       ServerKey(v4("10.0.0.2"), 5353, 4): server_row(30),
                       ServerKey(ipaddress.IPv6Address("fd00::1").packed, 53, 6): server_row(5)},
                      per_cpu=True, ncpus=2)
    folding.fold(tbl)
    q, lat, r = folding.counters()
    # the two busiest get labels; the IPv6 one, seen with them, is "other"
    assert q == {"10.0.0.2:5353": 30, "10.0.0.1": 10, "other": 5}
    assert lat["10.0.0.1"] == pytest.approx(0.02)
    assert r == {("10.0.0.1", "NOERROR"): 8, ("10.0.0.1", "NXDOMAIN"): 2}
    # a second pass adds only the increase; a key whose counts went down was evicted and re-added
    tbl[ServerKey(v4("10.0.0.1"), 53, 4)] = server_row(12, 20_000_000, {0: 10, 3: 2})
    tbl[ServerKey(v4("10.0.0.2"), 5353, 4)] = server_row(4)
    folding.fold(tbl)
    q, _, r = folding.counters()
    assert q == {"10.0.0.2:5353": 34, "10.0.0.1": 12, "other": 5}
    assert r[("10.0.0.1", "NOERROR")] == 10
    assert tracking.server_label(ipaddress.IPv6Address("fd00::1").packed, 5353, 6) == "[fd00::1]:5353"


def test_sweep_counts_timeouts_once_and_drops_old_answers():
    folding = tracking.ServerFolding(top=4, entries=256)
    sweep = tracking.TimeoutSweep(1.0, folding)
    now = 10_000_000_000
    old, young = PendingKey(v4("10.96.0.10"), 53, 4), PendingKey(v4("10.96.0.11"), 53, 4)
    answered, fresh = PendingKey(v4("10.96.0.12"), 53, 4), PendingKey(v4("10.96.0.13"), 53, 4)
    tbl = FakeLruHash({old: Struct(ts=now - 1_500_000_000, answered_ns=0),
                       young: Struct(ts=now - 500_000_000, answered_ns=0),
                       answered: Struct(ts=now - 3_000_000_000, answered_ns=now - 2_000_000_000),
                       fresh: Struct(ts=now - 3_000_000_000, answered_ns=now - 100_000_000)})
    assert sweep.sweep(tbl, now) == 1
    assert sweep.sweep(tbl, now) == 0
    assert set(tbl) == {young, fresh}
    assert sweep.by_server() == {"10.96.0.10": 1} and sweep.total == 1 and sweep.swept_answered == 1


def test_info_without_a_kernel():
    p = probe(dns_ports="53,5353")
    info = p.info()
    assert info["ports"] == [53, 5353] and info["timeouts"] == 0 and "interfaces" not in info
    assert p._sock is None and p._tc == {} and p._tcx_links == {}
    p.close()  # nothing attached: nothing to do
