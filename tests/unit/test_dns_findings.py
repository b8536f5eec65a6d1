"""Unit tier: the DNS findings (probes/dns/findings.py) on synthetic readings, through
DnsProbe.diagnose (the entry point) and the finding functions themselves."""

from __future__ import annotations

import pytest

from dpwatch.daemon.config import Config
from dpwatch.probes.base import Window
from dpwatch.probes.dns import findings as F
from dpwatch.probes.dns import names as dn
from dpwatch.probes.dns.probe import DnsProbe

SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]


def reading(queries=0, responses=None, hist=None, timeouts=None, srv_q=None, srv_r=None) -> dict:
    return {"counters": {
        "queries": {"A": queries}, "responses": dict(responses or {}), "hist": dict(hist or {}),
        "latency_sum": {}, "stats": {"unmatched": 0, "malformed": 0},
        "timeouts": dict(timeouts or {}), "server_queries": dict(srv_q or {}),
        "server_responses": dict(srv_r or {}), "server_latency": {}}, "gauges": {}}


def probe(**kw) -> DnsProbe:
    return DnsProbe(Config(**kw).validate())


def amp_probe(names: dict, **kw) -> DnsProbe:
    p = probe(**kw)
    p.names_in_window = lambda seconds: dict(names)
    return p


def test_search_path_finding_needs_a_share_of_the_answers():
    """Walks that are more than --dns-nxdomain-percent of the answers (sample-size rule) raise
    the finding; the same walks among many answers are ndots:5 as usual."""
    names = {("NXDOMAIN", "A", f"api{i}.example.{s}"): 1 for i in range(8) for s in SEARCH}
    names.update({("NOERROR", "A", f"api{i}.example"): 1 for i in range(8)})
    storm = reading(32, {"NXDOMAIN": 24, "NOERROR": 8})
    found = {f.id: f for f in amp_probe(names).diagnose(Window(60, reading(), storm))}
    f = found["dns.search_path_amplification"]
    assert f.evidence["wasted_queries"] == 24 and f.evidence["wasted_percent"] == 75.0
    assert len(f.evidence["names"]) == 8
    # suffix mode: the cluster's own suffixes as they are, a namespace hidden; counts add up
    assert f.evidence["names"][0]["suffixes"] == {"*.svc.cluster.local": 1, "cluster.local": 1,
                                                  "svc.cluster.local": 1}
    quiet = reading(600, {"NXDOMAIN": 24, "NOERROR": 576})
    assert amp_probe(names).diagnose(Window(60, reading(), quiet)) == []
    # a share, not a significance test: 24 of 80 (30%) is enough, 24 of 120 (20%) is not
    some = reading(80, {"NXDOMAIN": 24, "NOERROR": 56})
    assert "dns.search_path_amplification" in {f.id for f in amp_probe(names).diagnose(Window(60, reading(), some))}
    fifth = reading(120, {"NXDOMAIN": 24, "NOERROR": 96})
    assert "dns.search_path_amplification" not in {f.id for f in amp_probe(names).diagnose(Window(60, reading(), fifth))}


def test_no_findings_when_healthy():
    new = reading(100, {"NOERROR": 100}, {("NOERROR", 2): 100})
    assert probe().diagnose(Window(60, reading(), new)) == []


def test_latency_high_from_histogram():
    new = reading(100, {"NOERROR": 100}, {("NOERROR", 2): 90, ("NOERROR", 11): 10})
    f, = probe().diagnose(Window(60, reading(), new))
    assert f.id == "dns.latency_high" and f.severity == "warning"
    assert f.evidence["latency_p99_ms"] > 256 and f.evidence["latency_p50_ms"] <= 1
    critical = reading(100, {"NOERROR": 100}, {("NOERROR", 13): 100})  # ~2 s
    assert probe().diagnose(Window(60, reading(), critical))[0].severity == "critical"


def test_timeouts_and_errors():
    new = reading(100, {"NOERROR": 80, "SERVFAIL": 5, "REFUSED": 5}, {("NOERROR", 1): 90},
                  timeouts={"10.96.0.10": 10}, srv_q={"10.96.0.10": 100},
                  srv_r={("10.96.0.10", "SERVFAIL"): 5, ("10.96.0.10", "REFUSED"): 5})
    found = {f.id: f for f in probe().diagnose(Window(10, reading(), new))}
    t = found["dns.timeouts"]
    assert t.evidence["timeouts"] == 10 and t.evidence["timeout_percent"] == 10.0
    assert t.severity == "critical" and t.impact == 1.0
    assert any("dig @10.96.0.10" in r for r in t.remediation)
    e = found["dns.errors"]
    assert (e.evidence["servfail"], e.evidence["refused"], e.evidence["error_percent"]) == (5, 5, 11.11)
    assert e.evidence["by_server"][0]["servfail"] == 5


def test_nxdomain_rate_needs_enough_answers():
    # 4 of 4 NXDOMAIN: P = 0.2^4 = 0.0016 if the true share were 20%: not enough. 5 of 5 is.
    few = reading(4, {"NXDOMAIN": 4})
    assert probe().diagnose(Window(60, reading(), few)) == []
    five = reading(5, {"NXDOMAIN": 5})
    f, = probe().diagnose(Window(60, reading(), five))
    assert f.id == "dns.nxdomain_rate" and f.evidence["p_value_if_share_were_below"] == 0.00032
    assert "(5 of 5)" in f.summary
    # 5 of 20 (25%) is above the threshold, but the sample does not rule out 20%.
    assert probe().diagnose(Window(60, reading(), reading(20, {"NXDOMAIN": 5, "NOERROR": 15}))) == []
    many = reading(50, {"NXDOMAIN": 30, "NOERROR": 20})
    f, = probe().diagnose(Window(60, reading(), many))
    assert f.id == "dns.nxdomain_rate" and f.evidence["nxdomain_percent"] == 60.0


