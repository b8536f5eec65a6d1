"""Node-setting incidents: limits the field hits again and again, reproduced after the daemon
started (the node audit runs every 60 s by default, and again within a sampler pass or two
when its cheap inputs move: the nf_tables generation, iptables-legacy sizes, TCP sockets)."""

from __future__ import annotations

import json
import socket

from harness import Incident
from netlab import http_get, in_netns, sh
from test_conntrack_kernel import Holder, open_connections


def test_netfilter_rules_pile_up():
    """A service mesh or kube-proxy in iptables mode leaves 12,000 rules behind: every new
    connection walks them ("CPU burned in iptables")."""
    with Incident("netfilter_rules_pile_up") as inc:
        inc.start()
        rules = "\n".join(f"  ip daddr 203.0.{i // 250}.{i % 250 + 1} tcp dport {1000 + i % 5000} accept"
                          for i in range(12000))
        inc.fault()
        sh("nft", "-f", "-", ns=inc.lab.node,
           input=f"table ip meshy {{\n chain svc {{\n  type filter hook prerouting priority 0;\n{rules}\n }}\n}}\n")
        rep = inc.expect_top("netfilter.rule_count_high")
        # The daemon's own notrack table (its listen port kept out of conntrack) counts too.
        ours = len(rep_probes_notrack(inc)["rules"])
    assert ours == 3
    top = rep["findings"][0]
    assert top["evidence"]["nft_rules"] == 12000 + ours == top["evidence"]["total_rules"]


def rep_probes_notrack(inc: Incident) -> dict:
    status, _, body = http_get(inc.lab.node, "127.0.0.1", 9400, "/probes")
    assert status == 200, body
    return json.loads(body)["notrack"]


def test_ephemeral_ports_run_out():
    """A client on the node holds 150 connections to one backend through a 200-port
    ephemeral range: 75% used, the next ones fail with EADDRNOTAVAIL."""
    with Incident("ephemeral_ports_run_out") as inc:
        pod = inc.lab.pod
        sh("sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40199", ns=inc.lab.node)
        holder = Holder(pod.ns, pod.ip4)
        inc.on_close(holder.close)
        inc.start()
        inc.fault()
        conns, pending = open_connections(inc.lab.node, pod.ip4, holder.port, 150)
        inc.on_close(lambda: [c.close() for c in conns])
        assert (len(conns), pending) == (150, 0)
        rep = inc.expect_top("node.port_range_small")
    top = rep["findings"][0]
    assert top["severity"] == "warning"
    assert top["evidence"]["range_size"] == 200 and top["evidence"]["busiest_destination_sockets"] == 150
    assert top["evidence"]["busiest_destination"].startswith(pod.ip4)


def test_time_wait_holds_the_ports():
    """A job opens and closes 300 short connections per burst with tcp_tw_reuse off: 300
    TIME_WAIT sockets hold 30% of a 1000-port range for a minute."""
    with Incident("time_wait_holds_the_ports") as inc:
        pod = inc.lab.pod
        sh("sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40999", "net.ipv4.tcp_tw_reuse=0",
           ns=inc.lab.node)
        srv = in_netns(pod.ns, lambda: socket.create_server((pod.ip4, 0), backlog=512))
        inc.on_close(srv.close)
        inc.start()
        inc.fault()

        def churn():
            for _ in range(300):
                c = socket.create_connection((pod.ip4, srv.getsockname()[1]), timeout=5)
                s, _ = srv.accept()
                c.close()   # the node closes first: its side goes to TIME_WAIT once the pod
                s.recv(1)   # reads the FIN and closes too
                s.close()
        in_netns(inc.lab.node, churn)
        rep = inc.expect_top("node.tcp_tw_reuse_off")
    top = rep["findings"][0]
    assert top["severity"] == "warning"
    assert top["evidence"]["time_wait"] >= 300 and top["evidence"]["range_size"] == 1000
