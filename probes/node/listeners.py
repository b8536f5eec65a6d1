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

Halves, as in nodeaudit.py:

- gathering: ``read_listeners()`` (call it in a thread that lives in the netns to read: it
  makes its netlink socket there), ``socket_owners()`` (a bounded /proc/*/fd scan), and
  ``Tracker``, the bounded memory of listeners seen with connections queued;
- checking: ``culprits()``, ``recommended_backlog()`` and ``remediation()``, pure functions
  of a ``ListenWindow`` (the window's counter deltas and the last sample) used by
  nodeaudit.check_listen_overflow.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

TCP_LISTEN = 10
INET_DIAG_SKMEMINFO = 7       # rtattr type; requested with idiag_ext bit (1 << (7 - 1))
SK_MEMINFO_DROPS = 8          # index of sk_drops in the SKMEMINFO u32 array
TRACKED_MAX = 256             # listeners remembered with queued connections / counted drops
OWNER_SCAN_MAX_FDS = 200_000  # /proc/*/fd links read at most per owner scan
OWNERS_PER_SOCKET = 3         # processes named per socket (pre-fork servers share one)
OWNER_RETRY_SECONDS = 60.0    # a socket no process was found for is looked up again after this
NAMED_MAX = 5                 # listeners named in a finding
BACKLOG_MIN = 128             # the smallest listen() backlog dpwatch recommends
BACKLOG_FACTOR = 4            # ... else 4x what overflowed, to the next power of two

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSG_HDR = struct.Struct("=IHHII")
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
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            raise ValueError(f"truncated netlink message at {off} (length {length})")
        body = off + NLMSG_HDR.size
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, body)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif mtype == SOCK_DIAG_BY_FAMILY and length >= NLMSG_HDR.size + DIAG_MSG.size:
            listener = _listener(data, body, off + length)
            if listener is not None:
                out.append(listener)
        off += (length + 3) & ~3
    return False


def _listener(data: bytes, at: int, end: int) -> Listener | None:
    (fam, state, _timer, _retrans, sport, _dport, src, _dst, _ifindex, _cookie, _expires,
     rqueue, wqueue, uid, inode) = DIAG_MSG.unpack_from(data, at)
    family = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(fam)
    if state != TCP_LISTEN or family is None:
        return None
    meminfo = None
    a = at + DIAG_MSG.size
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, a)
        if alen < 4:
            break
        if atype & 0x3FFF == INET_DIAG_SKMEMINFO:
            meminfo = data[a + 4:a + alen]
        a += (alen + 3) & ~3
    address = socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)
    return Listener(family, address, int.from_bytes(sport, "big"), inode, rqueue, wqueue,
                    skmeminfo_drops(meminfo), uid)


