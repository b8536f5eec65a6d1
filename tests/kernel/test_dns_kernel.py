"""Kernel tier: the DNS probe loaded for real (in a "node" netns), real DNS servers (dnsmasq,
unbound, a dnslib server with delays, SERVFAIL and no reply) and dnspython clients in "pod"
netns. Counts are exact: the probe must see what the clients sent and received, once each,
whichever hook (tcx links, AF_PACKET socket filter or legacy tc classifier) carries it."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from dnslab import (Dnsmasq, ScriptedServer, Unbound, malformed_payloads, queries, resolve_with_search,
                    route_pods, send_raw)
from dpwatch.probes.dns import names as dn
from dpwatch.daemon.config import Config
from dpwatch.daemon.service import Daemon
from dpwatch.probes.base import Window
from netlab import Lab, in_netns, sh

SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]


@pytest.fixture(scope="module", params=["tcx", "socket", "tc"])
def env(request):
    """A node netns with two pods routed through it, dnsmasq on the node's pod0-side
    addresses, and the probe loaded inside the node netns with the given hook."""
    if request.param == "tcx":
        from dpwatch.probes.dns.probe import tcx_supported
        ok, why = tcx_supported()
        if not ok:  # Debian's 6.1 in the qemu guest: tcx links came in 6.6
            pytest.skip(why)
    with Lab(pods=2) as lab:
        route_pods(lab)
        p0 = lab.pod_list[0]
        cfg = Config(probes=["dns"], dns_hook=request.param, dns_names="full", dns_timeout=1.0,
                     dns_search_nxdomain_min=10, dns_top_servers=4).validate()
        d = Daemon(cfg)
        with Dnsmasq(lab.node, [p0.node_ip4, p0.node_ip6]) as masq:
            in_netns(lab.node, d.load)
            try:
                st = d.manager.status["dns"]
                assert st.state.value == "attached", st.reason
                assert st.mode == request.param
                yield lab, d, d.manager.probes["dns"], masq
            finally:
                d.stop()


def counters(d) -> dict:
    return d.manager.collect()["dns"]["counters"]


def diff(before: dict, after: dict, group: str) -> dict:
    out = {}
    for k, v in after[group].items():
        dv = v - before[group].get(k, 0)
        if dv:
            out[k] = dv
    return out


def test_hook_attached_everywhere(env):
    lab, d, probe, _ = env
    info = probe.info()
    if probe.mode.name in ("tc", "tcx"):
        names = set(in_netns(lab.node, lambda: [n for _, n in socket.if_nameindex()]))
        assert set(info["interfaces"]) == names
        out = sh("tc", "filter", "show", "dev", lab.pod_list[0].veth_node, "ingress", ns=lab.node).stdout
        # legacy tc shows a named filter; tcx links are not tc filters at all
        assert ("dpwatch_dns_" in out) == (probe.mode.name == "tc")
    if probe.mode.name == "tcx":
        assert len(probe._tcx_links) == len(info["interfaces"])
        assert all(len(fds) == 2 for fds in probe._tcx_links.values())  # ingress and egress
    assert d.manager.compiles == 1


def test_new_and_removed_interfaces_are_followed(env):
    """tcx and tc attach per interface: a pod veth created after start-up is hooked at the
    next sampler pass (here called from another netns, as a test thread is), and a removed
    one is forgotten."""
    lab, d, probe, _ = env
    if probe.mode.name not in ("tc", "tcx"):
        # The socket hook is one ETH_P_ALL socket: no per-interface state to follow at all.
        assert "interfaces" not in probe.info() and probe._sock is not None
        probe.background()
        assert "interfaces" not in probe.info() and probe._sock is not None
        return
    dev = f"dpwnew{lab.tag}"[:15]
    tcx = probe.mode.name == "tcx"
    if tcx:  # linked on the kernel's link message, without waiting for the sampler
        assert probe.info()["link_watch"] == "netlink"
        events = probe.info()["link_events"]
    sh("ip", "link", "add", dev, "type", "veth", "peer", "name", dev[:-1] + "p", ns=lab.node)
    try:
        if tcx:
            assert wait_until(lambda: dev in probe.info()["interfaces"]), probe.info()
            assert probe.info()["link_events"] > events
            index = next(i for i, n in dict(probe._tc).items() if n == dev)  # a copy: the link watch may be adding the peer
            assert len(probe._tcx_links[index]) == 2
        else:
            assert dev not in probe.info()["interfaces"]
            probe.background()
            assert dev in probe.info()["interfaces"]
    finally:
        sh("ip", "link", "del", dev, ns=lab.node, check=False)
    if tcx:
        assert wait_until(lambda: dev not in probe.info()["interfaces"]), probe.info()
    else:
        probe.background()
        assert dev not in probe.info()["interfaces"]


def wait_until(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_new_pods_first_queries_are_counted(env):
    """A pod whose veth appears after start-up sends its first queries 0.2 s later, with no
    sampler pass in between (this test calls none): tcx links the interface on the kernel's
    link message and the socket hook sees every interface anyway, so both count them exactly.
    Legacy tc links new interfaces only at the sampler's rescan: called here, as it would run."""
    lab, d, probe, masq = env
    ns, vn, vp = f"dpw-late-{lab.tag}", f"dpwln{lab.tag}"[:15], f"dpwlp{lab.tag}"[:15]
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", vn, "type", "veth", "peer", "name", vp)
        sh("ip", "link", "set", vp, "netns", ns)
        sh("ip", "link", "set", vn, "netns", lab.node)
        sh("ip", "addr", "add", "198.18.77.1/24", "dev", vn, ns=lab.node)
        sh("ip", "link", "set", vn, "up", ns=lab.node)
        sh("ip", "addr", "add", "198.18.77.2/24", "dev", vp, ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "set", vp, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", "198.18.77.1", ns=ns)
        time.sleep(0.2)
        if probe.mode.name == "tc":
            probe.background()
        before = counters(d)
        seen = queries(ns, lab.pod_list[0].node_ip4, [("ok.test", "A")] * 3)
        time.sleep(0.2)
        after = counters(d)
        assert probe.mode.name == "socket" or vn in probe.info()["interfaces"]
        assert seen == {"NOERROR": 3}
        assert diff(before, after, "queries") == {"A": 3}
        assert diff(before, after, "responses") == {"NOERROR": 3}
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_counts_equal_what_clients_saw_ipv4(env):
    """dnsmasq: 20 A ok.test (NOERROR), 7 AAAA nx.test (NXDOMAIN), 5 TXT other.test (REFUSED)."""
    lab, d, probe, _ = env
    p0 = lab.pod_list[0]
    before = counters(d)
    plan = [("ok.test", "A")] * 20 + [("nx.test", "AAAA")] * 7 + [("other.test", "TXT")] * 5
    seen = queries(p0.ns, p0.node_ip4, plan)
    time.sleep(0.2)
    after = counters(d)
    assert seen == {"NOERROR": 20, "NXDOMAIN": 7, "REFUSED": 5}
    assert diff(before, after, "queries") == {"A": 20, "AAAA": 7, "TXT": 5}
    assert diff(before, after, "responses") == {"NOERROR": 20, "NXDOMAIN": 7, "REFUSED": 5}
    st = diff(before, after, "stats")
    assert st.get("unmatched", 0) == 0 and st.get("malformed", 0) == 0
    assert st["queries"] == 32 and st["responses"] == 32
    # per server: dnsmasq's address has its own label
    assert diff(before, after, "server_queries") == {p0.node_ip4: 32}
    assert diff(before, after, "server_responses") == {(p0.node_ip4, "NOERROR"): 20,
                                                       (p0.node_ip4, "NXDOMAIN"): 7,
                                                       (p0.node_ip4, "REFUSED"): 5}
    # every response is in exactly one histogram bucket of its rcode
    hist = diff(before, after, "hist")
    assert sum(n for (rc, _b), n in hist.items() if rc == "NOERROR") == 20


def test_ipv6(env):
    lab, d, probe, _ = env
    p0 = lab.pod_list[0]
    before = counters(d)
    seen = queries(p0.ns, p0.node_ip6, [("ok.test", "A")] * 6 + [("nx.test", "AAAA")] * 4)
    time.sleep(0.2)
    after = counters(d)
    assert seen == {"NOERROR": 6, "NXDOMAIN": 4}
    assert diff(before, after, "queries") == {"A": 6, "AAAA": 4}
    assert diff(before, after, "responses") == {"NOERROR": 6, "NXDOMAIN": 4}
    assert diff(before, after, "server_queries") == {str(ipaddress.ip_address(p0.node_ip6)): 10}


def test_forwarded_query_counted_once(env):
    """pod0 -> node (veth0 in, veth1 out) -> pod1's server and back: each packet crosses two
    interfaces of the node netns, both directions; each query and response counts once."""
    lab, d, probe, _ = env
    p0, p1 = lab.pod_list
    with ScriptedServer(p1.ns, p1.ip4) as srv4, ScriptedServer(p1.ns, p1.ip6) as srv6:
        before = counters(d)
        seen4 = queries(p0.ns, p1.ip4, [("a.fwd.test", "A")] * 10 + [("servfail.fwd.test", "A")] * 3)
        seen6 = queries(p0.ns, p1.ip6, [("b.fwd.test", "AAAA")] * 5)
        time.sleep(0.2)
        after = counters(d)
    assert seen4 == {"NOERROR": 10, "SERVFAIL": 3} and seen6 == {"NOERROR": 5}
    assert srv4.answered == {"NOERROR": 10, "SERVFAIL": 3}
    assert diff(before, after, "queries") == {"A": 13, "AAAA": 5}
    assert diff(before, after, "responses") == {"NOERROR": 15, "SERVFAIL": 3}
    st = diff(before, after, "stats")
    assert st.get("unmatched", 0) == 0
    assert st["duplicate_queries"] == 18 and st["duplicate_responses"] == 18
    assert st["packets"] == 4 * 18


def test_loopback_seen_twice_counted_once(env):
    lab, d, probe, _ = env
    with ScriptedServer(lab.node, "127.0.0.1") as srv:
        before = counters(d)
        seen = queries(lab.node, "127.0.0.1", [("lo.test", "A")] * 8)
        time.sleep(0.2)
        after = counters(d)
    assert seen == {"NOERROR": 8} and srv.answered == {"NOERROR": 8}
    assert diff(before, after, "queries") == {"A": 8}
    assert diff(before, after, "responses") == {"NOERROR": 8}
    assert diff(before, after, "stats").get("unmatched", 0) == 0


def test_delay_300ms_lands_in_its_bucket(env):
    lab, d, probe, _ = env
    p0, p1 = lab.pod_list
    b = dn.bucket_of(0.300)
    assert dn.BUCKET_BOUNDS[b - 1] < 0.300 <= dn.BUCKET_BOUNDS[b]  # (0.256, 0.512]
    with ScriptedServer(p1.ns, p1.ip4) as srv:
        before = counters(d)
        seen = queries(p0.ns, p1.ip4, [(f"delay300.q{i}.test", "A") for i in range(4)])
        time.sleep(0.2)
        after = counters(d)
    assert seen == {"NOERROR": 4}
    assert diff(before, after, "hist") == {("NOERROR", b): 4}
    lat = after["latency_sum"]["NOERROR"] - before["latency_sum"].get("NOERROR", 0)
    assert 4 * 0.300 <= lat < 4 * dn.BUCKET_BOUNDS[b]


def test_timeouts_counted_by_the_sweep(env):
    lab, d, probe, _ = env
    p0, p1 = lab.pod_list
    probe.sweep()
    with ScriptedServer(p1.ns, p1.ip4) as srv:
        before = counters(d)
        seen = queries(p0.ns, p1.ip4, [(f"noreply.t{i}.test", "A") for i in range(3)], timeout=0.3)
        assert probe.sweep() == 0  # 0.9 s old at most: not yet past --dns-timeout 1s
        time.sleep(1.2)
        found = probe.sweep()
        again = probe.sweep()
        after = counters(d)
    assert seen == {"timeout": 3} and srv.ignored == 3
    assert found == 3 and again == 0
    assert diff(before, after, "timeouts") == {p1.ip4: 3}
    assert diff(before, after, "queries") == {"A": 3}
    assert diff(before, after, "responses") == {}


def test_unmatched_response(env):
    """A response nobody asked for (sent from port 53 of a node address to a pod)."""
    from dnslib import DNSRecord
    lab, d, probe, _ = env
    p0, p1 = lab.pod_list
    wire = DNSRecord.question("stray.test").reply().pack()
    before = counters(d)

    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((p1.node_ip4, 53))
        s.sendto(wire, (p1.ip4, 40000))
        s.close()
    in_netns(lab.node, go)
    time.sleep(0.2)
    after = counters(d)
    assert diff(before, after, "stats") == {"unmatched": 1, "packets": 1}
    assert diff(before, after, "responses") == {}


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_malformed_counted_never_queries(env, family):
    """To an address where nothing listens on 53 (so no server answers a FORMERR)."""
    lab, d, probe, _ = env
    p0, p1 = lab.pod_list
    payloads = malformed_payloads(40, seed=7)
    before = counters(d)
    sent = send_raw(p0.ns, p1.node_ip4 if family == "ipv4" else p1.node_ip6, payloads, gap=0.002)
    time.sleep(0.2)
    after = counters(d)
    assert sent == len(payloads) == 40
    st = diff(before, after, "stats")
    assert st.get("malformed") == 40, st
    assert st.get("queries", 0) == 0 and st.get("responses", 0) == 0
    assert diff(before, after, "queries") == {}


def test_search_path_amplification(env):
    """A pod resolving `api.example` with ndots:5 and the cluster search list walks three
    suffixes (NXDOMAIN each) before the name itself answers."""
    lab, d, probe, _ = env
    p0 = lab.pod_list[0]
    probe.background()  # the names baseline
    old = d.manager.collect()["dns"]
    t0 = time.monotonic()
    tried = []
    for _ in range(5):
        answer, tried = resolve_with_search(p0.ns, p0.node_ip4, "api.example", SEARCH, ndots=5)
        assert answer == "api.example."
    assert tried[:3] == [f"api.example.{s}." for s in SEARCH]
    time.sleep(0.2)
    new = d.manager.collect()["dns"]
    win = Window(time.monotonic() - t0, old, new)
    assert win.delta("responses") == {"NXDOMAIN": 15, "NOERROR": 5}
    found = {f.id: f for f in probe.diagnose(win)}
    f = found["dns.search_path_amplification"]
    names = f.evidence["names"]
    assert names[0]["name"] == "api.example" and names[0]["nxdomain"] == 15
    assert names[0]["suffixes"] == {s: 5 for s in SEARCH}
    assert any("ndots" in r for r in f.remediation) and any("api.example." in r for r in f.remediation)
    assert "dns.nxdomain_rate" in found  # 15 of 20 answers


@pytest.mark.skipif(not Unbound.available, reason="unbound is not installed (deploy/setup.sh --test installs it)")
def test_unbound_counts(env):
    lab, d, probe, _ = env
    p0, p1 = lab.pod_list
    with Unbound(lab.node, p1.node_ip4):
        before = counters(d)
        seen = queries(p0.ns, p1.node_ip4, [("ok.test", "A")] * 4 + [("missing.test", "A")] * 3)
        time.sleep(0.2)
        after = counters(d)
    assert seen == {"NOERROR": 4, "NXDOMAIN": 3}
    assert diff(before, after, "responses") == {"NOERROR": 4, "NXDOMAIN": 3}
    assert diff(before, after, "queries") == {"A": 7}
