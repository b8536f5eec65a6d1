"""Kernel tier: --bpf-stats reads real per-program run counts and run time from the kernel."""

from __future__ import annotations

import socket
import time

from dpwatch.daemon.config import Config
from dpwatch.daemon.service import Daemon
from netlab import closed_udp_port, udp_send


def test_program_stats_count_every_run(lab):
    d = Daemon(Config(probes=["drops"], bpf_stats=True).validate())
    d.load()
    try:
        assert d.stats is not None and d.stats.fd is not None, d.stats and d.stats.error
        port = closed_udp_port(lab.node, socket.AF_INET6)
        (probe, prog, ns0, runs0), = d.manager.program_stats()
        assert (probe, prog) == ("drops", "tracepoint__skb__kfree_skb")
        udp_send(lab.pod.ns, lab.pod.node_ip6, port, 500, family=socket.AF_INET6)
        time.sleep(0.2)
        (_, _, ns1, runs1), = d.manager.program_stats()
        # Every dropped datagram ran the program once; other drops on the host may add a few.
        assert 500 <= runs1 - runs0 <= 540
        assert ns1 > ns0
    finally:
        d.stop()