def dump_request(family: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (struct inet_diag_req_v2) for the TCP LISTEN
    sockets of ``family``, with SKMEMINFO."""
    req = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), 0,
                        1 << TCP_LISTEN, b"", b"", b"", b"", 0, b"\xff" * 8)  # INET_DIAG_NOCOOKIE
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          1, 0) + req


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


def socket_owners(inodes: Iterable[int], proc: str = "/proc", max_fds: int = OWNER_SCAN_MAX_FDS,
                  per_socket: int = OWNERS_PER_SOCKET) -> tuple[dict[int, list[tuple[int, str]]], int, bool]:
    """Processes holding each socket inode, from the /proc/PID/fd links ("socket:[INODE]"):
    ({inode: [(pid, comm), ...] lowest pids first, at most ``per_socket``}, fds read, whether
    the scan stopped at ``max_fds``). Only what this /proc shows: in another pid namespace
    (a container without hostPID) the host's processes are not there, and another user's fd
    links need CAP_SYS_PTRACE (EACCES without it: skipped)."""
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


# =============================================================================================
# Checking (pure)
# =============================================================================================

@dataclass
class ListenWindow:
    """A report window's view of the listen queues: the netns counters' deltas (TcpExt
    ListenOverflows and ListenDrops, Tcp PassiveOpens), each socket's drops in the window
    ({inode: n}, from the reading's counters) and the fresh sample."""
    seconds: float
    overflows: int = 0
    drops: int = 0
    passive_opens: int = 0
    socket_drops: dict[int, int] = field(default_factory=dict)
    sample: ListenSample | None = None

    @property
    def somaxconn(self) -> int | None:
        return self.sample.somaxconn if self.sample else None


@dataclass
class Culprit:
    listener: Listener
    drops_in_window: int
    tracked: dict[str, Any]
    owners: list[tuple[int, str]] | None   # None: not looked up (yet)
    capped: bool | None                    # None: somaxconn unknown
    basis: str                             # "socket drops" | "seen full"

    def who(self) -> str:
        """'198.18.0.1:80 (nginx, pids 10, 11)': the endpoint and, when known, its owners."""
        if not self.owners:
            return self.listener.endpoint
        by_comm: dict[str, list[int]] = {}
        for pid, comm in self.owners:
            by_comm.setdefault(comm, []).append(pid)
        names = "; ".join(f"{comm}, pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"
                          for comm, pids in by_comm.items())
        return f"{self.listener.endpoint} ({names})"

    def evidence(self) -> dict[str, Any]:
        x, t = self.listener, self.tracked
        ev: dict[str, Any] = {"listener": x.endpoint, "process": None}
        if self.owners:
            ev["process"] = {"pid": self.owners[0][0], "comm": self.owners[0][1]}
            if len(self.owners) > 1:
                ev["other_pids"] = [pid for pid, _ in self.owners[1:]]
        ev.update({
            "effective_backlog": x.backlog, "queue_now": x.queue, "full_now": x.full,
            "capped_by_somaxconn": self.capped, "socket_drops_in_window": self.drops_in_window,
            "attributed_by": self.basis, "queue_peak_seen": max(t.get("queue_peak", 0), x.queue),
            "last_full_seconds_ago": 0.0 if x.full else t.get("last_full_seconds_ago"),
        })
        return ev


def culprits(lw: ListenWindow) -> list[Culprit]:
    """The listeners whose queues overflowed in the window, likeliest first: those whose own
    drop counter grew (exact attribution); when none did (the socket closed since, or the
    kernel gives no SKMEMINFO), those a sample found full in the window or that are full now."""
    s = lw.sample
    if s is None:
        return []

    def make(x: Listener, basis: str) -> Culprit:
        capped = None if s.somaxconn is None else x.backlog == s.somaxconn
        return Culprit(x, int(lw.socket_drops.get(x.inode, 0)), s.tracked.get(x.inode, {}),
                       s.owners.get(x.inode), capped, basis)

    dropped = [make(x, "socket drops") for x in s.listeners if lw.socket_drops.get(x.inode, 0) > 0]
    if dropped:
        return sorted(dropped, key=lambda c: (-c.drops_in_window, c.listener.endpoint))

    def seen_full(x: Listener) -> bool:
        age = s.tracked.get(x.inode, {}).get("last_full_seconds_ago")
        return x.full or (age is not None and age <= lw.seconds)
    full = [make(x, "seen full") for x in s.listeners if seen_full(x)]
    return sorted(full, key=lambda c: (not c.listener.full, -c.listener.queue, c.listener.endpoint))


def recommended_backlog(backlog: int, somaxconn: int | None) -> int:
    """The listen() backlog to advise for a listener that overflowed with ``backlog`` and is
    not capped by somaxconn: 4x the connections it held (backlog + 1), to the next power of
    two, at least 128, and no more than somaxconn allows (past that the kernel caps it)."""
    from dpwatch.probes.node.audit import pow2_at_least
    want = max(BACKLOG_MIN, pow2_at_least(BACKLOG_FACTOR * (backlog + 1)))
    return min(want, somaxconn) if somaxconn else want


def recommended_somaxconn(somaxconn: int) -> int:
    """For a listener capped by somaxconn: twice the cap, and at least the kernel default."""
    from dpwatch.probes.node.audit import SOMAXCONN_RECOMMENDED
    return max(2 * somaxconn, SOMAXCONN_RECOMMENDED)


def remediation(found: list[Culprit], somaxconn: int | None) -> list[str]:
    """Fix lines for the named listeners: the application's backlog where somaxconn does not
    cap it, somaxconn (and then the backlog) only where it does."""
    fix: list[str] = []
    capped = [c for c in found if c.capped]
    if capped and somaxconn:
        want = recommended_somaxconn(somaxconn)
        fix.append(f"sysctl -w net.core.somaxconn={want}")
        for c in capped[:3]:
            fix.append(f"{c.who()}: its backlog {c.listener.backlog} is capped by somaxconn; after the "
                       f"sysctl it must call listen() again with a backlog of {want} (restart it: the cap "
                       "applies at listen() time; Go and listen(-1) ask for somaxconn itself)")
    for c in [c for c in found if not c.capped][:3]:
        want = recommended_backlog(c.listener.backlog, somaxconn)
        cap = f"; somaxconn={somaxconn} does not cap it, no sysctl helps" if somaxconn else ""
        if want > c.listener.backlog:
            fix.append(f"{c.who()}: raise its listen() backlog from {c.listener.backlog} to {want}, "
                       f"or make it accept() faster (more workers, nothing slow on the accept path){cap}")
        else:
            fix.append(f"{c.who()}: its backlog {c.listener.backlog} is already at or above what "
                       f"somaxconn={somaxconn} allows; make it accept() faster (more workers, nothing "
                       "slow on the accept path)")
    if found:
        fix.append(f"ss -ltnp 'sport = :{found[0].listener.port}'   # Recv-Q above Send-Q: its accept "
                   "queue is full")
    else:
        fix.append("ss -ltnp | awk 'NR == 1 || $2 > $3'   # listeners whose accept queue is full now "
                   "(Recv-Q above Send-Q)")
    fix.append("nstat -az TcpExtListenOverflows TcpExtListenDrops   # should stop growing")
    return fix
