"""Fault injectors the incidents share: each makes real traffic or a real setting in the
incident's namespaces, and registers its own clean-up with ``inc.on_close``.

- conntrack_on(): conntrack active in the node netns (an nftables rule that uses ct state);
- hold_tcp(): a server in the node netns holding every connection, and a pod's connects to it
  (the established entries a full conntrack table is made of);
- UdpEcho / assured_udp_flows(): a UDP echo server and replied flows that conntrack marks
  ASSURED (so they are never evicted early);
- UdpSink: a UDP socket in the node netns that never reads (a small SO_RCVBUF overflows);
- nft_drop(): a drop rule in the node netns (a NetworkPolicy deny);
- tcp_attempts(): connection attempts from a pod, each one SYN (closed before a retransmit);
- sysctl_global(), conntrack_buckets(): a global kernel setting for the incident, restored
  at close;
- stuck_listener(): a TCP server that listens with a tiny backlog and never accepts;
- TcpEcho / tcp_ping_pong(): a TCP echo server and request/response round trips to it (the
  healthy nodes' ordinary load; blocking sockets, no busy polling).
"""

from __future__ import annotations

import select
import socket
import threading
import time

from netlab import in_netns, sh, socket_in
from test_conntrack_kernel import Holder, open_connections  # the kernel tier's helpers

CT_RULES = """table inet dpwinc {
  chain input {
    type filter hook input priority 0;
    ct state new,established accept
  }
}
"""


def conntrack_on(inc) -> None:
    """Conntrack tracks the node netns' input (no notrack for loopback: the daemon's own
    port must stay reachable through daemon/notrack.py)."""
    sh("nft", "-f", "-", ns=inc.lab.node, input=CT_RULES)


def hold_tcp(inc, count: int, pod=None) -> tuple[list[socket.socket], int]:
    """A Holder in the node netns and ``count`` non-blocking connects from ``pod`` (the first
    pod by default): returns (connected sockets, attempts still pending after 0.5 s, closed
    before their first SYN retransmit, so each is exactly one dropped SYN)."""
    pod = pod or inc.lab.pod
    holder = Holder(inc.lab.node, pod.node_ip4)
    inc.on_close(holder.close)
    conns, pending = open_connections(pod.ns, pod.node_ip4, holder.port, count)
    inc.on_close(lambda: [c.close() for c in conns])
    return conns, pending


class UdpEcho:
    """A UDP server on ``addr`` in netns ``ns`` that sends every datagram back."""

    def __init__(self, ns: str, addr: str, port: int = 0):
        self.sock = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.echoed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
                self.sock.sendto(data, peer)
                self.echoed += 1
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def udp_flows(ns: str, dst: str, port: int, socks: list[socket.socket] | None = None,
              count: int = 0, wait: float = 0.5) -> tuple[list[socket.socket], int]:
    """One datagram from each of ``count`` new sockets (own source ports) in ``ns``, or from
    each of ``socks``; returns (the sockets, how many got their echo within ``wait`` s)."""
    if socks is None:
        socks = [socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    for s in socks:
        s.setblocking(False)
        s.sendto(b"ping", (dst, port))
    answered: set[int] = set()
    deadline = time.monotonic() + wait
    while len(answered) < len(socks) and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s.fileno() not in answered], [], [],
                                    max(0.0, deadline - time.monotonic()))
        for s in ready:
            try:
                s.recv(2048)
                answered.add(s.fileno())
            except OSError:
                pass
    return socks, len(answered)


def assured_udp_flows(ns: str, dst: str, port: int, count: int) -> tuple[list[socket.socket], int]:
    """``count`` replied UDP flows that conntrack marks ASSURED: a datagram and its echo, then
    another more than 2 s later (a UDP entry is assured once it is still active after 2 s;
    assured entries are never evicted early). Returns (the sockets, flows answered twice)."""
    socks, first = udp_flows(ns, dst, port, count=count)
    time.sleep(2.2)
    _, second = udp_flows(ns, dst, port, socks=socks)
    return socks, min(first, second)


