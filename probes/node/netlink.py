"""The netlink framing the node audit reads (nfnetlink, sock_diag): message and attribute walks."""

from __future__ import annotations

import os
import struct
from typing import Iterator

NLMSG_HDR = struct.Struct("=IHHII")   # struct nlmsghdr: length, type, flags, seq, pid
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF                # without NLA_F_NESTED and NLA_F_NET_BYTEORDER


def align(n: int) -> int:
    return (n + 3) & ~3


def request(mtype: int, flags: int, body: bytes, seq: int = 1) -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), mtype, flags, seq, 0) + body


def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(offset, length, type, flags) of each netlink message in ``data``; ValueError on a
    truncated one."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, mtype, flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            raise ValueError(f"truncated netlink message at {off} (length {length})")
        yield off, length, mtype, flags
        off += align(length)


def check_error(data: bytes, off: int) -> None:
    """An NLMSG_ERROR message at ``off``: OSError unless it is an ACK (error 0)."""
    (err,) = struct.unpack_from("=i", data, off + NLMSG_HDR.size)
    if err:
        raise OSError(-err, os.strerror(-err))


def attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each attribute between ``start`` and ``end``, in order."""
    a = start
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, a)
        if alen < 4:
            break
        yield atype & NLA_TYPE_MASK, data[a + 4:a + alen]
        a += align(alen)
