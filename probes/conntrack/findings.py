"""The conntrack probe's findings: one pure function per finding id.

``tables(window, multi)`` turns a window of the conntrack reading into one ``TableWindow`` per
netns (its fill, drops, early drops and insert failures, the drops probe's NETFILTER_DROP count
in correlated mode, the kprobes' events and recent flows in kprobe mode, and the node facts
collect() read: the sysctls). Each finding function reads one TableWindow plus the config
values it needs and returns a Finding or None. Nothing here reads /proc or a sysctl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dpwatch.probes.base import Finding, Window

PROBE = "conntrack"
ENTRY_BYTES = 320  # approximate kernel memory per conntrack entry (struct nf_conn + hash)
TCP_TIMEOUT_ESTABLISHED = "net.netfilter.nf_conntrack_tcp_timeout_established"
# The sysctls the findings' advice reads; collect() reads them into reading["info"]["sysctls"].
SYSCTLS = (TCP_TIMEOUT_ESTABLISHED,)
RECENT_IN_EVIDENCE = 8  # recent drop flows shown in a table_full finding


@dataclass(frozen=True)
class TableWindow:
    """One netns's conntrack table over a window, as the findings read it."""
    seconds: float
    netns: int
    multi: bool                      # every netns is watched: titles and evidence name it
    entries: int | None
    maximum: int | None
    buckets: int | None
    drops: int                       # 0 for a netns first seen in this window (a baseline)
    early: int
    failed: int
    nf_drops: int | None = None      # correlated mode: NETFILTER_DROP increase (drops probe)
    kprobe_table_full: int | None = None  # kprobe mode: table-full events seen by the kprobes
    recent: tuple[dict, ...] = ()    # kprobe mode: this netns's drop flows within the window
    sysctls: Mapping[str, int | None] | None = None  # node facts read by collect()

    @property
    def fill(self) -> float | None:
        if self.entries is None or not self.maximum:
            return None
        return 100.0 * self.entries / self.maximum

    @property
    def where(self) -> str:
        return f" in netns {self.netns}" if self.multi else ""

    def rate(self, value: float) -> float:
        return value / self.seconds

    def is_full(self, full_percent: float) -> bool:
        """Drops or early drops in the window, or the fill at the full threshold. Early drops
        happen only when an entry is needed and the table is at its limit: the table was full
        in the window even if entries have expired since."""
        fill = self.fill
        return bool(self.drops or self.early or (fill is not None and fill >= full_percent))


def tables(window: Window, multi: bool) -> list[TableWindow]:
    """One TableWindow per netns seen in the window's gauges or counters, in inode order."""
    d = window.delta("stats")
    new = window.new
    g = new["gauges"]
    recent = new.get("info", {}).get("recent", [])
    sysctls = new.get("info", {}).get("sysctls") or {}
    nf_drops = (int(sum(window.delta("netfilter_drops").values()))
                if "netfilter_drops" in new["counters"] else None)
    events = window.delta("events") if "events" in new["counters"] else None
    old_gauges = (window.old or {}).get("gauges", {}).get("entries")
    out = []
    for ino in sorted(set(g["entries"]) | {i for i, _ in d}):
        # A netns first seen after the window began brings its lifetime counters: they are a
        # baseline, not an increase in this window.
        fresh = window.old is not None and old_gauges is not None and ino not in old_gauges
        out.append(TableWindow(
            seconds=window.seconds, netns=ino, multi=multi,
            entries=g["entries"].get(ino), maximum=g["max"].get(ino), buckets=g["buckets"].get(ino),
            drops=0 if fresh else int(d.get((ino, "drop"), 0)),
            early=0 if fresh else int(d.get((ino, "early_drop"), 0)),
            failed=0 if fresh else int(d.get((ino, "insert_failed"), 0)),
            nf_drops=nf_drops,
            kprobe_table_full=None if events is None else int(events.get(("table_full",), 0)),
            recent=tuple(r for r in recent if (not multi or r["netns"] == ino)
                         and r["seconds_ago"] <= window.seconds),
            sysctls=sysctls))
    return out


def evidence(t: TableWindow, full_percent: float) -> dict[str, Any]:
    """The evidence of every conntrack finding of one netns; when the table is full, with
    what the mode adds (NETFILTER_DROP explained, kprobe events, recent drop flows)."""
    fill = t.fill
    ev = {"entries": t.entries, "max": t.maximum,
          "fill_percent": round(fill, 1) if fill is not None else None,
          "drops": t.drops, "drops_per_second": round(t.rate(t.drops), 3),
          "early_drops": t.early, "insert_failed": t.failed,
          "window_seconds": round(t.seconds, 1)}
    if t.multi:
        ev["netns"] = t.netns
    ev = {k: v for k, v in ev.items() if v is not None}
    if not t.is_full(full_percent):
        return ev
    if t.nf_drops is not None:
        ev["netfilter_drops"] = t.nf_drops
        ev["netfilter_drops_explained"] = min(t.nf_drops, t.drops)
    if t.kprobe_table_full is not None:
        ev["kprobe_table_full_events"] = t.kprobe_table_full
    if t.recent:
        ev["recent_drops"] = [{"flow": r["flow"], "netns": r["netns"], "event": r["event"],
                               "count": r["count"], "seconds_ago": r["seconds_ago"]}
                              for r in t.recent[:RECENT_IN_EVIDENCE]]
    return ev


