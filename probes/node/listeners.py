"""Listening TCP sockets of one netns, read through sock_diag, and whose accept queues overflow.

What the kernel says about each TCP LISTEN socket (inet_diag, the interface behind
``ss -ltn``), both families:

- ``queue``: connections that finished the handshake and wait for accept()
  (sk_ack_backlog; inet_diag's idiag_rqueue for a LISTEN socket);
- ``backlog``: the most the queue holds (sk_max_ack_backlog, idiag_wqueue): the backlog the
  application passed to listen(), capped at the netns' net.core.somaxconn *when it called
  listen()*. What it asked for is not visible: a backlog equal to somaxconn counts as capped
  by it (the application asked for at least that much);
- ``drops``: the socket's sk_drops (INET_DIAG_SKMEMINFO), which the kernel raises together
  with TcpExt ListenDrops (tcp_listendrop()): the listen drops of this one socket.

The accept queue is full when queue > backlog (sk_acceptq_is_full), so listen(1) holds two
connections. Then each SYN is refused: TcpExt ListenOverflows and ListenDrops and the
socket's drops grow by one. Measured on 6.18: 200 connection attempts to a listen(1) server
gave 792 ListenOverflows in 3.5 s (the SYNs and their retransmissions), sk_drops 792, and no
skb:kfree_skb drop with reason TCP_LISTEN_OVERFLOW: a refused SYN is freed with consume_skb.
So the node probe names the listeners from these counters, with or without drop reasons.

Here: ``read_listeners()`` (call it in a thread that lives in the netns to read: it makes
its netlink socket there), ``socket_owners()`` (a bounded /proc/*/fd scan), and ``Tracker``,
the bounded memory of listeners seen with connections queued. Which of them overflowed in a
window is probes/node/culprits.py's (pure), the finding probes/node/findings.py's.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

from dpwatch.daemon.host import paths
from dpwatch.probes.node import netlink as nl

TCP_LISTEN = 10
INET_DIAG_SKMEMINFO = 7       # rtattr type; requested with idiag_ext bit (1 << (7 - 1))
SK_MEMINFO_DROPS = 8          # index of sk_drops in the SKMEMINFO u32 array
TRACKED_MAX = 256             # listeners remembered with queued connections / counted drops
OWNER_SCAN_MAX_FDS = 200_000  # /proc/*/fd links read at most per owner scan
OWNERS_PER_SOCKET = 3         # processes named per socket (pre-fork servers share one)
OWNER_RETRY_SECONDS = 60.0    # a socket no process was found for is looked up again after this

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then struct inet_diag_sockid:
# sport, dport (network order), src, dst (16 bytes each), ifindex, cookie (8 bytes).
DIAG_REQ = struct.Struct("=BBBBI2s2s16s16sI8s")
# struct inet_diag_msg: family, state, timer, retrans, the sockid as above, expires, rqueue,
# wqueue, uid, inode (72 bytes).
DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


@dataclass(frozen=True)
class Listener:
    family: str            # "ipv4" | "ipv6"
    address: str
    port: int
    inode: int
    queue: int             # connections waiting for accept()
    backlog: int           # the most the accept queue holds: min(listen() backlog, somaxconn then)
    drops: int | None      # the socket's sk_drops; None when the kernel gave no SKMEMINFO
    uid: int = 0

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if self.family == "ipv6" else f"{self.address}:{self.port}"

    @property
    def full(self) -> bool:
        """The kernel's sk_acceptq_is_full(): the next connection is refused."""
        return self.queue > self.backlog


def skmeminfo_drops(raw: bytes | None) -> int | None:
    """sk_drops from an INET_DIAG_SKMEMINFO attribute's payload (u32 array), or None when it
    is missing or too short."""
    if raw is None or len(raw) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return struct.unpack_from("=I", raw, 4 * SK_MEMINFO_DROPS)[0]


