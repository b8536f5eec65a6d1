"""Real DNS servers and clients in network namespaces, for the DNS probe's tests and bench.

- Dnsmasq: Debian's dnsmasq in a netns (NOERROR for ok.test and api.example, A and AAAA,
  NXDOMAIN for nx.test and everything under cluster.local, REFUSED for any other name).
- Unbound: Debian's unbound in a netns (a static local zone: NOERROR, NXDOMAIN, REFUSED for
  names outside its zones); only when unbound is installed.
- ScriptedServer: a small dnslib server in the test process (a socket made inside the netns)
  whose behaviour the first label of the name picks: delay<ms>, servfail, refused, nx,
  noreply; anything else gets NOERROR with an A/AAAA record. It counts what it answered.
- Clients: dnspython queries sent from a "pod" netns, returning the rcode seen (None on
  timeout), and raw UDP payloads for malformed input.

Every server is stopped by close() (use them as context managers); processes are killed by
their own pid, and the Lab deleting the netns kills anything left in it.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

from netlab import Lab, in_netns, sh

OK_A = "192.0.2.10"
OK_AAAA = "2001:db8::10"   # with an A only, dnsmasq (no upstream) would answer AAAA with REFUSED
# A pod's search list in namespace "default" (kubelet's resolv.conf, with ndots:5)
K8S_SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]


def route_pods(lab: Lab) -> None:
    """Pods reach each other through the node netns (which forwards), like a CNI bridge-less
    routed setup: default routes in every pod, forwarding on in the node (per netns)."""
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lab.node)
    sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=lab.node)
    for pod in lab.pod_list:
        sh("ip", "route", "add", "default", "via", pod.node_ip4, ns=pod.ns)
        sh("ip", "-6", "route", "add", "default", "via", pod.node_ip6, ns=pod.ns)


def _udp_bound(ns: str, addr: str, port: int) -> bool:
    want = (ipaddress.ip_address(addr), port)
    for line in sh("ss", "-Hunl", ns=ns, check=False).stdout.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        host, _, p = parts[3].rpartition(":")
        try:
            if (ipaddress.ip_address(host.strip("[]").split("%")[0]), int(p)) == want:
                return True
        except ValueError:
            continue
    return False


def _wait_bound(ns: str, addrs: list[str], port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while not all(_udp_bound(ns, a, port) for a in addrs):
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout and proc.poll() is not None else ""
            raise RuntimeError(f"{what} did not start on {addrs}:{port}: {out}")
        time.sleep(0.05)


class _Proc:
    proc: subprocess.Popen

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Dnsmasq(_Proc):
    """dnsmasq bound to ``addrs`` in netns ``ns`` (flags from /work/shared/test-recipes.md)."""

    def __init__(self, ns: str, addrs: list[str], port: int = 53, extra: tuple[str, ...] = ()):
        self.ns, self.addrs, self.port = ns, addrs, port
        cmd = ["ip", "netns", "exec", ns, shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
               "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
               "--user=root", "--bind-interfaces", "--cache-size=0", f"--port={port}",
               f"--address=/ok.test/{OK_A}", f"--address=/ok.test/{OK_AAAA}", "--address=/nx.test/",
               f"--address=/api.example/{OK_A}", f"--address=/api.example/{OK_AAAA}",
               "--address=/cluster.local/",
               "--pid-file=", *[f"--listen-address={a}" for a in addrs], *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait_bound(ns, addrs, port, self.proc, "dnsmasq")
        except Exception:
            self.close()
            raise


UNBOUND_CONF = """server:
  interface: {addr}
  port: {port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: "{dir}/unbound.pid"
  use-syslog: no
  logfile: ""
  do-ip6: yes
  access-control: 0.0.0.0/0 allow
  access-control: ::/0 allow
  module-config: "iterator"
  auto-trust-anchor-file: ""
  local-zone: "." static
  local-zone: "ok.test." static
  local-data: "ok.test. 60 IN A {ok}"
{extra}remote-control:
  control-enable: no
"""


class Unbound(_Proc):
    """unbound answering ok.test (NOERROR) and NXDOMAIN for every other name (local-zone
    "." static: it never contacts the real roots)."""

    available = shutil.which("unbound") is not None or os.path.exists("/usr/sbin/unbound")

    def __init__(self, ns: str, addr: str, port: int = 53, extra: str = ""):
        """``extra``: more configuration, after the server clause's own lines (server options,
        or whole clauses such as a stub-zone)."""
        self.dir = tempfile.mkdtemp(prefix="dpw-unbound-")
        conf = os.path.join(self.dir, "unbound.conf")
        with open(conf, "w") as f:
            f.write(UNBOUND_CONF.format(addr=addr, port=port, dir=self.dir, ok=OK_A, extra=extra))
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, shutil.which("unbound") or "/usr/sbin/unbound",
                                      "-d", "-c", conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait_bound(ns, [addr], port, self.proc, "unbound")
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ScriptedServer:
    """A dnslib server on ``addr``:``port`` in netns ``ns`` (IPv4 or IPv6 by the address).
    The first label of the question picks the answer: delay<ms> (NOERROR after ms),
    servfail, refused, nx, noreply (nothing); otherwise NOERROR. ``answered`` counts the
    responses sent by rcode name, ``ignored`` the queries left unanswered."""

    def __init__(self, ns: str, addr: str, port: int = 53):
        from dnslib import DNSRecord  # noqa: F401  (fail early if the test extra is missing)
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = in_netns(ns, lambda: socket.socket(fam, socket.SOCK_DGRAM))
        self.sock.bind((addr, port))
        self.sock.settimeout(0.2)
        self.answered: collections.Counter = collections.Counter()
        self.ignored = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timers: list[threading.Timer] = []
        self._thread = threading.Thread(target=self._serve, name="dns-scripted", daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self) -> None:
        from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                q = DNSRecord.parse(data)
            except Exception:
                continue
            first = str(q.q.qname).split(".")[0].lower()
            reply = q.reply()
            delay = 0.0
            if first == "noreply":
                with self._lock:
                    self.ignored += 1
                continue
            if first == "servfail":
                reply.header.rcode = RCODE.SERVFAIL
            elif first == "refused":
                reply.header.rcode = RCODE.REFUSED
            elif first == "nx":
                reply.header.rcode = RCODE.NXDOMAIN
            else:
                if first.startswith("delay") and first[5:].isdigit():
                    delay = int(first[5:]) / 1000.0
                if q.q.qtype == QTYPE.AAAA:
                    reply.add_answer(RR(q.q.qname, QTYPE.AAAA, rdata=AAAA(OK_AAAA), ttl=5))
                else:
                    reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(OK_A), ttl=5))
            wire, rcode = reply.pack(), RCODE.get(reply.header.rcode)
            if delay:
                t = threading.Timer(delay, self._send, (wire, peer, rcode))
                self._timers.append(t)
                t.start()
            else:
                self._send(wire, peer, rcode)

    def _send(self, wire: bytes, peer, rcode: str) -> None:
        try:
            self.sock.sendto(wire, peer)
            with self._lock:
                self.answered[rcode] += 1
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for t in self._timers:
            t.cancel()
        self._thread.join(2)
        self.sock.close()


def query(ns: str, server: str, name: str, qtype: str = "A", timeout: float = 2.0,
          port: int = 53) -> str | None:
    """One dnspython UDP query from netns ``ns``: the rcode name received, or None on timeout."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode

    def go():
        q = dns.message.make_query(name, qtype)
        try:
            r = dns.query.udp(q, server, timeout=timeout, port=port)
        except dns.exception.Timeout:
            return None
        return dns.rcode.to_text(r.rcode())
    return in_netns(ns, go)


