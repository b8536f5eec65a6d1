"""Two faults at once: which one ranks first, and why (each docstring says). The ranking is
the triage report's: severity, then the order of magnitude of the impact, with the
cross-probe rules of daemon/triage/rules.py (RULES) (docs/findings.md, "Ranking")."""

from __future__ import annotations

from dnslab import (K8S_SEARCH, Dnsmasq, ScriptedServer, concurrent_queries, queries, resolve_with_search,
                    route_pods)
from harness import Incident, above_info
from netlab import closed_udp_port, sh

def ids(rep: dict) -> list[str]:
    return [f["id"] for f in above_info(rep)]


def test_dns_timeouts_and_nxdomain_storm():
    """dnsmasq's upstream is gone (external names get no answer at all) while another pod
    storms it with names that do not exist. dns.timeouts ranks first although the NXDOMAINs
    are 16 times as many: an NXDOMAIN is the server answering, in a millisecond, and the
    datapath works; a query with no answer stalls its client for the resolver's timeout (5 s)
    and the lookup fails. The storm's queries also dilute the timeout share (12 of 212, a
    warning), so by rate alone the storm would rank first."""
    with Incident("two_faults_dns_timeouts_and_nxdomain_storm", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        server = Dnsmasq(inc.lab.node, [p0.node_ip4], extra=(f"--server=127.0.0.1#{closed_udp_port(inc.lab.node)}",))
        inc.on_close(server.close)
        inc.start()
        inc.fault()
        storm = concurrent_queries([(p1.ns, p0.node_ip4, [(f"orders{i % 4}.nx.test", "A") for i in range(200)])])
        lost = queries(p0.ns, p0.node_ip4, [(f"api{i}.example.org", "A") for i in range(12)], timeout=0.3)
        assert storm == {"NXDOMAIN": 200} and lost == {"timeout": 12}
        rep = inc.expect_top("dns.timeouts", allowed={"dns.nxdomain_rate"},
                             check=lambda f: f["evidence"]["timeouts"] == 12)
    assert ids(rep) == ["dns.timeouts", "dns.nxdomain_rate"]
    t, nx = above_info(rep)
    assert t["evidence"]["timeouts"] == 12 and t["severity"] == "warning"
    assert nx["evidence"]["nxdomain"] == 200 and nx["evidence"]["nxdomain_per_second"] > t["evidence"]["timeouts_per_second"]


def test_dns_servfail_and_search_path_storm():
    """The server fails some lookups (SERVFAIL: its upstream for one zone is broken, 6% of the
    answers) while a pod walks the search list for an external name (75% of the answers are
    NXDOMAIN). dns.errors ranks first: a SERVFAIL is a lookup that failed; the search-path
    NXDOMAINs are wasted round trips before the name answers."""
    with Incident("two_faults_dns_servfail_and_search_path_storm", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        server = ScriptedServer(inc.lab.node, p0.node_ip4)
        inc.on_close(server.close)
        walker = Dnsmasq(inc.lab.node, [p1.node_ip4])
        inc.on_close(walker.close)
        inc.start()
        inc.fault()
        for _ in range(60):
            answer, _ = resolve_with_search(p1.ns, p1.node_ip4, "api.example", K8S_SEARCH, ndots=5)
            assert answer == "api.example."
        seen = concurrent_queries([(p0.ns, p0.node_ip4, [(f"servfail.db{i}.corp", "A") for i in range(16)]
                                    + [(f"web{i}.test", "A") for i in range(24)])])
        assert seen == {"SERVFAIL": 16, "NOERROR": 24}
        rep = inc.expect_top("dns.errors", allowed={"dns.search_path_amplification"})
    assert ids(rep) == ["dns.errors", "dns.search_path_amplification"]
    err, amp = above_info(rep)
    assert err["evidence"]["servfail"] == 16 and amp["evidence"]["wasted_queries"] == 180
    assert "dns.nxdomain_rate" in amp["evidence"]["related"]


def test_slow_dns_and_servfail_storm():
    """Every answer of one server is 300 ms late while half the lookups get SERVFAIL.
    dns.errors (critical: 50% of the answers, above 10x the 1% threshold) ranks above
    dns.latency_high (warning: 300 ms is under 5x the 200 ms threshold): a failed lookup
    fails its request; a slow one only delays it."""
    with Incident("two_faults_slow_dns_and_servfail_storm", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        server = ScriptedServer(inc.lab.node, p0.node_ip4)
        inc.on_close(server.close)
        inc.start()
        inc.fault()
        seen = concurrent_queries([(p0.ns, p0.node_ip4, [(f"delay300.q{i}.test", "A") for i in range(40)]),
                                   (p1.ns, p0.node_ip4, [(f"servfail.q{i}.test", "A") for i in range(40)])])
        assert seen == {"NOERROR": 40, "SERVFAIL": 40}
        rep = inc.expect_top("dns.errors", allowed={"dns.latency_high"})
    assert ids(rep) == ["dns.errors", "dns.latency_high"]
    err, lat = above_info(rep)
    assert err["severity"] == "critical" and err["evidence"]["servfail"] == 40
    assert lat["severity"] == "warning" and lat["evidence"]["answers_over_threshold"] == 40


def test_mtu_mismatch_and_slow_dns():
    """A pod's veth is 1400 on the node end and 1500 in the pod (its full-size frames vanish)
    while the node's DNS answers are 400 ms late. mtu.mismatch ranks first: critical, a
    configuration error that silently drops every full-size packet of that pod, next to a
    warning about answers that still arrive."""
    with Incident("two_faults_mtu_mismatch_and_slow_dns", pods=2) as inc:
        p0, p1 = inc.lab.pod_list
        server = ScriptedServer(inc.lab.node, p0.node_ip4)
        inc.on_close(server.close)
        inc.start()
        inc.fault()
        sh("ip", "link", "set", "dev", p1.veth_node, "mtu", "1400", ns=inc.lab.node)
        seen = concurrent_queries([(p0.ns, p0.node_ip4, [(f"delay400.q{i}.test", "A") for i in range(20)])])
        assert seen == {"NOERROR": 20}
        rep = inc.expect_top("mtu.mismatch", allowed={"dns.latency_high"},
                             check=lambda f: any(m["kind"] == "veth_mismatch" for m in f["evidence"]["mismatches"]))
    assert ids(rep) == ["mtu.mismatch", "dns.latency_high"]
    mm = above_info(rep)[0]
    assert mm["severity"] == "critical"
    assert any(d["name"] == p1.veth_node and d["mtu"] == 1400 for m in mm["evidence"]["mismatches"] for d in m["devices"])
