"""The other end of a veth, read from this netns without entering the other one.

A veth whose peer lives in another netns shows that netns as IFLA_LINK_NETNSID (a number
this netns gives it) and the peer's ifindex as IFLA_LINK. RTM_GETLINK with
IFLA_TARGET_NETNSID set to that number (kernel 4.20+; 4.15-4.19 call it IFLA_IF_NETNSID)
returns the peer's link from its own netns: name, MTU, kind. It needs CAP_NET_ADMIN (in the
target netns' user namespace), not setns(2) and not CAP_SYS_ADMIN.

The netns itself is named by RTM_GETNSID with NETNSA_FD: an open fd of /run/netns/<name> or
/proc/<pid>/ns/net (opening those needs no CAP_SYS_ADMIN) gives the nsid this netns numbers
it by; a match names the nsid. /proc/<pid>/ns/net of a process with more capabilities than
ours cannot be opened (ptrace access rules) and is skipped.

Raw netlink on purpose: pyroute2 0.9.7's ``link("get", index=..., target_nsid=...)`` did not
send the attribute (the kernel looked in our own netns and answered ENODEV). Every reply is
checked to echo IFLA_TARGET_NETNSID, so a kernel that ignores the attribute cannot pass off
one of our own links as the peer.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterable

from dpwatch.daemon.host import paths

NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWNSID, RTM_GETNSID = 88, 90
IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 3, 4, 5, 10
IFLA_LINKINFO, IFLA_EXT_MASK, IFLA_LINK_NETNSID, IFLA_TARGET_NETNSID = 18, 29, 37, 46
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3     # smaller replies; older kernels ignore the bit
NETNSA_NSID, NETNSA_FD = 1, 3
NLA_TYPE_MASK = 0x3FFF               # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
IFF_UP = 0x1
ARPHRD_LOOPBACK = 772

_NLMSGHDR = struct.Struct("=IHHII")    # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_RTGENMSG_LEN = 4                      # struct rtgenmsg (1 byte), aligned


class PeerError(OSError):
    """The kernel refused a read (errno set), or answered something that is not the peer."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (_align(len(payload)) - len(payload))


