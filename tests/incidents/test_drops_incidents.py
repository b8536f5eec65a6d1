"""Drop incidents: the kernel drops what the node's pods send, for a reason the drops probe
reads from skb:kfree_skb (or the softnet counters): a policy rule, a full socket buffer, no
socket at all, a full per-CPU backlog.

The drops and softirq probes count host-wide (every netns): a test on the same machine at the
same time can add drops of its own; CI runs the incidents one by one.
"""

from __future__ import annotations

import pytest

import os
import socket

from dnslab import Dnsmasq, queries
from faults import UdpSink, conntrack_on, nft_drop, stuck_listener, sysctl_global, tcp_attempts
from harness import Incident
from netlab import closed_udp_port, drain, in_netns, sh, udp_send
from test_softirq_kernel import Fanout


def _policy_drop(inc) -> int:
    """An nft rule dropping TCP to port 8080 in the node netns (what a NetworkPolicy deny
    compiles to), and a pod that keeps trying: 5 rounds of 10 connects, each one SYN (closed
    before the first retransmit). Returns the SYNs sent."""
    nft_drop(inc, "tcp dport 8080 drop")
    inc.start()
    inc.fault()
    pod = inc.lab.pod
    connected = sum(tcp_attempts(pod.ns, pod.node_ip4, 8080, 10) for _ in range(5))
    assert connected == 0
    return 50


def _check_policy_drop(rep: dict, syns: int) -> None:
    top = rep["findings"][0]
    ev = top["evidence"]
    assert top["severity"] == "warning"  # well under --drops-rate-critical (1000/s)
    assert ev["drops"] == syns and ev["by_protocol"] == {"ipv4": syns}
    assert ev["top_locations"][0]["location"].startswith("nft_do_chain")
    assert "explained_by_conntrack" not in ev


def test_netfilter_policy_drop():
    """A NetworkPolicy deny: drops.netfilter, every SYN one NETFILTER_DROP."""
    with Incident("netfilter_policy_drop") as inc:
        syns = _policy_drop(inc)
        rep = inc.expect_top("drops.netfilter")
    _check_policy_drop(rep, syns)


def test_netfilter_policy_drop_conntrack_on():
    """The same deny on a node that also tracks connections (kube-proxy's rules use ct state)
    and whose table is far from full: still a policy drop. The conntrack probe must not claim
    these drops: its drop counter did not move."""
    with Incident("netfilter_policy_drop_conntrack_on") as inc:
        conntrack_on(inc)
        syns = _policy_drop(inc)
        rep = inc.expect_top("drops.netfilter")
    _check_policy_drop(rep, syns)
    assert not [f for f in rep["findings"] if f["id"].startswith("conntrack.")]


def _rcvbuf_overflow(name: str, ipv6: bool = False) -> tuple[dict, int]:
    """A UDP receiver in the node netns with SO_RCVBUF 1024 that never reads (a stuck metrics
    agent); a pod sends it 3000 datagrams of 512 bytes. Returns (the report, drops expected:
    every datagram that was not queued)."""
    with Incident(name) as inc:
        pod = inc.lab.pod
        addr = pod.node_ip6 if ipv6 else pod.node_ip4
        sink = UdpSink(inc.lab.node, addr, rcvbuf=1024)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        sent = udp_send(pod.ns, addr, sink.port, 3000, payload=b"y" * 512,
                        family=socket.AF_INET6 if ipv6 else socket.AF_INET)
        assert sent == 3000
        rep = inc.expect_top("drops.socket_receive_buffer",
                             check=lambda f: "node.socket_buffers_small" in f["evidence"].get("related", {}))
        return rep, sent - drain(sink.sock)


def _check_rcvbuf(rep: dict, lost: int, proto: str) -> None:
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["drops"] == lost and ev["by_protocol"] == {proto: lost}
    assert lost >= 2900
    assert top["severity"] == ("critical" if ev["drops_per_second"] >= 1000 else "warning")
    assert "udp" in ev["top_locations"][0]["location"]
    # Udp(6) RcvbufErrors, the node audit's count, is the same event.
    assert ev["related"]["node.socket_buffers_small"]["buffer_errors_in_window"] == lost
    assert top["remediation"][0].startswith("sysctl -w net.core.rmem_max=")


def test_socket_rcvbuf_overflow():
    """Every datagram that did not fit is one SOCKET_RCVBUFF drop; the node audit's
    buffer-error check folds in."""
    rep, lost = _rcvbuf_overflow("socket_rcvbuf_overflow")
    _check_rcvbuf(rep, lost, "ipv4")


