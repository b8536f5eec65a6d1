"""Topologies of the incident library, built on a netlab.Lab (the "node" netns, where the
daemon runs, and its pods, each on a veth pair), and the traffic that goes through them.

    routed(lab)    A (pod0) --1500-- node (forwards v4 and v6) --1400-- B (pod1): both ends of
                   B's veth at 1400, so the path is narrower but no link is mismatched
    bridged(lab)   every pod on one bridge of the node netns, like a CNI bridge (cni0/cbr0)
    overlay(lab)   a vxlan in the node netns over a veth underlay to a second node (the last
                   pod's netns plays it), and the other pods routed over it

Sink counts what arrives; send() sends datagrams with or without DF and counts the sends that
the sender's own PMTU cache refused (EMSGSIZE).
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass

from netlab import Lab, Pod, in_netns, sh

IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2      # not in Python 3.11's socket
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT, IPV6_PMTUDISC_DO = 23, 0, 2
PORT = 9


def set_mtu(ns: str, dev: str, mtu: int) -> None:
    sh("ip", "link", "set", "dev", dev, "mtu", str(mtu), ns=ns)


def routed(lab: Lab, b_mtu: int = 1400) -> tuple[Pod, Pod]:
    """The node forwards between pod0 (A, 1500) and pod1 (B, ``b_mtu`` on both ends), IPv4
    and IPv6; A and B route everything through the node."""
    a, b = lab.pod_list[:2]
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.node)
    sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=lab.node)
    set_mtu(lab.node, b.veth_node, b_mtu)
    set_mtu(b.ns, b.veth_pod, b_mtu)
    for p in (a, b):
        sh("ip", "route", "add", "default", "via", p.node_ip4, ns=p.ns)
        sh("ip", "-6", "route", "add", "default", "via", p.node_ip6, ns=p.ns)
    return a, b


def add_addresses(pod: Pod, n: int, family: int = socket.AF_INET) -> list[str]:
    """``n`` more addresses on the pod's veth (other pods' services behind the same link):
    each is a destination of its own in a sender's PMTU cache."""
    out = []
    for i in range(n):
        if family == socket.AF_INET6:
            addr = pod.ip6.rsplit(":", 1)[0] + f":{0x10 + i:x}"
            sh("ip", "-6", "addr", "add", f"{addr}/64", "dev", pod.veth_pod, "nodad", ns=pod.ns)
        else:
            addr = pod.ip4.rsplit(".", 1)[0] + f".{10 + i}"
            sh("ip", "addr", "add", f"{addr}/24", "dev", pod.veth_pod, ns=pod.ns)
        out.append(addr)
    return out