def parse_diag_messages(data: bytes, out: list[Listener]) -> bool:
    """The netlink messages of a SOCK_DIAG_BY_FAMILY dump (struct inet_diag_msg, then
    rtattrs) -> LISTEN sockets appended to ``out``. Returns whether NLMSG_DONE was seen;
    raises OSError on an NLMSG_ERROR, ValueError on a truncated message."""
    for off, length, mtype, _flags in nl.messages(data):
        if mtype == nl.NLMSG_DONE:
            return True
        if mtype == nl.NLMSG_ERROR:
            nl.check_error(data, off)
        elif mtype == SOCK_DIAG_BY_FAMILY and length >= nl.NLMSG_HDR.size + DIAG_MSG.size:
            listener = _listener(data, off + nl.NLMSG_HDR.size, off + length)
            if listener is not None:
                out.append(listener)
    return False


def _listener(data: bytes, at: int, end: int) -> Listener | None:
    (fam, state, _timer, _retrans, sport, _dport, src, _dst, _ifindex, _cookie, _expires,
     rqueue, wqueue, uid, inode) = DIAG_MSG.unpack_from(data, at)
    family = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(fam)
    if state != TCP_LISTEN or family is None:
        return None
    meminfo = None
    for atype, value in nl.attrs(data, at + DIAG_MSG.size, end):
        if atype == INET_DIAG_SKMEMINFO:
            meminfo = value
    address = socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)
    return Listener(family, address, int.from_bytes(sport, "big"), inode, rqueue, wqueue,
                    skmeminfo_drops(meminfo), uid)


def dump_request(family: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (struct inet_diag_req_v2) for the TCP LISTEN
    sockets of ``family``, with SKMEMINFO."""
    req = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), 0,
                        1 << TCP_LISTEN, b"", b"", b"", b"", 0, b"\xff" * 8)  # INET_DIAG_NOCOOKIE
    return nl.request(SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, req)


def _dump(family: int) -> list[Listener]:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        s.settimeout(5)
        s.send(dump_request(family))
        out: list[Listener] = []
        while not parse_diag_messages(s.recv(1 << 16), out):
            pass
        return out
    finally:
        s.close()


def read_listeners() -> tuple[list[Listener], str]:
    """Every TCP LISTEN socket of the calling thread's netns, IPv4 and IPv6 (a dual-stack [::]
    listener is an IPv6 one), and the error of a family that could not be read ("" when
    both were; OSError when neither was). Its netlink socket is made here, so it lists the
    netns of the calling thread. (Not pyroute2's DiagSocket: its decoding costs about 0.1 ms
    a socket, 100 ms a reading for 1000 listeners, against about 5 us here; and 0.9 does not
    bind the socket to the netns of the thread that constructs it.)"""
    out: list[Listener] = []
    errors = []
    for fam, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        try:
            out += _dump(fam)
        except (OSError, ValueError) as exc:  # e.g. IPv6 disabled: the other family still counts
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    if len(errors) == 2:
        raise OSError("; ".join(errors))
    out.sort(key=lambda x: (x.family, x.address, x.port, x.inode))
    return out, "; ".join(errors)


def sample_netns() -> tuple[list[Listener], str, int | None]:
    """read_listeners() and net.core.somaxconn, both of the calling thread's netns."""
    from dpwatch.daemon.host import sysctl
    found, error = read_listeners()
    return found, error, sysctl.read_int("net.core.somaxconn")