def test_socket_rcvbuf_overflow_ipv6():
    """The same over IPv6 (a dual-stack pod): the drops say ipv6, and Udp6 RcvbufErrors agree."""
    rep, lost = _rcvbuf_overflow("socket_rcvbuf_overflow_ipv6", ipv6=True)
    _check_rcvbuf(rep, lost, "ipv6")


def test_service_down_refused():
    """A pod hammers a TCP port and a UDP port on the node where nothing listens (the server
    is down, clients retry): 1000 connects refused with a RST, 2000 datagrams answered with
    ICMP port unreachable, all NO_SOCKET drops.

    The right answer is drops.top_reasons, a warning: the kernel answered every packet, so the
    clients learnt at once ("connection refused"); nothing a receiver wanted was lost, and the
    datapath is fine. So however fast, refused packets alone are never critical, and the
    summary says what NO_SOCKET means and the fix starts with the listeners."""
    with Incident("service_down_refused") as inc:
        pod = inc.lab.pod
        port = closed_udp_port(inc.lab.node)  # no TCP listener on it either
        inc.start()
        inc.fault()
        sent = udp_send(pod.ns, pod.node_ip4, port, 2000)

        def connects() -> int:
            refused = 0
            for _ in range(1000):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.connect((pod.node_ip4, port))
                except ConnectionRefusedError:
                    refused += 1
                finally:
                    s.close()
            return refused
        refused = in_netns(pod.ns, connects)
        assert (sent, refused) == (2000, 1000)
        rep = inc.expect_top("drops.top_reasons")
    top = rep["findings"][0]
    ev = top["evidence"]
    first = ev["top_reasons"][0]
    assert first["reason"] == "NO_SOCKET" and first["drops"] >= sent + refused
    assert ev["drops"] >= first["drops"] and ev["drops_per_second"] >= ev["threshold_per_second"]
    assert top["severity"] == "warning"
    assert f"Top reason: NO_SOCKET ({first['drops']}): " in top["summary"]
    assert "connection refused" in top["summary"]
    assert top["remediation"][0].startswith("ss -ltnup")
    locations = {row["location"].split("+")[0] for row in ev["top_locations"][:2]}
    assert locations == {"__udp4_lib_rcv", "tcp_v4_rcv"}


def test_softnet_backlog_drops():
    """A broadcast storm on a bridge of 8 pod ports (frames of a protocol nobody runs) while
    net.core.netdev_max_backlog is 1 (global: the init netns only, restored at close): each
    frame the bridge floods queues one copy per port on the sending CPU's backlog, which holds
    2, so 6 of every 8 are dropped (tests/kernel/test_softirq_kernel.py). softnet.backlog_drops
    is the answer; the copies that got through are dropped later as UNHANDLED_PROTO, the
    storm's own frames: drops.top_reasons may stand next to it, as a warning at most."""
    with Incident("softnet_backlog_drops") as inc:
        fan = Fanout(ports=8)
        inc.on_close(fan.close)
        inc.start()
        sysctl_global(inc, "net.core.netdev_max_backlog", 1)
        inc.fault()
        cpu = sorted(os.sched_getaffinity(0))[-1]
        fan.flood(1000, cpu)
        rep = inc.expect_top("softnet.backlog_drops", allowed={"drops.top_reasons"})
    top = rep["findings"][0]
    ev = top["evidence"]
    expected = 1000 * (8 - 1 - 1)
    # Other frames queued on that CPU meanwhile may be dropped too (the limit is node-wide).
    assert expected <= ev["per_cpu_drops"][str(cpu)] <= expected + 30
    assert expected <= ev["drops"] <= expected + 60
    assert top["severity"] == "critical"  # far more than 1% of the packets processed
    assert top["remediation"][0].startswith("sysctl -w net.core.netdev_max_backlog=")
    # The daemon's netns is not the host's here: the global sysctl is not readable from it.
    assert ev["net.core.netdev_max_backlog"] in (None, 1)
    others = [f for f in rep["findings"][1:] if f["id"] == "drops.top_reasons"]
    assert all(f["severity"] != "critical" for f in others)


