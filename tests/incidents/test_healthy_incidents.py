"""Healthy nodes under ordinary load: whatever the traffic, nothing above info. A finding
here is a rule that calls normal work a problem (the incidents' false alarms)."""

from __future__ import annotations

import collections
import shutil
import subprocess
import time


from dnslab import K8S_SEARCH, Dnsmasq, concurrent_queries, resolve_with_search, route_pods
from faults import TcpEcho, UdpEcho, conntrack_on, tcp_ping_pong, udp_flows
from harness import Incident
from netlab import sh
from test_conntrack_kernel import Holder, open_connections  # the kernel tier's helpers


def background(inc, ns: str, *cmd: str) -> subprocess.Popen:
    """A long-running program in netns ``ns`` (its own pid kept), killed at close."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    inc.on_close(stop)
    return proc


def wait_listening(ns: str, port: int, proto: str = "t") -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in sh("ss", f"-Hln{proto}", ns=ns, check=False).stdout:
        assert time.monotonic() < deadline, f"nothing listens on {port} in {ns}"
        time.sleep(0.05)


def test_healthy_tcp_request_response():
    """Request/response between two pods through the node (routed): 3000 round trips on one
    TCP connection, 300 short connections (connect, one request, close: HTTP/1.0 style), and
    2000 UDP ping-pongs."""
    with Incident("healthy_tcp_request_response", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        tcp = TcpEcho(p1.ns, p1.ip4)
        inc.on_close(tcp.close)
        udp = UdpEcho(p1.ns, p1.ip4)
        inc.on_close(udp.close)
        inc.start()
        assert tcp_ping_pong(p0.ns, p1.ip4, tcp.port, 3000) == 3000
        assert tcp_ping_pong(p0.ns, p1.ip4, tcp.port, 300, connections=300) == 300
        socks, answered = udp_flows(p0.ns, p1.ip4, udp.port, count=50)
        inc.on_close(lambda: [s.close() for s in socks])
        for _ in range(40):
            _, answered = udp_flows(p0.ns, p1.ip4, udp.port, socks=socks)
            assert answered == 50
        inc.expect_healthy()


def test_healthy_dns_load():
    """A few hundred fast lookups to dnsmasq on the node from two pods at once: A and AAAA of
    existing names, a few NXDOMAINs (a name that went away), and cluster names resolved the
    Kubernetes way (kubernetes.default with the search list: one NXDOMAIN under
    default.svc.cluster.local, then the answer): 11% NXDOMAIN, under the 20% threshold."""
    with Incident("healthy_dns_load", pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        server = Dnsmasq(inc.lab.node, [p0.node_ip4],
                         extra=("--address=/kubernetes.default.svc.cluster.local/10.96.0.1",))
        inc.on_close(server.close)
        inc.start()
        names = [("ok.test", "A"), ("ok.test", "AAAA"), ("api.example", "A")] * 95 + [("old.nx.test", "A")] * 15
        seen: collections.Counter = collections.Counter()
        for part in range(3):           # three rounds a second apart: a load, not one burst
            chunk = names[part::3]
            seen += concurrent_queries([(p0.ns, p0.node_ip4, chunk[::2]), (p1.ns, p0.node_ip4, chunk[1::2])],
                                       workers=2)
            time.sleep(1)
        assert seen == {"NOERROR": 285, "NXDOMAIN": 15}
        for _ in range(20):
            answer, _ = resolve_with_search(p0.ns, p0.node_ip4, "kubernetes.default", K8S_SEARCH, ndots=5)
            assert answer == "kubernetes.default.svc.cluster.local."
        inc.expect_healthy()


def _iperf3_between_pods(name: str, tcp_rate: list[str], settle: float, udp: bool) -> None:
    """Two pods routed through the node, an iperf3 server in the second; the daemon started;
    a 5 s TCP transfer at ``tcp_rate`` (then 1 kB UDP at 20 Mbit/s for 3 s with ``udp``);
    nothing above info after it. iperf3 comes from deploy/setup.sh --test."""
    assert shutil.which("iperf3"), "iperf3 missing: run deploy/setup.sh --test"
    with Incident(name, pods=2) as inc:
        route_pods(inc.lab)
        p0, p1 = inc.lab.pod_list
        background(inc, p1.ns, "iperf3", "-s", "-B", p1.ip4, "-p", "5201")
        wait_listening(p1.ns, 5201)
        inc.start()
        tcp = sh("iperf3", "-c", p1.ip4, "-p", "5201", "-t", "5", *tcp_rate, "-J", ns=p0.ns).stdout
        assert '"sum_received"' in tcp
        if udp:
            out = sh("iperf3", "-c", p1.ip4, "-p", "5201", "-u", "-b", "20M", "-l", "1000", "-t", "3", "-J",
                     ns=p0.ns).stdout
            assert '"lost_packets"' in out
        inc.expect_healthy(settle=settle)


def test_healthy_bulk_transfer():
    """A bulk transfer between two pods through the node: iperf3 TCP for 5 s at 2 Gbit/s,
    then 1 kB UDP datagrams at 20 Mbit/s for 3 s (unlimited: the next test)."""
    _iperf3_between_pods("healthy_bulk_transfer", ["-b", "2G"], settle=3.0, udp=True)


def test_healthy_bulk_transfer_unlimited():
    """The same transfer at full speed (about 12 Gbit/s here, one flow): its softirq work sits
    on one CPU, which keeps up (no backlog drops, no squeezes), so softirq.imbalance is a note
    (info), not a warning: one flow cannot be spread."""
    _iperf3_between_pods("healthy_bulk_transfer_unlimited", [], settle=0.5, udp=False)


def test_healthy_conntrack_in_use():
    """Conntrack on in the node netns (an nftables ct state ruleset) and in moderate use: 200
    TCP connections from a pod held open, 300 more opened and closed, 200 DNS lookups over UDP
    (a flow each): several hundred entries, far under nf_conntrack_max."""
    with Incident("healthy_conntrack_in_use") as inc:
        pod = inc.lab.pod
        conntrack_on(inc)
        holder = Holder(inc.lab.node, pod.node_ip4)
        inc.on_close(holder.close)
        server = Dnsmasq(inc.lab.node, [pod.node_ip4])
        inc.on_close(server.close)
        inc.start()
        held = []
        for _ in range(4):
            conns, pending = open_connections(pod.ns, pod.node_ip4, holder.port, 50)
            assert pending == 0
            held += conns
        inc.on_close(lambda: [c.close() for c in held])
        for _ in range(3):
            conns, pending = open_connections(pod.ns, pod.node_ip4, holder.port, 100)
            assert pending == 0
            for c in conns:
                c.close()
        assert concurrent_queries([(pod.ns, pod.node_ip4, [("ok.test", "A")] * 200)]) == {"NOERROR": 200}
        entries = int(sh("conntrack", "-C", ns=inc.lab.node).stdout.strip())
        assert 500 <= entries < 2000, entries
        inc.expect_healthy()
