"""Kernel tier: the drops probe loaded for real through the probe manager, with traffic
driven through network namespaces this test creates."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest

from dpwatch.daemon.host import tracefs
from dpwatch.daemon.collector import make_registry
from dpwatch.daemon.config import Config
from dpwatch.daemon.service import Daemon
from netlab import closed_udp_port, drain, in_netns, read_snmp, socket_in, udp_send


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(Config(probes=["drops"]).validate())
    d.load()
    try:
        yield d
    finally:
        d.stop()


def drops(daemon) -> dict:
    return daemon.manager.collect()["drops"]["counters"]["drops"]


def delta(before: dict, after: dict, key) -> int:
    return after.get(key, 0) - before.get(key, 0)


def test_loaded_in_one_compile(daemon):
    st = daemon.manager.status["drops"]
    assert st.state.value == "attached", st.reason
    assert st.mode == "tracepoint"
    assert daemon.manager.compiles == 1
    assert st.hooks == ["tracepoint:skb:kfree_skb", "tracepoint_field:skb:kfree_skb:reason"]


def test_no_socket_ipv6_exact(daemon, lab):
    """IPv6 UDP to a closed port across a veth: exactly one NO_SOCKET drop per datagram
    (nothing else on this machine sends IPv6 to closed ports during the test)."""
    pod = lab.pod
    port = closed_udp_port(lab.node, socket.AF_INET6)
    before = drops(daemon)
    sent = udp_send(pod.ns, pod.node_ip6, port, 200, family=socket.AF_INET6)
    time.sleep(0.3)
    after = drops(daemon)
    assert sent == 200
    assert delta(before, after, ("NO_SOCKET", "ipv6")) == 200


def test_no_socket_ipv4_at_least_sent(daemon, lab):
    pod = lab.pod
    port = closed_udp_port(lab.node)
    before = drops(daemon)
    sent = udp_send(pod.ns, pod.node_ip4, port, 300)
    time.sleep(0.3)
    after = drops(daemon)
    d = delta(before, after, ("NO_SOCKET", "ipv4"))
    assert sent == 300
    # Other IPv4 NO_SOCKET drops on the host can only add to the count, and only a few.
    assert 300 <= d <= 320


def test_socket_rcvbuff_matches_kernel_counter(daemon, lab):
    """A receiver with a 1 KiB buffer that never reads: every datagram that did not fit is one
    SOCKET_RCVBUFF drop, and the kernel's own Udp RcvbufErrors counter agrees exactly."""
    pod = lab.pod
    rx = socket_in(lab.node, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        in_netns(lab.node, lambda: rx.bind((pod.node_ip4, 0)))
        port = rx.getsockname()[1]
        snmp_before = read_snmp(lab.node)["RcvbufErrors"]
        before = drops(daemon)
        sent = udp_send(pod.ns, pod.node_ip4, port, 3000, payload=b"y" * 512)
        time.sleep(0.3)
        after = drops(daemon)
        snmp_after = read_snmp(lab.node)["RcvbufErrors"]
        queued = drain(rx)
    finally:
        rx.close()
    got = delta(before, after, ("SOCKET_RCVBUFF", "ipv4"))
    assert sent == 3000
    assert got == snmp_after - snmp_before
    assert got == sent - queued
    assert got >= 2900


def test_location_resolves_to_udp_symbol(daemon, lab):
    pod = lab.pod
    rx = socket_in(lab.node, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        in_netns(lab.node, lambda: rx.bind((pod.node_ip4, 0)))
        udp_send(pod.ns, pod.node_ip4, rx.getsockname()[1], 500, payload=b"z" * 512)
    finally:
        rx.close()
    probe = daemon.manager.probes["drops"]
    reading = probe.collect()
    locs = [(addr, n) for (addr, reason), n in reading["counters"]["locations"].items()
            if reason == "SOCKET_RCVBUFF"]
    assert locs, "no SOCKET_RCVBUFF location recorded"
    top = max(locs, key=lambda kv: kv[1])[0]
    name = probe.kallsyms.resolve([top])[top]
    assert not name.startswith("0x"), name
    assert "udp" in name, name  # e.g. __udp_queue_rcv_skb+0x...


def test_reason_names_match_running_kernel(daemon):
    """The names the probe uses are exactly the tracepoint format's __print_symbolic list."""
    base = tracefs.find_tracefs()
    with open(f"{base}/events/skb/kfree_skb/format") as fh:
        text = fh.read()
    # An independent, simpler parse than the daemon's.
    expected = {int(v): n for v, n in re.findall(r'\{\s*(\d+)\s*,\s*"([A-Z0-9_]+)"\s*\}', text)}
    probe = daemon.manager.probes["drops"]
    assert expected, "format file has no symbolic reasons"
    assert probe.names == expected
    assert probe.name_source.startswith("tracefs")
    assert probe.max_reason == max(expected) + 1
    # And the metric labels use them.
    assert expected[min(k for k, v in expected.items() if v == "NO_SOCKET")] == "NO_SOCKET"
    labels = {r for (r, _p) in drops(daemon)}
    assert labels <= set(expected.values()) | {"NOT_DROPPED_YET", "CONSUMED"}


def test_metrics_pass_promtool(daemon, lab):
    udp_send(lab.pod.ns, lab.pod.node_ip4, closed_udp_port(lab.node), 10)
    from prometheus_client import generate_latest
    text = generate_latest(make_registry(daemon.manager, daemon.features))
    assert b'dpwatch_skb_drops_total{protocol="ipv4",reason="NO_SOCKET"}' in text
    assert not re.search(rb"^\S+_created[ {]", text, re.M)  # no _created series
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_location_counts_are_sampled_within_bounds(daemon, lab):
    """Past the first 64 drops of a (reason, protocol) on a CPU, one location in 16 is recorded
    with weight 16: the location total then differs from the exact count by less than 16 per
    CPU. (The exact count is the dense array's, which never samples.)"""
    import os as _os
    port = closed_udp_port(lab.node, socket.AF_INET6)
    probe = daemon.manager.probes["drops"]

    def loc_total(reading):
        return sum(n for (_a, r), n in reading["counters"]["locations"].items() if r == "NO_SOCKET")

    before = probe.collect()
    udp_send(lab.pod.ns, lab.pod.node_ip6, port, 3000, family=socket.AF_INET6)
    time.sleep(0.3)
    after = probe.collect()
    exact = after["counters"]["drops"][("NO_SOCKET", "ipv6")] - before["counters"]["drops"].get(("NO_SOCKET", "ipv6"), 0)
    sampled = loc_total(after) - loc_total(before)
    assert exact == 3000
    assert abs(sampled - exact) < 16 * _os.cpu_count()
