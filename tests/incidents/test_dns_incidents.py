"""DNS incidents: the node's pods query a DNS server on the node (CoreDNS's place), and the
server is slow, silent or wrong. The daemon runs with its default flags (5 s DNS timeout)."""

from __future__ import annotations

import ipaddress

import pytest

from dnslab import (K8S_SEARCH, Dnsmasq, ScriptedServer, Unbound, concurrent_queries, queries, resolve_with_search,
                    route_pods)
from faults import nft_drop
from harness import Incident
from netlab import closed_udp_port

def scripted(inc, addr: str | None = None, ns: str | None = None) -> ScriptedServer:
    """A ScriptedServer for the incident (closed with it): in the node netns on the first
    pod's node address unless told otherwise."""
    server = ScriptedServer(ns or inc.lab.node, addr or inc.lab.pod.node_ip4)
    inc.on_close(server.close)
    return server


def dnsmasq(inc, *extra: str) -> Dnsmasq:
    """dnsmasq in the node netns on the first pod's node address, closed with the incident."""
    server = Dnsmasq(inc.lab.node, [inc.lab.pod.node_ip4], extra=extra)
    inc.on_close(server.close)
    return server


def test_dns_slow_few_answers():
    """Every answer of a pod after 800 ms, only 8 in the window: slow DNS all the same."""
    with Incident("dns_slow_8_answers") as inc:
        pod = inc.lab.pod
        scripted(inc)
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [(f"delay800.q{i}.test", "A") for i in range(8)], timeout=3)
        assert seen == {"NOERROR": 8}
        rep = inc.expect_top("dns.latency_high")
    top = rep["findings"][0]
    assert top["evidence"]["answers"] == 8 and top["evidence"]["answers_over_threshold"] == 8
    assert top["severity"] == "warning"


def test_dns_timeouts_server_silent():
    """The server takes the queries and answers none (an overloaded or dead CoreDNS behind
    its Service address): 12 queries, each timing out after the daemon's 5 s."""
    with Incident("dns_timeouts_silent_server") as inc:
        pod = inc.lab.pod
        server = scripted(inc)
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [(f"noreply.q{i}.test", "A") for i in range(12)], timeout=0.2)
        assert seen == {"timeout": 12} and server.ignored == 12
        rep = inc.expect_top("dns.timeouts", check=lambda f: f["evidence"]["timeouts"] == 12)
    top = rep["findings"][0]
    assert top["evidence"]["timeouts"] == 12 and top["severity"] == "critical"


def test_dns_servfail_storm():
    """Every answer SERVFAIL (the server's upstream is gone)."""
    with Incident("dns_servfail_storm") as inc:
        pod = inc.lab.pod
        scripted(inc)
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [(f"servfail.q{i}.test", "A") for i in range(40)]
                       + [(f"ok{i}.test", "A") for i in range(40)])
        assert seen == {"SERVFAIL": 40, "NOERROR": 40}
        rep = inc.expect_top("dns.errors")
    top = rep["findings"][0]
    assert top["evidence"]["servfail"] == 40 and top["evidence"]["errors"] == 40
    assert top["severity"] == "critical"  # 50% errors, 10x the 1% threshold is 10%


# -- slow ----------------------------------------------------------------------------------------