def bridged(lab: Lab, bridge: str = "cni0", subnet: str = "198.19.0") -> tuple[str, list[str]]:
    """A bridge in the node netns with ``subnet``.1/24 (the pods' gateway), every pod's node
    end enslaved to it (its own address removed), pod i at ``subnet``.(10+i)."""
    sh("ip", "link", "add", bridge, "type", "bridge", ns=lab.node)
    sh("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge, ns=lab.node)
    addrs = []
    for p in lab.pod_list:
        sh("ip", "addr", "flush", "dev", p.veth_node, ns=lab.node)
        sh("ip", "link", "set", p.veth_node, "master", bridge, ns=lab.node)
        addr = f"{subnet}.{10 + p.index}"
        sh("ip", "addr", "add", f"{addr}/24", "dev", p.veth_pod, ns=p.ns)
        addrs.append(addr)
    sh("ip", "link", "set", bridge, "up", ns=lab.node)
    return bridge, addrs


@dataclass
class Overlay:
    vxlan: str        # the node's vxlan device
    underlay: str     # the node's end of the underlay veth
    remote: Pod       # the second node (a pod netns of the lab)
    remote_ip: str    # the second node's address on the overlay


def overlay(lab: Lab, vxlan_mtu: int = 1450, underlay_mtu: int = 1500) -> Overlay:
    """vxlan42 (VNI 42, UDP 4789) in the node netns over its veth to the last pod's netns,
    which plays a second node with its own vxlan42 (MTU 1450, correct). The overlay is
    198.19.42.0/24 (node .1, second node .2); the other pods route through the node to it.

    The kernel refuses a vxlan MTU above its lower device's MTU - 50 when it is set, so the
    underlay starts at max(underlay_mtu, vxlan_mtu + 50) and is then set to ``underlay_mtu``
    (on both ends: the underlay itself stays consistent)."""
    remote = lab.pod_list[-1]
    start = max(underlay_mtu, vxlan_mtu + 50)
    for ns, dev in ((lab.node, remote.veth_node), (remote.ns, remote.veth_pod)):
        set_mtu(ns, dev, start)
    for ns, local, peer, mtu in ((lab.node, remote.node_ip4, remote.ip4, vxlan_mtu),
                                 (remote.ns, remote.ip4, remote.node_ip4, 1450)):
        dev = remote.veth_node if ns == lab.node else remote.veth_pod
        sh("ip", "link", "add", "vxlan42", "type", "vxlan", "id", "42", "dev", dev, "local", local,
           "remote", peer, "dstport", "4789", ns=ns)
        sh("ip", "link", "set", "vxlan42", "mtu", str(mtu), "up", ns=ns)
    sh("ip", "addr", "add", "198.19.42.1/24", "dev", "vxlan42", ns=lab.node)
    sh("ip", "addr", "add", "198.19.42.2/24", "dev", "vxlan42", ns=remote.ns)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.node)
    for p in lab.pod_list[:-1]:
        sh("ip", "route", "add", "default", "via", p.node_ip4, ns=p.ns)
        sh("ip", "route", "add", p.ip4, "via", "198.19.42.1", ns=remote.ns)
    if start != underlay_mtu:
        set_underlay(lab, remote, underlay_mtu)
    return Overlay("vxlan42", remote.veth_node, remote, "198.19.42.2")


def set_underlay(lab: Lab, remote: Pod, mtu: int) -> None:
    """Both ends of the underlay veth to ``mtu``."""
    for ns, dev in ((lab.node, remote.veth_node), (remote.ns, remote.veth_pod)):
        set_mtu(ns, dev, mtu)


class Sink:
    """A UDP socket bound in ``ns`` (port 9, every address of the family) that counts the
    datagrams reaching it, so nothing the incidents send is a no-socket drop."""

    def __init__(self, ns: str, family: int = socket.AF_INET, port: int = PORT):
        self.sock = in_netns(ns, lambda: socket.socket(family, socket.SOCK_DGRAM))
        self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        self.sock.settimeout(0.2)
        self.received: list[int] = []   # sizes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.received.append(len(self.sock.recv(65536)))
            except (socket.timeout, OSError):
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def send(ns: str, dsts: list[str], size: int, df: bool, per_dst: int = 1,
         family: int = socket.AF_INET, gap: float = 0.02) -> tuple[int, int]:
    """``per_dst`` datagrams of ``size`` bytes of payload to each of ``dsts`` (port 9), with DF
    (IP_PMTUDISC_DO) or without (IP_PMTUDISC_DONT), from one new socket per destination.
    Returns (sent, refused by the sender's PMTU cache with EMSGSIZE)."""
    import time

    level, opt = ((socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER) if family == socket.AF_INET6
                  else (socket.IPPROTO_IP, IP_MTU_DISCOVER))
    sent = too_big = 0
    for dst in dsts:
        s = in_netns(ns, lambda: socket.socket(family, socket.SOCK_DGRAM))
        s.setsockopt(level, opt, 2 if df else 0)
        try:
            for _ in range(per_dst):
                try:
                    s.sendto(b"m" * size, (dst, PORT))
                    sent += 1
                except OSError as exc:
                    if exc.errno != errno.EMSGSIZE:
                        raise
                    too_big += 1
                time.sleep(gap)
        finally:
            s.close()
    return sent, too_big