def table_full(t: TableWindow, full_percent: float) -> Finding | None:
    """conntrack.table_full: drops, early drops, or the fill at --conntrack-full-percent."""
    if not t.is_full(full_percent):
        return None
    ev = evidence(t, full_percent)
    return Finding(
        id="conntrack.table_full", probe=PROBE, severity="critical",
        title=f"Conntrack table full{t.where}",
        summary=full_summary(t.where, t.entries, t.maximum, ev.get("fill_percent"), t.drops, t.early,
                             t.seconds),
        evidence=ev, remediation=remedy(t.entries, t.maximum, t.buckets, _timeout(t)),
        claims=tuple(k for k, n in (("drops", t.drops), ("early_drops", t.early)) if n)
        or ("fill_percent",),
        impact=t.rate(t.drops) or t.rate(t.early) or 1.0)


def table_pressure(t: TableWindow, pressure_percent: float, full_percent: float) -> Finding | None:
    """conntrack.table_pressure: the fill at --conntrack-pressure-percent, the table not full."""
    fill = t.fill
    if t.is_full(full_percent) or fill is None or fill < pressure_percent:
        return None
    return Finding(
        id="conntrack.table_pressure", probe=PROBE, severity="warning",
        title=f"Conntrack table filling up{t.where}",
        summary=(f"The conntrack table{t.where} is {fill:.1f}% full ({t.entries} of {t.maximum}). "
                 f"At {full_percent:g}% and above, bursts of new connections "
                 "will be dropped."),
        evidence=evidence(t, full_percent),
        remediation=remedy(t.entries, t.maximum, t.buckets, _timeout(t)),
        claims=("fill_percent",), impact=fill / 100.0)


def insert_failed(t: TableWindow, full_percent: float) -> Finding | None:
    """conntrack.insert_failed: entries that lost the insert race (the parallel DNS query race)."""
    if not t.failed:
        return None
    return Finding(
        id="conntrack.insert_failed", probe=PROBE, severity="warning",
        title=f"Conntrack insert failures{t.where}",
        summary=(f"{t.failed} conntrack entries could not be inserted in {t.seconds:.0f}s "
                 f"({t.rate(t.failed):.2f}/s). The usual cause is the UDP race: two packets "
                 "of a new flow (A and AAAA DNS queries sent in parallel from one socket) "
                 "race to create the same entry, and one is dropped: a 5 s DNS timeout."),
        evidence=evidence(t, full_percent), claims=("insert_failed",),
        remediation=[
            "add 'options single-request-reopen' (glibc) to the pods' resolv.conf, or use "
            "dnsConfig.options in the pod spec",
            "run NodeLocal DNSCache so pod DNS does not cross conntrack/DNAT",
            "or send DNS over TCP ('options use-vc')",
        ],
        impact=t.rate(t.failed))


def _timeout(t: TableWindow) -> int | None:
    return (t.sysctls or {}).get(TCP_TIMEOUT_ESTABLISHED)


def remedy(entries: int | None, maximum: int | None, buckets: int | None,
           tcp_timeout_established: int | None) -> list[str]:
    """nf_conntrack_max sized so current use is at most half full, with its memory cost."""
    entries = entries or 0
    base = max(2 * entries, 2 * (maximum or 0), 131072)
    new_max = 1 << (base - 1).bit_length()
    new_buckets = new_max // 4
    mem_mib = new_max * ENTRY_BYTES / (1 << 20)
    out = [f"sysctl -w net.netfilter.nf_conntrack_max={new_max}   # about {mem_mib:.0f} MiB of "
           "kernel memory when full"]
    if buckets is None or new_buckets > buckets:
        # A command for the node's shell: /sys there, whatever root this daemon reads.
        out.append(f"echo {new_buckets} > /sys/module/nf_conntrack/parameters/hashsize   "  # host-path: ok advice
                   "# nf_conntrack_buckets: keep max/buckets at 4 or below")
    est = tcp_timeout_established
    if est and est > 86400:
        out.append(f"sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=86400   "
                   f"# now {est} s: idle established flows hold entries for {est // 86400} days")
    out.append("on Kubernetes, set the same through kube-proxy's conntrack.maxPerCore/min "
               "so it does not reset them")
    return out


def full_summary(where: str, entries, maximum, fill, drops: int, early: int, seconds: float) -> str:
    """What a full table does to traffic: drops (new flows refused) and early drops (entries
    evicted to make room), each said only when it happened in the window."""
    out = (f"The conntrack table{where} holds {_n(entries)} of {_n(maximum)} entries "
           f"({'?' if fill is None else fill}%)")
    if drops:
        out += (f", and {drops} packets were dropped in {seconds:.0f}s because no entry could be "
                "created. New connections fail silently: applications see timeouts.")
    else:
        out += "."
    if early:
        out += (f" {early} entries were evicted early in {seconds:.0f}s to make room (early_drop): "
                "flows not yet assured (unanswered, or UDP younger than 2 s) lose their state, and "
                "their next packets, replies included, need a new entry or are dropped.")
    if not drops and not early:
        out += " Nothing was dropped or evicted in this window yet: the next burst of new flows will be."
    return out


def _n(value) -> str:
    return "?" if value is None else str(value)


# Finding id -> its function, in the order diagnose() emits them for each netns.
FINDINGS = {
    "conntrack.table_full": table_full,
    "conntrack.table_pressure": table_pressure,
    "conntrack.insert_failed": insert_failed,
}
