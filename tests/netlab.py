"""Real test networks from network namespaces, for the kernel and end-to-end tiers.

A Lab makes a "node" netns (where the daemon runs) and one or more "pod" netns, each joined
to the node by a veth pair with IPv4 and IPv6 addresses. Every netns gets a unique name and
is deleted when the Lab closes, also when a test fails (use it as a context manager or
through the fixtures in conftest.py).

Addresses come from 198.18.0.0/15 (the benchmarking range) and fd00:d9::/64, and they exist
only inside these namespaces.
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable

from dpwatch.daemon.host import netns

_counter = itertools.count()


def sh(*cmd: str, check: bool = True, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=60, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def in_netns(ns: str | None, fn: Callable[[], Any]) -> Any:
    """Run fn in a thread that has joined netns ``ns``; sockets it creates stay in that netns.
    ``ns`` None: here, in the caller's own netns."""
    if ns is None:
        return fn()
    return netns.run_in(f"/run/netns/{ns}", fn)


def socket_in(ns: str, family: int, kind: int) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(family, kind))


def http_get(ns: str | None, host: str, port: int, path: str, headers: dict | None = None,
             timeout: float = 30) -> tuple[int, dict[str, str], str]:
    def go():
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
        finally:
            conn.close()
    return in_netns(ns, go)


def read_snmp(ns: str, table: str = "Udp", path: str = "/proc/net/snmp") -> dict[str, int]:
    """One table of /proc/net/snmp (e.g. Udp: RcvbufErrors) as seen inside netns ``ns``."""
    out = sh("cat", path, ns=ns).stdout.splitlines()
    rows = [ln.split() for ln in out if ln.startswith(table + ":")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}


@dataclass
class Pod:
    ns: str
    index: int
    ip4: str
    ip6: str
    node_ip4: str
    node_ip6: str
    veth_node: str
    veth_pod: str


@dataclass
class Lab:
    """node netns + pods. ``Lab(pods=1)`` then ``with lab:`` or call close()."""
    pods: int = 1
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}{next(_counter)}")
    node: str = ""
    pod_list: list[Pod] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.node = f"dpw-node-{self.tag}"
        try:
            self._add_ns(self.node)
            for i in range(self.pods):
                self.pod_list.append(self._add_pod(i))
        except Exception:
            self.close()
            raise

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self._made.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)

    def _add_pod(self, i: int) -> Pod:
        ns = f"dpw-pod{i}-{self.tag}"
        self._add_ns(ns)
        vn, vp = f"dpwn{self.tag}x{i}"[:15], f"dpwp{self.tag}x{i}"[:15]
        sh("ip", "link", "add", vn, "type", "veth", "peer", "name", vp)
        sh("ip", "link", "set", vn, "netns", self.node)
        sh("ip", "link", "set", vp, "netns", ns)
        node4, pod4 = f"198.18.{i}.1", f"198.18.{i}.2"
        node6, pod6 = f"fd00:d9:{i:x}::1", f"fd00:d9:{i:x}::2"
        for side, dev, a4, a6 in ((self.node, vn, node4, node6), (ns, vp, pod4, pod6)):
            sh("ip", "addr", "add", f"{a4}/24", "dev", dev, ns=side)
            sh("ip", "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=side)
            sh("ip", "link", "set", dev, "up", ns=side)
        return Pod(ns, i, pod4, pod6, node4, node6, vn, vp)

    @property
    def pod(self) -> Pod:
        return self.pod_list[0]

    def close(self) -> None:
        for name in reversed(self._made):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()


def udp_send(ns: str, dst: str, port: int, count: int, payload: bytes = b"x",
             family: int = socket.AF_INET) -> int:
    """Send ``count`` datagrams from netns ``ns``; returns how many sendto() accepted."""
    def go():
        s = socket.socket(family, socket.SOCK_DGRAM)
        sent = 0
        try:
            for _ in range(count):
                try:
                    s.sendto(payload, (dst, port))
                    sent += 1
                except ConnectionRefusedError:
                    # An ICMP port-unreachable from an earlier datagram: the datagram was not sent.
                    continue
        finally:
            s.close()
        return sent
    return in_netns(ns, go)


def closed_udp_port(ns: str, family: int = socket.AF_INET) -> int:
    """A UDP port with no socket in ``ns`` (bound then released)."""
    def go():
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        port = s.getsockname()[1]
        s.close()
        return port
    return in_netns(ns, go)


def drain(sock: socket.socket) -> int:
    """Read every queued datagram without blocking; returns how many there were."""
    sock.setblocking(False)
    n = 0
    while True:
        try:
            sock.recv(65536)
            n += 1
        except BlockingIOError:
            return n