def test_rcvbuf_plus_nxdomain():
    """Two faults at once, two causes: a UDP receiver on the node overflows its 1 KiB buffer
    (3000 datagrams) while a pod's lookups of a name that does not exist get NXDOMAIN (200
    queries to the node's dnsmasq).

    drops.socket_receive_buffer ranks first. Both findings are real, and both are at least
    warnings; the score is severity + log10(1 + impact), and in the same window the buffer
    lost 2999 datagrams against 200 NXDOMAIN answers: fifteen times the events per second, and
    data lost, where every NXDOMAIN was an answer (wasted lookups, not failures). When the
    drops are fast enough to be critical the gap is only wider. dns.nxdomain_rate stays in the
    report, second."""
    with Incident("rcvbuf_plus_nxdomain") as inc:
        pod = inc.lab.pod
        sink = UdpSink(inc.lab.node, pod.node_ip4, rcvbuf=1024)
        inc.on_close(sink.close)
        server = Dnsmasq(inc.lab.node, [pod.node_ip4])
        inc.on_close(server.close)
        inc.start()
        inc.fault()
        sent = udp_send(pod.ns, pod.node_ip4, sink.port, 3000, payload=b"y" * 512)
        seen = queries(pod.ns, pod.node_ip4, [(f"q{i}.nx.test", "A") for i in range(200)])
        assert sent == 3000 and seen == {"NXDOMAIN": 200}
        rep = inc.expect_top("drops.socket_receive_buffer", allowed={"dns.nxdomain_rate"},
                             check=lambda f: f["evidence"]["drops"] >= 2900)
        queued = drain(sink.sock)
    found = {f["id"]: f for f in rep["findings"]}
    top, nx = rep["findings"][0], found["dns.nxdomain_rate"]
    assert top["evidence"]["drops"] == sent - queued
    assert nx["severity"] == "warning" and nx["evidence"]["nxdomain"] == 200
    assert [f["id"] for f in rep["findings"]].index("dns.nxdomain_rate") == 1
    assert top["score"] > nx["score"] and top["impact"] > 10 * nx["impact"]


def _listen_overflow(name: str, backlog: int, somaxconn: int | None = None) -> tuple[dict, int, int]:
    """A server in the node netns that called listen(``backlog``) and never accepts (hung),
    and a pod's 200 connection attempts, each one SYN. Returns (the report, the listener's
    address:port, connected)."""
    with Incident(name) as inc:
        pod = inc.lab.pod
        if somaxconn is not None:  # per netns: gone with the node netns
            sh("sysctl", "-qw", f"net.core.somaxconn={somaxconn}", ns=inc.lab.node)
        port = stuck_listener(inc, pod.node_ip4, backlog=backlog)
        inc.start()
        inc.fault()
        connected = tcp_attempts(pod.ns, pod.node_ip4, port, 200)
        rep = inc.expect_top("node.listen_queue_overflow", allowed={"drops.listen_overflow"})
        return rep, f"{pod.node_ip4}:{port}", connected


def _check_listen(rep: dict, addr: str, backlog: int, connected: int) -> dict:
    top = rep["findings"][0]
    ev = top["evidence"]
    assert top["severity"] == "critical"  # refused far more often than accepted: down for new clients
    assert ev["listen_overflows_in_window"] == 200 - connected
    (listener,) = ev["listeners"]
    assert listener["listener"] == addr
    assert (listener["effective_backlog"], listener["queue_now"], listener["full_now"]) == (backlog, connected, True)
    assert listener["socket_drops_in_window"] == 200 - connected
    return listener


def test_listen_overflow():
    """listen(1): the accept queue holds 2 (the kernel's full is queue > backlog), the other
    198 SYNs are refused. A refused SYN is freed without a drop reason (consume_skb), so the
    answer comes from the node probe's counters and sock_diag: node.listen_queue_overflow
    names the listener, and says somaxconn does not cap it."""
    rep, addr, connected = _listen_overflow("listen_overflow", backlog=1)
    assert connected == 2
    listener = _check_listen(rep, addr, 1, connected)
    assert listener["capped_by_somaxconn"] is False
    assert "no sysctl helps" in rep["findings"][0]["remediation"][0]


def test_listen_overflow_somaxconn():
    """The other story with the same symptom: the server asks for listen(1024), but the node
    netns' net.core.somaxconn is 4, so its backlog is 4 (5 connections queue, 195 refused).
    Here the sysctl is the fix, and the finding says so."""
    rep, addr, connected = _listen_overflow("listen_overflow_somaxconn", backlog=1024, somaxconn=4)
    assert connected == 5
    top = rep["findings"][0]
    listener = _check_listen(rep, addr, 4, connected)
    assert listener["capped_by_somaxconn"] is True
    assert top["evidence"]["net.core.somaxconn"] == 4
    assert any("sysctl -w net.core.somaxconn=" in step for step in top["remediation"])