class UdpSink:
    """A UDP socket on ``addr`` (IPv4 or IPv6) in netns ``ns`` with SO_RCVBUF ``rcvbuf`` that
    never reads."""

    def __init__(self, ns: str, addr: str, rcvbuf: int = 1024):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = socket_in(ns, family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        in_netns(ns, lambda: self.sock.bind((addr, 0)))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def nft_drop(inc, rule: str, table: str = "dpwpolicy") -> None:
    """One rule in an input chain of its own table in the node netns (e.g. ``tcp dport 8080
    drop``): what a NetworkPolicy deny compiles to."""
    sh("nft", "-f", "-", ns=inc.lab.node, input=(
        f"table inet {table} {{\n  chain input {{\n    type filter hook input priority 0;\n"
        f"    {rule}\n  }}\n}}\n"))


def tcp_attempts(ns: str, dst: str, port: int, count: int, wait: float = 0.5) -> int:
    """``count`` non-blocking connects from ``ns``; those still pending after ``wait`` s (before
    the first SYN retransmit at 1 s) are closed. Returns how many connected."""
    conns, _pending = open_connections(ns, dst, port, count, wait)
    for c in conns:
        c.close()
    return len(conns)


def write_restored(inc, path: str, value) -> None:
    """Write ``value`` to a kernel setting file for the incident; its old value is written back
    at close whatever happens."""
    with open(path) as fh:
        old = fh.read().strip()

    def restore():
        with open(path, "w") as fh:
            fh.write(old)
    inc.on_close(restore)
    with open(path, "w") as fh:
        fh.write(str(value))


def sysctl_global(inc, key: str, value: int) -> None:
    """A sysctl of the init netns (global, e.g. net.core.netdev_max_backlog) for the incident."""
    write_restored(inc, "/proc/sys/" + key.replace(".", "/"), value)


def conntrack_buckets(inc, buckets: int) -> None:
    """The conntrack hash size (global, every netns's table is rehashed), for the incident."""
    write_restored(inc, "/sys/module/nf_conntrack/parameters/hashsize", buckets)


def stuck_listener(inc, addr: str, backlog: int = 1) -> int:
    """A TCP server on ``addr`` in the node netns that calls listen(``backlog``) and never
    accepts (a hung application); closed at close. Returns its port."""
    sock = socket_in(inc.lab.node, socket.AF_INET, socket.SOCK_STREAM)
    inc.on_close(sock.close)
    sock.bind((addr, 0))
    sock.listen(backlog)
    return sock.getsockname()[1]


class TcpEcho:
    """A TCP server on ``addr`` in netns ``ns`` that echoes what each connection sends, a thread
    per connection. ``echoed`` counts the messages sent back."""

    def __init__(self, ns: str, addr: str, port: int = 0):
        self.sock = socket_in(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.echoed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="tcp-echo", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._echo, args=(c,), name="tcp-echo-conn", daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        c.settimeout(5)
        try:
            while not self._stop.is_set():
                data = c.recv(65536)
                if not data:
                    return
                c.sendall(data)
                with self._lock:
                    self.echoed += 1
        except OSError:
            return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for c in self._conns:
            c.close()
        self.sock.close()


def tcp_ping_pong(ns: str, dst: str, port: int, rounds: int, connections: int = 1, size: int = 64) -> int:
    """``rounds`` request/response round trips of ``size`` bytes from netns ``ns``, spread over
    ``connections`` connections made one after another (each connected, used, closed).
    Returns the round trips whose reply came back whole."""
    def go():
        done = 0
        msg = b"x" * size
        for i in range(connections):
            with socket.create_connection((dst, port), timeout=5) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(rounds // connections + (1 if i < rounds % connections else 0)):
                    c.sendall(msg)
                    got = b""
                    while len(got) < size:
                        part = c.recv(size - len(got))
                        if not part:
                            return done
                        got += part
                    done += 1
        return done
    return in_netns(ns, go)
