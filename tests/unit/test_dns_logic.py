"""Unit tier: the DNS probe's user-space logic (no kernel): the reference decoder the kernel
parser mirrors, names and privacy modes, resolv.conf search lists, search-path detection,
histogram quantiles, the findings on synthetic readings, and the metrics text."""

from __future__ import annotations

import struct

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from dpwatch.probes.dns import names as dn
from dpwatch.daemon.config import Config, ConfigError
from dpwatch.probes.base import Window
from dpwatch.probes.dns.probe import DnsProbe

HDR_Q = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]


def q(name: str, qtype: int = 1) -> bytes:
    return HDR_Q + dn.text_to_wire(name) + struct.pack("!HH", qtype, 1)


# -- decoder ----------------------------------------------------------------------------

def test_parse_query_and_response():
    m = dn.parse(q("www.Example.com", 28))
    assert (m.id, m.qr, m.rcode, m.qtype, m.name) == (0xBEEF, 0, 0, 28, "www.example.com")
    resp = struct.pack("!HHHHHH", 7, 0x8183, 1, 0, 0, 0) + dn.text_to_wire("nx.test") + b"\x00\x01\x00\x01"
    m = dn.parse(resp, sport=53, dport=40000)
    assert (m.qr, m.rcode, m.name) == (1, 3, "nx.test")
    # a response without a question (FORMERR style) is still a response
    assert dn.parse(struct.pack("!HHHHHH", 7, 0x8001, 0, 0, 0, 0), sport=53, dport=1).qdcount == 0
    # the root name
    assert dn.parse(HDR_Q + b"\x00\x00\x02\x00\x01").name == "."


@pytest.mark.parametrize("payload,why", [
    (b"", "12-byte"),
    (HDR_Q[:11], "12-byte"),
    (HDR_Q + b"\xc0\x0c\x00\x01\x00\x01", "compression pointer"),
    (HDR_Q + b"\x01a\xc0\x0e\x00\x01\x00\x01", "compression pointer"),
    (HDR_Q + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "label length 64"),
    (HDR_Q + b"\x80abc\x00\x00\x01\x00\x01", "label length 128"),
    (HDR_Q + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "longer than 255"),
    (HDR_Q + b"\x05abc", "runs past"),
    (HDR_Q + b"\x03abc\x00\x00\x01", "cut off"),
    (struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0), "qdcount 0"),
    (struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + b"\x00" * 10, "qdcount 2"),
])
def test_parse_rejects(payload, why):
    with pytest.raises(dn.Malformed, match=why):
        dn.parse(payload)


def test_name_of_exactly_255_bytes_is_accepted_and_256_is_not():
    # 3 labels of 63 + one of 61: 4*1 + 63*3 + 61 + 1 (root) = 255
    ok = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(dn.text_to_wire(ok)) == 255
    assert dn.parse(q(ok)).name == ok
    bad = ".".join(["a" * 63] * 3 + ["b" * 62])
    with pytest.raises(dn.Malformed, match="255"):
        dn.parse(q(bad))


def test_ports_decide_direction():
    with pytest.raises(dn.Malformed, match="query to a port"):
        dn.parse(q("a.test"), sport=53, dport=40000)
    resp = struct.pack("!HHHHHH", 7, 0x8180, 1, 0, 0, 0) + dn.text_to_wire("a") + b"\x00\x01\x00\x01"
    with pytest.raises(dn.Malformed, match="response from a port"):
        dn.parse(resp, sport=40000, dport=53)
    assert dn.parse(q("a.test"), dport=5353, ports=(53, 5353)).name == "a.test"


def test_wire_to_text_escapes_and_truncation():
    assert dn.wire_to_text(b"\x03a.b\x03com\x00") == "a\\046b.com"
    assert dn.wire_to_text(b"\x03ABC\x00") == "abc"
    assert dn.wire_to_text(b"") == "."
    # the kernel keeps 128 bytes of a longer name
    long = dn.text_to_wire(".".join(["x" * 40] * 5))
    assert dn.wire_to_text(long[:128], len(long)).endswith("...")
    assert dn.wire_to_text(b"\x05ab") == "ab..."


def test_qtype_and_rcode_labels_are_bounded():
    assert dn.qtype_name(1) == "A" and dn.qtype_name(28) == "AAAA" and dn.qtype_name(65) == "HTTPS"
    assert dn.qtype_name(200) == "200" and dn.qtype_name(dn.QTYPE_OTHER_SLOT) == "other"
    assert dn.rcode_name(3) == "NXDOMAIN" and dn.rcode_name(15) == "15"


# -- privacy ----------------------------------------------------------------------------

def test_privacy_modes():
    name = "api.payments.example.com"
    assert dn.Privacy("full")(name) == name
    assert dn.Privacy("suffix")(name) == "*.example.com"
    assert dn.Privacy("suffix")("example.com") == "example.com"
    h = dn.Privacy("hashed", key=b"k")
    assert h(name) == h(name.upper()) and h(name).startswith("h:") and "example" not in h(name)
    assert dn.Privacy("hashed", key=b"other")(name) != h(name)
    assert dn.Privacy("off")(name) is None
    with pytest.raises(ValueError):
        dn.Privacy("partial")


# -- search lists and amplification ---------------------------------------------------------

