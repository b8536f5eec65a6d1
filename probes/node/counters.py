"""The cheap counters every node reading takes: whether a limit is being hit right now.

The files are opened once, from the attaching thread (so the per-netns ones stay bound to the
daemon's netns), and read again at each reading; ``limit_counters()`` turns their texts into
the reading's "limits" counters.
"""

from __future__ import annotations

from typing import Callable

from dpwatch.daemon.host import paths
from dpwatch.daemon.host.snmp import parse_snmp, parse_snmp6


def files() -> dict[str, str]:
    """key -> the path each reading reads."""
    return {"netstat": paths.proc("thread-self", "net", "netstat"),
            "snmp": paths.proc("thread-self", "net", "snmp"),
            "snmp6": paths.proc("thread-self", "net", "snmp6"),
            "softnet": paths.proc("net", "softnet_stat"),
            "ct_stat": paths.proc("thread-self", "net", "stat", "nf_conntrack"),
            "ct_count": paths.proc("sys", "net", "netfilter", "nf_conntrack_count")}


def parse_softnet_dropped(text: str) -> int:
    """Column 2 of /proc/net/softnet_stat (hex, one row per CPU): packets dropped because the
    CPU's input backlog (netdev_max_backlog) was full."""
    total = 0
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) >= 2:
            total += int(parts[1], 16)
    return total


def parse_ct_drops(text: str) -> int:
    """The 'drop' column of /proc/net/stat/nf_conntrack, summed over CPUs."""
    rows = [ln.split() for ln in text.strip().splitlines() if ln.strip()]
    if len(rows) < 2 or "drop" not in rows[0]:
        return 0
    i = rows[0].index("drop")
    return sum(int(r[i], 16) for r in rows[1:] if len(r) > i)


def limit_counters(read: Callable[[str], str | None]) -> dict[tuple[str], int]:
    """The "limits" counters from ``read(key)`` (a file's text, None when it is not there)."""
    c: dict[tuple[str], int] = {}
    text = read("netstat")
    if text:
        ext = parse_snmp(text).get("TcpExt", {})
        c[("listen_overflows",)] = ext.get("ListenOverflows", 0)
        c[("listen_drops",)] = ext.get("ListenDrops", 0)
    text = read("snmp")
    errs = 0
    if text:
        snmp = parse_snmp(text)
        udp = snmp.get("Udp", {})
        errs += udp.get("RcvbufErrors", 0) + udp.get("SndbufErrors", 0)
        c[("passive_opens",)] = snmp.get("Tcp", {}).get("PassiveOpens", 0)
    text = read("snmp6")
    if text:
        v6 = parse_snmp6(text)
        errs += v6.get("Udp6RcvbufErrors", 0) + v6.get("Udp6SndbufErrors", 0)
    c[("buffer_errors",)] = errs
    text = read("softnet")
    if text:
        c[("backlog_drops",)] = parse_softnet_dropped(text)
    text = read("ct_stat")
    if text:
        c[("conntrack_drops",)] = parse_ct_drops(text)
    return c