def queries(ns: str, server: str, names: list[tuple[str, str]], timeout: float = 2.0,
            port: int = 53) -> collections.Counter:
    """Send (name, qtype) queries one after another; count the rcodes received ("timeout" for
    none). Every query is sent exactly once (no retries)."""
    seen: collections.Counter = collections.Counter()
    for name, qtype in names:
        seen[query(ns, server, name, qtype, timeout, port) or "timeout"] += 1
    return seen


def concurrent_queries(jobs: list[tuple[str, str, list[tuple[str, str]]]], timeout: float = 2.0,
                       port: int = 53, workers: int = 8) -> collections.Counter:
    """Several clients at once: each job is (netns, server, [(name, qtype), ...]); its queries
    are spread over ``workers`` threads (each query sent once, as in queries()). Returns the
    rcodes received over all jobs ("timeout" for none)."""
    from concurrent.futures import ThreadPoolExecutor
    seen: collections.Counter = collections.Counter()
    with ThreadPoolExecutor(max_workers=workers * max(1, len(jobs))) as pool:
        futs = [pool.submit(query, ns, server, name, qtype, timeout, port)
                for ns, server, names in jobs for name, qtype in names]
        for f in futs:
            seen[f.result() or "timeout"] += 1
    return seen


def resolve_with_search(ns: str, server: str, name: str, search: list[str], ndots: int = 5,
                        qtype: str = "A") -> tuple[str | None, list[str]]:
    """Resolve a relative name the way a pod's stub resolver does with a search list and
    ndots (dnspython's Resolver); returns (the name that answered or None, names tried)."""
    import dns.name
    import dns.resolver

    def go():
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [server]
        r.search = [dns.name.from_text(s) for s in search]
        r.ndots = ndots
        r.use_search_by_default = True
        r.lifetime = 10
        r.timeout = 3
        tried = [str(n) for n in r._get_qnames_to_try(dns.name.from_text(name, None), True)]
        try:
            ans = r.resolve(name, qtype, search=True)
            return str(ans.qname), tried
        except dns.resolver.NXDOMAIN:
            return None, tried
    return in_netns(ns, go)


