"""Kernel tier: fragmentation and path-MTU traffic through a real router netns.

    A (pod0) --1500-- R (node, forwards) --1400-- B (pod1)

The daemon's probes are loaded inside R. A DF datagram from A that is too big for R->B makes
R send one ICMP frag-needed (A caches the PMTU, so later DF sends fail locally with
EMSGSIZE); datagrams without DF are fragmented by R; an incomplete fragment set sent to R
times out in R's reassembly queue (net.ipv4.ipfrag_time lowered in R, a per-netns sysctl).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest

from dpwatch.daemon.host import netns as netns_mod
from dpwatch.daemon.config import Config
from dpwatch.daemon.service import Daemon
from dpwatch.probes.base import Window
from netlab import Lab, in_netns, sh, socket_in

IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2


@pytest.fixture
def router():
    with Lab(pods=2) as lab:
        a, b = lab.pod_list
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.node)
        sh("sysctl", "-qw", "net.ipv4.ipfrag_time=1", ns=lab.node)
        for dev, ns in ((b.veth_node, lab.node), (b.veth_pod, b.ns)):
            sh("ip", "link", "set", "dev", dev, "mtu", "1400", ns=ns)
        sh("ip", "route", "add", "default", "via", a.node_ip4, ns=a.ns)
        sh("ip", "route", "add", "default", "via", b.node_ip4, ns=b.ns)
        yield lab


def load_in(ns: str) -> Daemon:
    d = Daemon(Config(probes=["drops", "frag", "mtu"]).validate())
    netns_mod.run_in(f"/run/netns/{ns}", d.load)
    return d


def send_udp(ns: str, dst: str, size: int, count: int, pmtudisc: int) -> tuple[int, int]:
    """Send from netns; returns (sent, EMSGSIZE failures)."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, pmtudisc)
    sent = too_big = 0
    try:
        for _ in range(count):
            try:
                s.sendto(b"m" * size, (dst, 9))
                sent += 1
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                too_big += 1
            time.sleep(0.05)
    finally:
        s.close()
    return sent, too_big


def test_df_gives_frag_needed_and_non_df_gives_fragments(router):
    a, b = router.pod_list
    d = load_in(router.node)
    try:
        assert d.manager.status["frag"].state.value == "attached"
        mode = d.manager.status["mtu"].mode
        assert mode in ("kprobe", "tracepoint"), d.manager.status["mtu"].reason
        if os.environ.get("DPWATCH_EXPECT_KPROBES") == "1":
            assert mode == "kprobe", d.manager.status["mtu"].reason
        mtu, frag = d.manager.probes["mtu"], d.manager.probes["frag"]

        # Without DF (first: before A learns the path MTU and fragments by itself), R
        # fragments each 1500-byte packet into two.
        start = d.manager.collect()
        sent, too_big = send_udp(a.ns, b.ip4, 1472, 5, IP_PMTUDISC_DONT)
        time.sleep(0.2)
        before = d.manager.collect()
        assert (sent, too_big) == (5, 0)
        snmp = Window(2.0, start["frag"], before["frag"]).delta("snmp")
        assert snmp.get(("frag_creates", "ipv4")) == 10
        assert snmp.get(("frag_oks", "ipv4")) == 5
        ff = {x.id: x for x in frag.diagnose(Window(2.0, start["frag"], before["frag"]))}
        assert ff["frag.fragmentation_active"].evidence["fragments_created"]["ipv4"] == 10
        assert "frag.reassembly_failures" not in ff

        sent, too_big = send_udp(a.ns, b.ip4, 1472, 5, IP_PMTUDISC_DO)
        time.sleep(0.2)
        mid = d.manager.collect()
        # One datagram reached R and was refused with one frag-needed; A then knew the PMTU.
        assert (sent, too_big) == (1, 4)
        fn = Window(2.0, before["mtu"], mid["mtu"]).delta("frag_needed")
        assert fn.get(("ipv4", "sent")) == 1
        snmp = Window(2.0, before["frag"], mid["frag"]).delta("snmp")
        assert snmp.get(("frag_fails", "ipv4")) == 1
        if mode == "kprobe":
            assert fn.get(("ipv4", "received")) == 1  # A received it (the kprobe is node-wide)
        f = {x.id: x for x in mtu.diagnose(Window(2.0, before["mtu"], mid["mtu"]))}
        pm = f["mtu.pmtu_frag_needed"]
        assert pm.severity == "warning"
        sent_rows = [r for r in pm.evidence["recent"] if r["direction"] == "sent"]
        assert sent_rows and sent_rows[0]["dst"] == b.ip4 and sent_rows[0]["mtu"] == 1400
        assert 1400 in pm.evidence["announced_mtus"]
        if mode == "kprobe":
            recv = [r for r in pm.evidence["recent"] if r["direction"] == "received"]
            assert recv and recv[0]["mtu"] == 1400 and recv[0]["dst"] == b.ip4

    finally:
        d.stop()


