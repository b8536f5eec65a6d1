"""Drop incidents: the kernel drops what the node's pods send, for a reason the drops probe
reads from skb:kfree_skb (or the softnet counters): a policy rule, a full socket buffer, no
socket at all, a full per-CPU backlog.

The drops and softirq probes count host-wide (every netns): a test on the same machine at the
same time can add drops of its own; CI runs the incidents one by one.
"""

from __future__ import annotations

import os
import socket

from dnslab import Dnsmasq, queries
from faults import UdpSink, conntrack_on, nft_drop, stuck_listener, sysctl_global, tcp_attempts
from harness import Incident
from netlab import closed_udp_port, drain, in_netns, udp_send
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


def test_socket_rcvbuf_overflow():
    """A UDP receiver in the node netns with SO_RCVBUF 1024 that never reads (a stuck metrics
    agent); a pod sends it 3000 datagrams of 512 bytes. Every one that did not fit is one
    SOCKET_RCVBUFF drop; the node audit's buffer-error check folds in."""
    with Incident("socket_rcvbuf_overflow") as inc:
        pod = inc.lab.pod
        sink = UdpSink(inc.lab.node, pod.node_ip4, rcvbuf=1024)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        sent = udp_send(pod.ns, pod.node_ip4, sink.port, 3000, payload=b"y" * 512)
        assert sent == 3000
        rep = inc.expect_top("drops.socket_receive_buffer",
                             check=lambda f: "node.socket_buffers_small" in f["evidence"].get("related", {}))
        queued = drain(sink.sock)
    top = rep["findings"][0]
    ev = top["evidence"]
    assert ev["drops"] == sent - queued and ev["by_protocol"] == {"ipv4": sent - queued}
    assert ev["drops"] >= 2900
    assert top["severity"] == ("critical" if ev["drops_per_second"] >= 1000 else "warning")
    assert "udp" in ev["top_locations"][0]["location"]
    assert ev["related"]["node.socket_buffers_small"]["buffer_errors_in_window"] == ev["drops"]
    assert top["remediation"][0].startswith("sysctl -w net.core.rmem_max=")


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


def test_listen_overflow():
    """A server in the node netns that called listen(1) and never accepts (hung), and a pod's
    200 connection attempts, each one SYN: the accept queue holds 2 (the kernel's full is
    queue > backlog), the other 198 SYNs are refused. A refused SYN is freed without a drop
    reason (consume_skb), so the answer comes from the node probe's counters and sock_diag:
    node.listen_queue_overflow names the listener, and says somaxconn does not cap it."""
    with Incident("listen_overflow") as inc:
        pod = inc.lab.pod
        port = stuck_listener(inc, pod.node_ip4, backlog=1)
        inc.start()
        inc.fault()
        connected = tcp_attempts(pod.ns, pod.node_ip4, port, 200)
        assert connected == 2
        rep = inc.expect_top("node.listen_queue_overflow", allowed={"drops.listen_overflow"})
    top = rep["findings"][0]
    ev = top["evidence"]
    assert top["severity"] == "critical"  # refused far more often than accepted: down for new clients
    assert ev["listen_overflows_in_window"] == 200 - connected
    (listener,) = ev["listeners"]
    assert listener["listener"] == f"{pod.node_ip4}:{port}"
    assert (listener["effective_backlog"], listener["queue_now"], listener["full_now"]) == (1, 2, True)
    assert listener["socket_drops_in_window"] == 200 - connected
    assert listener["capped_by_somaxconn"] is False
    assert "no sysctl helps" in top["remediation"][0]