def socket_owners(inodes: Iterable[int], proc: str | None = None, max_fds: int = OWNER_SCAN_MAX_FDS,
                  per_socket: int = OWNERS_PER_SOCKET) -> tuple[dict[int, list[tuple[int, str]]], int, bool]:
    """Processes holding each socket inode, from the /proc/PID/fd links ("socket:[INODE]"):
    ({inode: [(pid, comm), ...] lowest pids first, at most ``per_socket``}, fds read, whether
    the scan stopped at ``max_fds``). Only what this /proc shows: in another pid namespace
    (a container without hostPID) the host's processes are not there, and another user's fd
    links need CAP_SYS_PTRACE (EACCES without it: skipped). ``proc``: paths.proc() unless given."""
    proc = proc or paths.proc()
    want = {f"socket:[{int(i)}]": int(i) for i in inodes}
    found: dict[int, list[tuple[int, str]]] = {i: [] for i in want.values()}
    if not want:
        return found, 0, False
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        return found, 0, False
    scanned = 0
    for pid in pids:
        if all(len(v) >= per_socket for v in found.values()):
            break
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        hit: set[int] = set()
        for fd in fds:
            if scanned >= max_fds:
                return _named(found, proc), scanned, True
            scanned += 1
            try:
                inode = want.get(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                continue
            if inode is not None and inode not in hit and len(found[inode]) < per_socket:
                hit.add(inode)
                found[inode].append((pid, ""))
    return _named(found, proc), scanned, False


def _named(found: dict[int, list[tuple[int, str]]], proc: str) -> dict[int, list[tuple[int, str]]]:
    out = {}
    for inode, owners in found.items():
        named = []
        for pid, _ in owners:
            try:
                with open(f"{proc}/{pid}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                comm = "?"
            named.append((pid, comm))
        out[inode] = named
    return out


# =============================================================================================
# The sampler's memory
# =============================================================================================

@dataclass
class Track:
    endpoint: str
    backlog: int
    peak: int = 0                   # the longest queue a sample saw
    peak_at: float = 0.0
    last_full_at: float | None = None
    full_samples: int = 0
    drops: int | None = None        # sk_drops at the previous sample


class Tracker:
    """What samples of the listeners showed, per socket (inode), bounded: at most ``cap``
    sockets are remembered (those seen with connections queued or drops counted); those the
    last sample could not add are counted in ``untracked``. An entry goes when its socket
    closes, or when nothing was queued on it for ``horizon`` seconds (the longest window)."""

    def __init__(self, cap: int = TRACKED_MAX, horizon: float = 3600.0):
        self.cap, self.horizon = cap, horizon
        self.tracks: dict[int, Track] = {}
        self.untracked = 0

    def observe(self, now: float, listeners: list[Listener]) -> set[int]:
        """Take one sample. Returns the inodes that need their owner named: full now, or
        their drops grew since the previous sample."""
        live = {x.inode for x in listeners}
        for inode in [i for i, t in self.tracks.items()
                      if i not in live or now - max(t.peak_at, t.last_full_at or 0.0) > self.horizon]:
            del self.tracks[inode]
        hot: set[int] = set()
        self.untracked = 0
        for x in listeners:
            t = self.tracks.get(x.inode)
            if t is None:
                if x.queue <= 0 and not x.drops:
                    continue
                if len(self.tracks) >= self.cap:
                    self.untracked += 1
                    continue
                # Drops counted before the first sample are no window's: they set the baseline.
                t = self.tracks[x.inode] = Track(x.endpoint, x.backlog, drops=x.drops)
            t.backlog = x.backlog
            if x.queue >= t.peak or now - t.peak_at > self.horizon:
                t.peak, t.peak_at = x.queue, now
            if x.full:
                t.last_full_at = now
                t.full_samples += 1
                hot.add(x.inode)
            if x.drops is not None and t.drops is not None and x.drops > t.drops:
                hot.add(x.inode)
            t.drops = x.drops
        return hot

    def view(self, now: float) -> dict[int, dict[str, Any]]:
        """inode -> what the samples saw, with ages in seconds (for the reading)."""
        return {inode: {"queue_peak": t.peak, "queue_peak_seconds_ago": round(now - t.peak_at, 1),
                        "last_full_seconds_ago": (round(now - t.last_full_at, 1)
                                                  if t.last_full_at is not None else None),
                        "full_samples": t.full_samples}
                for inode, t in self.tracks.items()}


@dataclass
class ListenSample:
    """The listeners part of a node reading (the fresh one a report is made from)."""
    listeners: list[Listener] = field(default_factory=list)
    somaxconn: int | None = None
    tracked: dict[int, dict[str, Any]] = field(default_factory=dict)
    owners: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    untracked: int = 0
    error: str = ""
    ok: bool = True        # False: no listener could be read (error says why)


def drop_counters(listeners: list[Listener], cap: int = TRACKED_MAX) -> dict[tuple[int], int]:
    """The reading's per-socket drop counters: {(inode,): sk_drops} of the listeners that
    dropped anything, the ``cap`` biggest (a socket not listed counts from 0)."""
    rows = sorted((x for x in listeners if x.drops), key=lambda x: -x.drops)[:cap]
    return {(x.inode,): x.drops for x in rows}