def _message(kind: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def build_getlink(seq: int, index: int, nsid: int) -> bytes:
    """RTM_GETLINK for ifindex ``index`` in the netns this netns numbers ``nsid``."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, int(index), 0, 0)
    body += _attr(IFLA_TARGET_NETNSID, struct.pack("=i", int(nsid)))
    body += _attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
    return _message(RTM_GETLINK, seq, body)


def build_getnsid(seq: int, fd: int) -> bytes:
    """RTM_GETNSID: the nsid this netns gives the netns open at ``fd``."""
    return _message(RTM_GETNSID, seq, b"\0" * _RTGENMSG_LEN + _attr(NETNSA_FD, struct.pack("=I", int(fd))))


def parse_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in ``data``; a truncated tail is dropped."""
    out, off = [], 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        out.append((kind, seq, data[off + _NLMSGHDR.size:off + length]))
        off += _align(length)
    return out


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attribute type -> payload (the first of each type); a truncated tail is dropped."""
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4 or off + length > len(data):
            break
        out.setdefault(kind & NLA_TYPE_MASK, data[off + 4:off + length])
        off += _align(length)
    return out


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def _s32(raw: bytes | None) -> int | None:
    return struct.unpack("=i", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def _text(raw: bytes | None) -> str | None:
    if not raw:
        return None
    try:
        return raw.split(b"\0", 1)[0].decode() or None
    except UnicodeDecodeError:
        return None


def error_of(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR payload (0: an ACK)."""
    return -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EPROTO


def parse_link(payload: bytes) -> dict:
    """An RTM_NEWLINK payload as the MTU audit's link record, plus ``target_netnsid`` (the
    IFLA_TARGET_NETNSID the kernel echoes when it answered for another netns)."""
    if len(payload) < _IFINFOMSG.size:
        raise PeerError(errno.EPROTO, "short RTM_NEWLINK")
    _family, ifi_type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    attrs = parse_attrs(payload[_IFINFOMSG.size:])
    kind = _text(parse_attrs(attrs.get(IFLA_LINKINFO, b"")).get(IFLA_INFO_KIND))
    if not kind:
        kind = "loopback" if ifi_type == ARPHRD_LOOPBACK else "device"
    return {"index": index, "name": _text(attrs.get(IFLA_IFNAME)) or f"if{index}", "kind": kind,
            "mtu": _u32(attrs.get(IFLA_MTU)) or 0, "up": bool(flags & IFF_UP),
            "master": _u32(attrs.get(IFLA_MASTER)) or None, "link": _u32(attrs.get(IFLA_LINK)),
            "link_netnsid": _s32(attrs.get(IFLA_LINK_NETNSID)), "lower": None, "family": None,
            "target_netnsid": _s32(attrs.get(IFLA_TARGET_NETNSID))}


def parse_nsid(payload: bytes) -> int | None:
    """The nsid of an RTM_NEWNSID payload; None when the netns has none (NETNSA_NSID_NOT_ASSIGNED)."""
    nsid = _s32(parse_attrs(payload[_RTGENMSG_LEN:]).get(NETNSA_NSID))
    return nsid if nsid is not None and nsid >= 0 else None


def describe(exc: BaseException) -> str:
    """A short reason for /probes, with the errno's name where there is one."""
    err = getattr(exc, "errno", None)
    name = errno.errorcode.get(err, "") if isinstance(err, int) else ""
    text = getattr(exc, "strerror", None) or str(exc)
    return f"{name}: {text}" if name else text


class PeerReader:
    """A NETLINK_ROUTE socket of the calling thread's netns (a socket stays in the netns it was
    made in, so it may be used from any thread afterwards, one at a time)."""

    def __init__(self, timeout: float = 2.0):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(timeout)
        except OSError:
            self.sock.close()
            raise
        self._seq = 0

    def __enter__(self) -> "PeerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _request(self, build, *args) -> tuple[int, bytes]:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        seq = self._seq
        self.sock.send(build(seq, *args))
        while True:  # replies to an earlier, timed-out request are skipped by their seq
            for kind, got, payload in parse_messages(self.sock.recv(65536)):
                if got != seq or kind == NLMSG_DONE:
                    continue
                if kind == NLMSG_ERROR:
                    err = error_of(payload)
                    raise PeerError(err, os.strerror(err) if err else "no reply")
                return kind, payload

    def get_link(self, index: int, nsid: int) -> dict:
        """The link at ``index`` in the netns numbered ``nsid``; PeerError when the kernel
        refuses, or answers from our own netns (it ignored IFLA_TARGET_NETNSID)."""
        kind, payload = self._request(build_getlink, index, nsid)
        if kind != RTM_NEWLINK:
            raise PeerError(errno.EPROTO, f"unexpected reply type {kind}")
        rec = parse_link(payload)
        if rec["target_netnsid"] != nsid or rec["index"] != index:
            raise PeerError(errno.EOPNOTSUPP, "the kernel ignored IFLA_TARGET_NETNSID (before 4.15)")
        return rec

    def get_nsid(self, fd: int) -> int | None:
        kind, payload = self._request(build_getnsid, fd)
        if kind != RTM_NEWNSID:
            raise PeerError(errno.EPROTO, f"unexpected reply type {kind}")
        return parse_nsid(payload)


def netns_paths() -> Iterable[str]:
    """Where a netns can be opened without setns: /run/netns/*, then /proc/<pid>/ns/net
    (generated lazily: the /proc walk only happens while nsids are left to name)."""
    try:
        names = sorted(os.listdir("/run/netns"))
    except OSError:
        names = []
    for name in names:
        yield os.path.join("/run/netns", name)
    for pid in paths.pids():
        yield paths.proc(str(pid), "ns", "net")


def name_nsids(reader: PeerReader, wanted: set[int], own_inode: int | None,
               limit: int = 4096) -> dict[int, tuple[int, str]]:
    """{nsid: (netns inode, a path to it)} for the ``wanted`` nsids that a netns file this
    process can open matches. At most ``limit`` files are opened; each inode is asked once."""
    found: dict[int, tuple[int, str]] = {}
    seen: set[int] = set() if own_inode is None else {own_inode}
    opened = 0
    for path in netns_paths():
        if not wanted - set(found) or opened >= limit:
            break
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue  # gone, or not ours to look at
        if ino in seen:
            continue
        seen.add(ino)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        opened += 1
        try:
            if os.fstat(fd).st_ino != ino:
                continue  # the pid died and was reused between stat and open
            nsid = reader.get_nsid(fd)
        except OSError:
            continue
        finally:
            os.close(fd)
        if nsid in wanted and nsid not in found:
            found[nsid] = (ino, path)
    return found
