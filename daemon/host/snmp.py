"""/proc/net/snmp and /proc/net/snmp6: parse them, and read them from a held file.

Files are opened through /proc/thread-self/net, so they stay bound to the netns of the
thread that opened them (the daemon's own), and are re-read with pread at offset 0.
"""

from __future__ import annotations

import os

from dpwatch.daemon.host import paths


def parse_snmp(text: str) -> dict[str, dict[str, int]]:
    """'Ip: Forwarding ...' header lines followed by value lines -> {"Ip": {"Forwarding": 1, ...}}."""
    out: dict[str, dict[str, int]] = {}
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) % 2:  # zip() below would drop a trailing header without its values
        raise ValueError(f"unpaired snmp lines: {lines[-1][:1]} / []")
    for head, vals in zip(lines[0::2], lines[1::2]):
        if not head or head[0] != vals[0] or not head[0].endswith(":"):
            raise ValueError(f"unpaired snmp lines: {head[:1]} / {vals[:1]}")
        if len(head) != len(vals):
            raise ValueError(f"{head[0]} has {len(head) - 1} names and {len(vals) - 1} values")
        out[head[0][:-1]] = {k: int(v) for k, v in zip(head[1:], vals[1:])}
    return out


def parse_snmp6(text: str) -> dict[str, int]:
    """'Ip6InReceives  123' lines -> {"Ip6InReceives": 123, ...}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"bad snmp6 line: {line!r}")
        out[parts[0]] = int(parts[1])
    return out


class SnmpFiles:
    """/proc/net/snmp and snmp6 of the calling thread's netns, held open."""

    def __init__(self):
        self._v4 = open(paths.proc("thread-self", "net", "snmp"), "rb", buffering=0)
        try:
            self._v6 = open(paths.proc("thread-self", "net", "snmp6"), "rb", buffering=0)
        except OSError:  # IPv6 disabled
            self._v6 = None

    def read(self) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        v4 = parse_snmp(os.pread(self._v4.fileno(), 1 << 17, 0).decode())
        v6 = parse_snmp6(os.pread(self._v6.fileno(), 1 << 17, 0).decode()) if self._v6 else {}
        return v4, v6

    def close(self) -> None:
        self._v4.close()
        if self._v6:
            self._v6.close()