def test_dns_slow_for_all():
    """The server answers every query after 300 ms (an overloaded CoreDNS): 100 lookups from
    two pods at once, every one of them slow."""
    with Incident("dns_slow_for_all", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        scripted(inc)
        inc.start()
        inc.fault()
        seen = concurrent_queries([(p.ns, p0.node_ip4, [(f"delay300.p{p.index}q{i}.test", "A") for i in range(50)])
                                   for p in (p0, p1)])
        assert seen == {"NOERROR": 100}
        rep = inc.expect_top("dns.latency_high")
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["answers"] == 100 and ev["answers_over_threshold"] == 100
    assert top["severity"] == "warning"          # 300 ms: not 5x the 200 ms threshold
    assert 256 <= ev["latency_p50_ms"] <= 512
    assert [s["server"] for s in ev["by_server"]] == [p0.node_ip4]


def test_dns_slow_fraction():
    """10 of 100 answers take 600 ms, the other 90 are fast: the p99 is 600 ms (a slow
    upstream for some names)."""
    with Incident("dns_slow_fraction", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        scripted(inc)
        inc.start()
        inc.fault()
        names = [(f"{'delay600' if i % 10 == 0 else 'fast'}.q{i}.test", "A") for i in range(100)]
        seen = concurrent_queries([(p0.ns, p0.node_ip4, names[:50]), (p1.ns, p0.node_ip4, names[50:])])
        assert seen == {"NOERROR": 100}
        rep = inc.expect_top("dns.latency_high")
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["answers"] == 100 and ev["answers_over_threshold"] == 10
    assert top["severity"] == "warning"
    assert ev["latency_p50_ms"] < 50 and ev["latency_p99_ms"] >= 512


def test_dns_one_slow_answer_is_healthy():
    """1 answer of 100 took 600 ms: one slow answer is within any p99 (the healthy case
    cannot be ruled out), so nothing above info."""
    with Incident("dns_one_slow_of_100") as inc:
        pod = inc.lab.pod
        scripted(inc)
        inc.start()
        names = [(f"{'delay600' if i == 50 else 'fast'}.q{i}.test", "A") for i in range(100)]
        assert concurrent_queries([(pod.ns, pod.node_ip4, names)]) == {"NOERROR": 100}
        inc.expect_healthy()


def test_dns_ipv6_server_slow():
    """The pods' DNS server is the node's IPv6 address and answers after 400 ms (AAAA and A
    over IPv6)."""
    with Incident("dns_ipv6_server_slow") as inc:
        pod = inc.lab.pod
        scripted(inc, pod.node_ip6)
        inc.start()
        inc.fault()
        names = [(f"delay400.v6q{i}.test", "AAAA" if i % 2 else "A") for i in range(20)]
        assert concurrent_queries([(pod.ns, pod.node_ip6, names)]) == {"NOERROR": 20}
        rep = inc.expect_top("dns.latency_high")
    ev = rep["findings"][0]["evidence"]
    assert ev["answers"] == 20 and ev["answers_over_threshold"] == 20
    assert [s["server"] for s in ev["by_server"]] == [str(ipaddress.ip_address(pod.node_ip6))]


@pytest.mark.skipif(not Unbound.available, reason="unbound is not installed")
def test_dns_slow_unbound_upstream():
    """A real unbound on the node (a node-local cache) whose stub zone's upstream answers after
    300 ms (unbound's first timeout for a new upstream is 376 ms, so it does not resend): the
    pod's answers are slow, and so are unbound's own queries to its upstream."""
    with Incident("dns_slow_unbound_upstream", pods=2) as inc:
        p0, p1 = inc.lab.pod_list
        scripted(inc, p1.ip4, p1.ns)
        resolver = Unbound(inc.lab.node, p0.node_ip4, extra=(
            "  qname-minimisation: no\n"
            '  local-zone: "slow.test." transparent\n'
            f'stub-zone:\n  name: "slow.test."\n  stub-addr: {p1.ip4}\n'))
        inc.on_close(resolver.close)
        inc.start()
        inc.fault()
        names = [(f"delay300.q{i}.slow.test", "A") for i in range(20)]
        seen = concurrent_queries([(p0.ns, p0.node_ip4, names)], timeout=3)
        assert seen == {"NOERROR": 20}, seen
        rep = inc.expect_top("dns.latency_high")
    ev = rep["findings"][0]["evidence"]
    servers = {s["server"]: s for s in ev["by_server"]}
    assert set(servers) == {p0.node_ip4, p1.ip4}, servers
    assert servers[p0.node_ip4]["responses"] == 20 and servers[p1.ip4]["responses"] >= 20
    assert ev["answers_over_threshold"] >= 40


# -- no answer -----------------------------------------------------------------------------------

def test_dns_timeouts_dead_upstream():
    """dnsmasq on the node forwards names it does not serve to an upstream that is gone (a
    closed port): it answers those queries not at all, not even SERVFAIL. Its own names still
    answer."""
    with Incident("dns_timeouts_dead_upstream") as inc:
        pod = inc.lab.pod
        dead = closed_udp_port(inc.lab.node)
        dnsmasq(inc, f"--server=127.0.0.1#{dead}")
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [("ok.test", "A")] * 20
                       + [(f"api{i}.example.org", "A") for i in range(12)], timeout=0.3)
        assert seen == {"NOERROR": 20, "timeout": 12}
        rep = inc.expect_top("dns.timeouts", check=lambda f: f["evidence"]["timeouts"] == 12)
    top = rep["findings"][0]
    assert top["evidence"]["timeouts"] == 12 and top["evidence"]["by_server"] == {pod.node_ip4: 12}
    assert top["severity"] == "critical"   # 12 of 32: 37.5%


# -- wrong answers -------------------------------------------------------------------------------

def test_dns_nxdomain_storm():
    """A pod looks up names that do not exist (a typo'd service name in its config): 60
    NXDOMAIN among 100 answers, from dnsmasq."""
    with Incident("dns_nxdomain_storm") as inc:
        pod = inc.lab.pod
        dnsmasq(inc)
        inc.start()
        inc.fault()
        seen = concurrent_queries([(pod.ns, pod.node_ip4, [(f"paymnets{i % 3}.nx.test", "A") for i in range(60)]
                                    + [("ok.test", "A")] * 40)])
        assert seen == {"NXDOMAIN": 60, "NOERROR": 40}
        rep = inc.expect_top("dns.nxdomain_rate")
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["nxdomain"] == 60 and ev["nxdomain_percent"] == 60.0
    assert ev["top_names"] == [{"name": "*.nx.test", "rcode": "NXDOMAIN", "count": 60}]  # --dns-names suffix


def test_dns_refused():
    """The server refuses names it does not serve (no zone, no forwarder): 30 REFUSED among 60
    answers."""
    with Incident("dns_refused") as inc:
        pod = inc.lab.pod
        dnsmasq(inc)
        inc.start()
        inc.fault()
        seen = concurrent_queries([(pod.ns, pod.node_ip4, [(f"db{i}.internal.corp", "A") for i in range(30)]
                                    + [("ok.test", "A")] * 30)])
        assert seen == {"REFUSED": 30, "NOERROR": 30}
        rep = inc.expect_top("dns.errors")
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["errors"] == 30 and ev["refused"] == 30 and ev["servfail"] == 0
    assert top["severity"] == "critical"   # 50%
    assert {"name": "*.internal.corp", "rcode": "REFUSED", "count": 30} in ev["top_names"]


def test_dns_search_path_storm():
    """A pod resolves an external name with the Kubernetes search list and ndots:5: each
    lookup is tried under default.svc.cluster.local, svc.cluster.local and cluster.local
    (NXDOMAIN from the cluster zone) before the name itself answers."""
    with Incident("dns_search_path_storm") as inc:
        pod = inc.lab.pod
        dnsmasq(inc)
        inc.start()
        inc.fault()
        for _ in range(10):
            answer, tried = resolve_with_search(pod.ns, pod.node_ip4, "api.example", K8S_SEARCH, ndots=5)
            assert answer == "api.example." and len(tried) == 4
        rep = inc.expect_top("dns.search_path_amplification", allowed=set())
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["wasted_queries"] == 30
    assert ev["names"][0]["name"] == "api.example" and ev["names"][0]["nxdomain"] == 30
    assert sum(ev["names"][0]["suffixes"].values()) == 30
    assert ev["related"]["dns.nxdomain_rate"]["nxdomain"] == 30   # folded in, not reported twice


def test_dns_search_path_many_names():
    """A pod calls eight external APIs, each name resolved once or twice with the search list
    and ndots:5: no single name walks ten times, but together the walks are three quarters
    of the node's DNS answers."""
    with Incident("dns_search_path_many_names") as inc:
        pod = inc.lab.pod
        dnsmasq(inc)
        inc.start()
        inc.fault()
        for i in range(12):
            answer, _ = resolve_with_search(pod.ns, pod.node_ip4, f"api{i % 8}.ok.test", K8S_SEARCH, ndots=5)
            assert answer == f"api{i % 8}.ok.test."
        rep = inc.expect_top("dns.search_path_amplification")
    ev = rep["findings"][0]["evidence"]
    assert ev["wasted_queries"] == 36 and ev["wasted_percent"] == 75.0
    assert len(ev["names"]) == 8 and {n["name"] for n in ev["names"]} == {"*.ok.test"}  # --dns-names suffix
    assert ev["related"]["dns.nxdomain_rate"]["nxdomain"] == 36


def test_dns_blocked_by_policy():
    """A NetworkPolicy deny on DNS: the node's firewall drops the pods' queries to its dnsmasq
    (udp dport 53 drop), so each one times out."""
    with Incident("dns_blocked_by_policy") as inc:
        pod = inc.lab.pod
        dnsmasq(inc)
        nft_drop(inc, "udp dport 53 drop")
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [("ok.test", "A")] * 12, timeout=0.3)
        assert seen == {"timeout": 12}
        rep = inc.expect_top("dns.timeouts", allowed={"drops.netfilter"},
                             check=lambda f: f["evidence"]["timeouts"] == 12)
    top = rep["findings"][0]
    assert top["evidence"]["timeouts"] == 12 and top["severity"] == "critical"
    assert top["evidence"]["netfilter_drops_in_window"] >= 12 and "NetworkPolicy blocks DNS" in top["summary"]
    nf = next(f for f in rep["findings"] if f["id"] == "drops.netfilter")
    assert nf["evidence"]["drops"] >= 12   # the same queries, dropped at the node's input