def test_read_search_list(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text("nameserver 10.96.0.10\ndomain old.example\n# search commented.out\n"
                 "search ns1.svc.cluster.local svc.cluster.local cluster.local ec2.internal.\n"
                 "options ndots:5\n")
    assert dn.read_search_list(str(p)) == ["ns1.svc.cluster.local", "svc.cluster.local",
                                           "cluster.local", "ec2.internal"]
    assert dn.read_search_list(str(tmp_path / "missing")) == []


def test_amplification_groups_a_search_walk():
    nx = {f"api.example.{s}": 5 for s in SEARCH}
    nx["other.example.cluster.local"] = 30       # one suffix only: a wrong name, not a walk
    nx["db.internal.corp"] = 50                  # under no search suffix
    amp = dn.find_amplification(nx, "cluster.local", [], 10)
    assert [(a.base, a.nxdomain, sorted(a.suffixes)) for a in amp] == [
        ("api.example", 15, sorted(SEARCH))]


def test_amplification_with_node_search_list_and_threshold():
    nx = {"redis.ec2.internal": 4, "redis.corp.example": 4, "redis.cluster.local": 4}
    assert dn.find_amplification(nx, "cluster.local", ["ec2.internal", "corp.example"], 12)[0].nxdomain == 12
    assert dn.find_amplification(nx, "cluster.local", ["ec2.internal", "corp.example"], 13) == []
    assert dn.find_amplification(nx, "cluster.local", [], 2) == []  # only one known suffix


def test_amplification_sums_walks_over_names():
    """Ten external names walked once each (3 NXDOMAIN apiece) waste as much as one name walked
    ten times: the threshold is on the walks together; a name seen under one suffix is no walk."""
    nx = {f"api{i}.example.{s}": 1 for i in range(4) for s in SEARCH}
    nx["kubernetes.default.default.svc.cluster.local"] = 40   # one suffix, then it answered
    amp = dn.find_amplification(nx, "cluster.local", [], 12)
    assert sorted((a.base, a.nxdomain) for a in amp) == [(f"api{i}.example", 3) for i in range(4)]
    assert dn.find_amplification(nx, "cluster.local", [], 13) == []


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


def test_namespace_suffix_for_another_cluster_domain():
    splits = dn.cluster_suffixes("web.shop.svc.k8s.example", "k8s.example")
    assert ("web", "shop.svc.k8s.example") in splits and ("web.shop", "svc.k8s.example") in splits


# -- histograms -------------------------------------------------------------------------

def test_buckets_match_the_kernel_rule():
    assert dn.BUCKET_BOUNDS[0] == 0.00025 and dn.BUCKET_BOUNDS[-1] == pytest.approx(8.192)
    assert dn.bucket_of(0.00025) == 0 and dn.bucket_of(0.000251) == 1
    assert dn.bucket_of(0.3) == 11 and dn.BUCKET_BOUNDS[11] == pytest.approx(0.512)
    assert dn.bucket_of(100) == dn.BUCKETS - 1


def test_quantile():
    b = [0] * dn.BUCKETS
    assert dn.quantile(b, 0.99) is None
    b[11] = 100
    assert dn.BUCKET_BOUNDS[10] < dn.quantile(b, 0.5) <= dn.BUCKET_BOUNDS[11]
    b[0] = 900
    assert dn.quantile(b, 0.5) <= dn.BUCKET_BOUNDS[0]
    assert dn.quantile(b, 0.99) > dn.BUCKET_BOUNDS[10]


# -- findings on synthetic readings ------------------------------------------------------------

def reading(queries=0, responses=None, hist=None, timeouts=None, srv_q=None, srv_r=None) -> dict:
    return {"counters": {
        "queries": {"A": queries}, "responses": dict(responses or {}), "hist": dict(hist or {}),
        "latency_sum": {}, "stats": {"unmatched": 0, "malformed": 0},
        "timeouts": dict(timeouts or {}), "server_queries": dict(srv_q or {}),
        "server_responses": dict(srv_r or {}), "server_latency": {}}, "gauges": {}}


def probe(**kw) -> DnsProbe:
    return DnsProbe(Config(**kw).validate())


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
    assert p._top_names({("NXDOMAIN", "A", "a.b"): 3}, None, 5) == []


def test_top_names_under_privacy():
    p = probe(dns_names="suffix")
    names = {("NXDOMAIN", "A", "x.api.example.com"): 3, ("NXDOMAIN", "AAAA", "y.api.example.com"): 2}
    assert p._top_names(names, "NXDOMAIN", 5) == [{"name": "*.example.com", "rcode": "NXDOMAIN", "count": 5}]


def test_cflags_ports_and_sizes():
    flags = probe(dns_ports="53,5353", dns_pending_entries=4096).cflags(None)
    assert "-DDNS_PORT0=53" in flags and "-DDNS_PORT1=5353" in flags and "-DDNS_PORT7=0" in flags
    assert "-DDNS_PENDING_MAX=4096" in flags


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
    from dpwatch.probes.dns import probe as dns_mod
    probe = DnsProbe(Config().validate())
    batch = iter(range(10**9))
    state: dict = {}

    def fresh_names():  # 1024 new names each pass: the kernel LRU's default size
        for _ in range(1024):
            state[("NXDOMAIN", "A", f"n{next(batch)}.example.")] = 1
        return dict(state)
    monkeypatch.setattr(probe, "read_names", fresh_names)
    for _ in range(dns_mod.NAME_HISTORY_MAX // 1024 + 5):
        probe._record_names()
    assert probe._names_hist_size <= dns_mod.NAME_HISTORY_MAX
    assert probe._names_hist_size == sum(len(d) for _, d in probe._names_hist)
    assert probe._names_hist_size >= dns_mod.NAME_HISTORY_MAX - 1024  # only whole intervals go
