"""iptables-legacy (and ip6tables-legacy) rules counted through the kernel: getsockopt
IPT_SO_GET_INFO / IPT_SO_GET_ENTRIES on a raw socket, for the tables the netns already has
(/proc/thread-self/net/ip_tables_names). Call from a thread in the netns to read."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from dpwatch.daemon.host import paths

IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES = 64, 65
HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# (socket family, sockopt level, offset of target_offset in struct ipt_entry / ip6t_entry)
LEGACY = {"ipv4": (socket.AF_INET, socket.IPPROTO_IP, 88, "ip_tables_names"),
          "ipv6": (socket.AF_INET6, socket.IPPROTO_IPV6, 140, "ip6_tables_names")}
GETINFO = struct.Struct("=32sI5I5III")   # struct ipt_getinfo (84 bytes)
GET_ENTRIES_HEADER = 40                  # struct ipt_get_entries: name[32], size, pad to 8


def _getsockopt(fd: int, level: int, opt: int, buf: ctypes.Array) -> None:
    size = ctypes.c_uint(len(buf))
    if paths.libc().getsockopt(fd, level, opt, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _get_info(fd: int, level: int, table: str) -> tuple:
    """struct ipt_getinfo of ``table``: (name, valid_hooks, hook_entry x5, underflow x5,
    num_entries, size)."""
    info = ctypes.create_string_buffer(GETINFO.pack(table.encode(), 0, *([0] * 10), 0, 0), GETINFO.size)
    _getsockopt(fd, level, IPT_SO_GET_INFO, info)
    return GETINFO.unpack(info.raw)


def _tables(names_file: str) -> list[str]:
    """The legacy tables this netns has; OSError when the kernel has no legacy tables."""
    with open(paths.proc("thread-self", "net", names_file)) as fh:
        return [t.strip() for t in fh if t.strip()]


def _entries(blob: bytes, target_off_at: int) -> list[tuple[int, str, str]]:
    """(offset, target name, error name) of each entry of a table's blob."""
    entries = []
    off = 0
    while off < len(blob):
        if off + target_off_at + 4 > len(blob):
            raise ValueError(f"truncated entry at {off}")
        t_off, n_off = struct.unpack_from("=HH", blob, off + target_off_at)
        if n_off <= 0 or t_off + 32 > n_off or off + n_off > len(blob):
            raise ValueError(f"bad entry at {off}: target_offset {t_off}, next_offset {n_off}")
        tname = blob[off + t_off + 2:off + t_off + 31].split(b"\0", 1)[0].decode(errors="replace")
        ename = ""
        if tname == "ERROR":
            ename = blob[off + t_off + 32:off + n_off].split(b"\0", 1)[0].decode(errors="replace")
        entries.append((off, tname, ename))
        off += n_off
    return entries


def parse_legacy_entries(blob: bytes, hook_entry: tuple[int, ...], underflow: tuple[int, ...],
                         valid_hooks: int, target_off_at: int) -> dict[str, int]:
    """An iptables-legacy table's entry blob (IPT_SO_GET_ENTRIES) -> rules per chain.

    The blob holds, in order, each chain's entries: a built-in chain starts at its hook_entry
    offset and ends with its policy at the underflow offset; a user chain starts with an ERROR
    entry naming it and ends with a RETURN; a last ERROR entry closes the table. Rules are the
    entries that are none of those."""
    starts = {hook_entry[h]: HOOK_NAMES[h] for h in range(5) if valid_hooks & (1 << h)}
    policies = {underflow[h] for h in range(5) if valid_hooks & (1 << h)}
    entries = _entries(blob, target_off_at)
    rules: dict[str, int] = {}
    chain = None
    for i, (off, tname, ename) in enumerate(entries):
        last = i == len(entries) - 1
        if off in starts:
            chain = starts[off]
            rules.setdefault(chain, 0)
        if tname == "ERROR":
            chain = None if last else ename
            if chain is not None:
                rules.setdefault(chain, 0)
            continue
        if chain is None or off in policies:
            continue
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        if chain not in HOOK_NAMES and nxt is not None and nxt[1] == "ERROR":
            continue  # a user chain's closing RETURN
        rules[chain] += 1
    return rules


def _table_rules(fd: int, level: int, table: str, target_off_at: int) -> dict[str, int] | None:
    """One table's rules per chain; None when it changed between the two calls (ask again)."""
    fields = _get_info(fd, level, table)
    valid, hooks, under, size = fields[1], fields[2:7], fields[7:12], fields[13]
    req = ctypes.create_string_buffer(
        struct.pack("=32sI", table.encode(), size) + b"\0" * (GET_ENTRIES_HEADER - 36 + size),
        GET_ENTRIES_HEADER + size)
    try:
        _getsockopt(fd, level, IPT_SO_GET_ENTRIES, req)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return None
        raise
    return parse_legacy_entries(req.raw[GET_ENTRIES_HEADER:GET_ENTRIES_HEADER + size],
                                hooks, under, valid, target_off_at)


def legacy_rule_counts(family: str) -> dict[tuple[str, str], int] | None:
    """iptables-legacy (or ip6tables-legacy) rules of this netns per (table, chain), or None
    when the kernel has no legacy tables. Only tables the netns already has are asked for
    (asking for another one would make the kernel create it)."""
    fam, level, target_off_at, names_file = LEGACY[family]
    try:
        tables = _tables(names_file)
    except OSError:
        return None
    out: dict[tuple[str, str], int] = {}
    if not tables:
        return out
    s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for table in tables:
            for _attempt in range(3):
                per_chain = _table_rules(s.fileno(), level, table, target_off_at)
                if per_chain is None:
                    continue
                for chain, n in per_chain.items():
                    out[(table, chain)] = n
                break
    finally:
        s.close()
    return out


def legacy_table_sizes(family: str) -> tuple[tuple[str, int], ...] | None:
    """(table, entries) of each legacy table of this netns: one IPT_SO_GET_INFO each, cheap
    enough for every sampler pass. None when there are no legacy tables (or no raw socket)."""
    fam, level, _off, names_file = LEGACY[family]
    try:
        tables = _tables(names_file)
    except OSError:
        return None
    if not tables:
        return None
    try:
        sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError:
        return None
    sizes = []
    try:
        for table in tables:
            try:
                sizes.append((table, _get_info(sock.fileno(), level, table)[12]))
            except OSError:
                continue
    finally:
        sock.close()
    return tuple(sizes)