def test_names_off_means_no_names_and_no_amplification():
    p = probe(dns_names="off")
    assert "-DDNS_NAMES_MAX=0" in p.cflags(None)
    assert F.top_names(p.privacy, {("NXDOMAIN", "A", "a.b"): 3}, None, 5) == []
    names = {("NXDOMAIN", "A", f"api.example.{s}"): 10 for s in SEARCH}
    p.names_in_window = lambda seconds: pytest.fail("no names are read under privacy mode off")
    storm = reading(30, {"NXDOMAIN": 30})
    assert [f.id for f in p.diagnose(Window(60, reading(), storm))] == ["dns.nxdomain_rate"]
    w = F.summarize(Window(60, reading(), storm))
    assert F.search_path_amplification(w, F.Names(dn.Privacy("off"), names), 20, 10, "cluster.local") is None


def test_top_names_under_privacy():
    p = probe(dns_names="suffix")
    names = {("NXDOMAIN", "A", "x.api.example.com"): 3, ("NXDOMAIN", "AAAA", "y.api.example.com"): 2}
    assert F.top_names(p.privacy, names, "NXDOMAIN", 5) == [
        {"name": "*.example.com", "rcode": "NXDOMAIN", "count": 5}]


# -- the finding functions, called as Probe.diagnose calls them ---------------------------------

def window(new: dict, seconds: float = 60) -> F.DnsWindow:
    return F.summarize(Window(seconds, reading(), new))


def test_each_finding_is_none_below_its_threshold():
    quiet = window(reading(100, {"NOERROR": 99, "NXDOMAIN": 1}, {("NOERROR", 2): 99}))
    names = F.Names(dn.Privacy("full"))
    assert F.latency_high(quiet, names, 0.2) is None
    assert F.timeouts(quiet, 1.0, 5.0, "cluster.local") is None
    assert F.errors(quiet, names, 1.0) is None
    assert F.nxdomain_rate(quiet, names, 20.0) is None
    assert F.search_path_amplification(quiet, names, 20.0, 10, "cluster.local") is None


def test_timeouts_finding_takes_its_config_values():
    """Thresholds and the cluster domain are arguments: the same window is a warning or
    critical by --dns-timeout-percent alone, and the dig hint names the given domain."""
    w = window(reading(100, {"NOERROR": 90}, timeouts={"[fd00::a]:5353": 10}))
    f = F.timeouts(w, 1.0, 2.0, "k8s.example")
    assert f.severity == "critical" and f.evidence["timeout_seconds"] == 2.0
    assert "dig @fd00::a kubernetes.default.svc.k8s.example" in f.remediation[0]
    assert "within 2s" in f.summary
    assert F.timeouts(w, 2.0, 2.0, "k8s.example").severity == "warning"
    assert F.timeouts(w, 50.0, 2.0, "k8s.example") is None


def test_search_path_finding_reads_the_injected_search_list():
    """The node's resolv.conf search list comes in the facts (read at attach, never inside a
    finding): a walk over the node's own suffixes counts, and they are shown by privacy mode."""
    names = {("NXDOMAIN", "A", "redis.ec2.internal"): 6, ("NXDOMAIN", "A", "redis.corp.example"): 6,
             ("NOERROR", "A", "redis"): 6}
    w = window(reading(18, {"NXDOMAIN": 12, "NOERROR": 6}))
    without = F.Names(dn.Privacy("full"), names)
    assert F.search_path_amplification(w, without, 20.0, 10, "cluster.local") is None
    facts = F.Names(dn.Privacy("suffix"), names, ("ec2.internal", "corp.example", "svc.cluster.local"))
    f = F.search_path_amplification(w, facts, 20.0, 10, "cluster.local")
    assert f.evidence["wasted_queries"] == 12 and f.evidence["names"][0]["name"] == "redis"
    assert f.evidence["search_list"] == ["ec2.internal", "corp.example", "svc.cluster.local"]
    assert f.evidence["names"][0]["suffixes"] == {"ec2.internal": 6, "corp.example": 6}


def test_suffix_text_by_privacy_mode():
    full, suffix, hashed = dn.Privacy("full"), dn.Privacy("suffix"), dn.Privacy("hashed", key=b"k")
    assert F.suffix_text(full, "cluster.local", "shop.svc.cluster.local") == "shop.svc.cluster.local"
    assert F.suffix_text(suffix, "cluster.local", "shop.svc.cluster.local") == "*.svc.cluster.local"
    assert F.suffix_text(suffix, "cluster.local", "svc.cluster.local.") == "svc.cluster.local"
    assert F.suffix_text(hashed, "cluster.local", "cluster.local") == "cluster.local"
    assert F.suffix_text(hashed, "cluster.local", "corp.example").startswith("h:")
    assert F.suffix_counts(suffix, "cluster.local", {"a.svc.cluster.local": 2, "b.svc.cluster.local": 3}) == {
        "*.svc.cluster.local": 5}


def test_server_host_of_labels():
    assert F.server_host("10.96.0.10") == "10.96.0.10"
    assert F.server_host("10.0.0.1:5353") == "10.0.0.1"
    assert F.server_host("[fd00::1]:5353") == "fd00::1"
    assert F.server_host("fd00::1") == "fd00::1"