def test_dns_server_down():
    """Nothing listens on the DNS address any more (CoreDNS crashed, its Service address still
    routed): each query gets an ICMP port unreachable, which a resolver's unconnected socket
    never sees, so every lookup times out. The NO_SOCKET drops are too few to matter."""
    with Incident("dns_server_down") as inc:
        pod = inc.lab.pod
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [(f"web{i}.test", "A") for i in range(12)], timeout=0.3)
        assert seen == {"timeout": 12}
        rep = inc.expect_top("dns.timeouts", check=lambda f: f["evidence"]["timeouts"] == 12)
    top = rep["findings"][0]
    assert top["evidence"]["timeouts"] == 12 and top["evidence"]["responses"] == 0
    assert top["severity"] == "critical"


def test_dns_one_of_two_servers_slow():
    """Two DNS servers behind the pods (two CoreDNS replicas; each pod uses one): one answers
    after 400 ms, the other at once. Slow DNS, and by_server names the slow one."""
    with Incident("dns_one_of_two_servers_slow", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        scripted(inc, p0.node_ip4)
        scripted(inc, p1.node_ip4)
        inc.start()
        inc.fault()
        seen = concurrent_queries([(p0.ns, p0.node_ip4, [(f"delay400.q{i}.test", "A") for i in range(20)]),
                                   (p1.ns, p1.node_ip4, [(f"fast.q{i}.test", "A") for i in range(20)])])
        assert seen == {"NOERROR": 40}
        rep = inc.expect_top("dns.latency_high")
    ev = rep["findings"][0]["evidence"]
    assert ev["answers"] == 40 and ev["answers_over_threshold"] == 20
    servers = {s["server"]: s for s in ev["by_server"]}
    assert servers[p0.node_ip4]["mean_latency_ms"] >= 400 > 50 > servers[p1.node_ip4]["mean_latency_ms"]


@pytest.mark.skipif(not Unbound.available, reason="unbound is not installed")
def test_dns_servfail_from_unbound():
    """A real unbound on the node whose stub zone's upstream refuses every query: unbound
    answers the pod SERVFAIL (and its own queries upstream get REFUSED)."""
    with Incident("dns_servfail_from_unbound", pods=2) as inc:
        p0, p1 = inc.lab.pod_list
        scripted(inc, p1.ip4, p1.ns)
        resolver = Unbound(inc.lab.node, p0.node_ip4, extra=(
            "  qname-minimisation: no\n"
            '  local-zone: "corp.test." transparent\n'
            f'stub-zone:\n  name: "corp.test."\n  stub-addr: {p1.ip4}\n'))
        inc.on_close(resolver.close)
        inc.start()
        inc.fault()
        seen = concurrent_queries([(p0.ns, p0.node_ip4, [(f"refused.db{i}.corp.test", "A") for i in range(20)]
                                    + [("ok.test", "A")] * 20)], timeout=3)
        assert seen == {"SERVFAIL": 20, "NOERROR": 20}, seen
        rep = inc.expect_top("dns.errors")
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["servfail"] == 20 and ev["refused"] >= 20 and top["severity"] == "critical"
    servers = {s["server"]: s for s in ev["by_server"]}
    assert servers[p0.node_ip4]["servfail"] == 20 and servers[p1.ip4]["refused"] >= 20