def send_raw(ns: str, server: str, payloads: list[bytes], port: int = 53, gap: float = 0.0) -> int:
    """Send raw UDP payloads (each once) from netns ``ns``; returns how many were sent."""
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET

    def go():
        s = socket.socket(fam, socket.SOCK_DGRAM)
        n = 0
        try:
            for p in payloads:
                try:
                    s.sendto(p, (server, port))
                    n += 1
                except ConnectionRefusedError:
                    s.close()  # ICMP port unreachable from an earlier send: use a new socket
                    s = socket.socket(fam, socket.SOCK_DGRAM)
                    s.sendto(p, (server, port))
                    n += 1
                if gap:
                    time.sleep(gap)
        finally:
            s.close()
        return n
    return in_netns(ns, go)


def malformed_payloads(count: int, seed: int, max_len: int = 120) -> list[bytes]:
    """``count`` distinct UDP payloads that the reference decoder (dnsnames.parse, which the
    kernel parser mirrors) rejects: hand-made cases first (truncated headers, compression
    pointers and loops, a 321-byte name, a 64-byte label, a name running past the datagram,
    qtype cut off, no question, qdcount 9), then seeded random bytes."""
    from dpwatch.probes.dns import names as dn
    hdr = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    out = [
        b"\x12\x34\x01",
        hdr[:11],
        hdr + b"\xc0\x0c" + b"\x00\x01\x00\x01",
        hdr + b"\x03abc\xc0\x0c" + b"\x00\x01\x00\x01",
        hdr + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",
        hdr + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
        hdr + b"\x05abc",
        hdr + b"\x03abc\x00\x00",
        struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0),
        struct.pack("!HHHHHH", 2, 0x0100, 9, 0, 0, 0) + b"\x00\x00\x01\x00\x01",
    ][:count]
    rng = random.Random(seed)
    while len(out) < count:
        p = bytes(rng.randrange(256) for _ in range(rng.randrange(1, max_len)))
        try:
            dn.parse(p)
        except dn.Malformed:
            if p not in out:
                out.append(p)
    for p in out:
        try:
            dn.parse(p)
        except dn.Malformed:
            continue
        raise AssertionError(f"not malformed: {p!r}")
    return out