def _fragment(src: str, dst: str, ident: int, offset8: int, more: bool, payload: bytes) -> bytes:
    flags_off = (0x2000 if more else 0) | offset8
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags_off, 64,
                      socket.IPPROTO_UDP, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + payload


def test_incomplete_fragments_time_out(router):
    a = router.pod
    d = load_in(router.node)
    try:
        frag = d.manager.probes["frag"]
        before = d.manager.collect()
        # IPPROTO_RAW implies IP_HDRINCL: the kernel sends our header as is (checksum filled in).
        raw = in_netns(a.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
        try:
            for ident in (0x1111, 0x2222, 0x3333):
                # The first 64 bytes of a datagram, with "more fragments": the rest never comes.
                raw.sendto(_fragment(a.ip4, a.node_ip4, ident, 0, True, b"\0" * 64), (a.node_ip4, 0))
        finally:
            raw.close()
        time.sleep(2.5)  # ipfrag_time=1 in R, plus the timer's slack
        after = d.manager.collect()
        snmp = Window(3.0, before["frag"], after["frag"]).delta("snmp")
        assert snmp.get(("reasm_reqds", "ipv4")) == 3
        assert snmp.get(("reasm_timeout", "ipv4")) == 3
        assert snmp.get(("reasm_fails", "ipv4")) == 3
        drops = Window(3.0, before["frag"], after["frag"]).delta("drop_reasons")
        # 6.18 frees an expired fragment queue with reason FRAG_REASM_TIMEOUT; Debian's 6.1
        # (the guest) frees it untagged, so there the snmp counters are the only evidence.
        tagged = tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 2)
        want = 3 if tagged else 0
        assert drops.get(("FRAG_REASM_TIMEOUT",), 0) == want
        f = {x.id: x for x in frag.diagnose(Window(3.0, before["frag"], after["frag"]))}
        ev = f["frag.reassembly_failures"].evidence
        assert ev["reassembly_timeouts"]["ipv4"] == 3 and ev["drop_reasons"]["FRAG_REASM_TIMEOUT"] == want
    finally:
        d.stop()


def test_healthy_topology_has_no_frag_or_mtu_finding(router):
    a, b = router.pod_list
    d = load_in(router.node)
    try:
        before = d.manager.collect()
        sent, too_big = send_udp(a.ns, b.ip4, 1000, 20, IP_PMTUDISC_DO)  # fits everywhere
        time.sleep(0.2)
        after = d.manager.collect()
        assert (sent, too_big) == (20, 0)
        findings = []
        for name in ("frag", "mtu"):
            findings += d.manager.probes[name].diagnose(Window(2.0, before[name], after[name]))
        # The audit covers the router's own netns (lo and its two veths, equal at both ends).
        assert findings == [], [(f.id, f.summary) for f in findings]
    finally:
        d.stop()
