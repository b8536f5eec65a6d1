"""DNS incidents: the node's pods query a DNS server on the node (CoreDNS's place), and the
server is slow, silent or wrong. The daemon runs with its default flags (5 s DNS timeout)."""

from __future__ import annotations

import time

from dnslab import ScriptedServer, queries
from harness import Incident


def test_dns_slow_few_answers():
    """Every answer of a pod after 800 ms, only 8 in the window: slow DNS all the same."""
    with Incident("dns_slow_8_answers") as inc:
        pod = inc.lab.pod
        server = ScriptedServer(inc.lab.node, pod.node_ip4)
        inc.on_close(server.close)
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
        server = ScriptedServer(inc.lab.node, pod.node_ip4)
        inc.on_close(server.close)
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [(f"noreply.q{i}.test", "A") for i in range(12)], timeout=0.2)
        assert seen == {"timeout": 12} and server.ignored == 12
        rep = inc.expect_top("dns.timeouts", timeout=15)
    top = rep["findings"][0]
    assert top["evidence"]["timeouts"] == 12 and top["severity"] == "critical"


def test_dns_servfail_storm():
    """Every answer SERVFAIL (the server's upstream is gone)."""
    with Incident("dns_servfail_storm") as inc:
        pod = inc.lab.pod
        server = ScriptedServer(inc.lab.node, pod.node_ip4)
        inc.on_close(server.close)
        inc.start()
        inc.fault()
        seen = queries(pod.ns, pod.node_ip4, [(f"servfail.q{i}.test", "A") for i in range(40)]
                       + [(f"ok{i}.test", "A") for i in range(40)])
        assert seen == {"SERVFAIL": 40, "NOERROR": 40}
        rep = inc.expect_top("dns.errors")
    top = rep["findings"][0]
    assert top["evidence"]["servfail"] == 40 and top["evidence"]["errors"] == 40
    assert top["severity"] == "critical"  # 50% errors, 10x the 1% threshold is 10%
