"""conntrack: table fill, drops and their cause.

Counters come from user space in every mode: netlink through pyroute2 (entry count, max,
per-CPU stats), with /proc/net/stat/nf_conntrack and the nf_conntrack sysctls as fallback.
The daemon's own netns always; with --conntrack-all-netns every netns found under
/run/netns and /proc/*/ns/net (bounded), labelled by netns inode.

Modes, best first:
- kprobe:     __nf_conntrack_alloc and early_drop kprobes (bpf/conntrack.c) also give the
              netns and 5-tuple of recent table-full drops. Needs kprobes and kernel headers
              that match the running kernel (it reads struct fields through them).
- correlated: no kprobes: the drops probe's NETFILTER_DROP count (skb:kfree_skb, not
              attached a second time) is set against the stats' drop counter.
- stats:      the counters alone.

Kernel side: bpf/conntrack.c, with the constants both sides share in bpf/conntrack.h.
Findings: probes/conntrack/findings.py.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dpwatch.daemon.host import netns as netns_mod
from dpwatch.daemon.host import paths, sysctl
from dpwatch.probes import cdefs
from dpwatch.probes.conntrack import findings
from dpwatch.probes.drops.readings import reason_total
from dpwatch.probes.conntrack import params as params_mod
from dpwatch.probes.conntrack import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window

log = logging.getLogger("dpwatch.conntrack")

STAT_FIELDS = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop",
               "search_restart", "clash_resolve")
# /proc/net/stat/nf_conntrack column -> our field name
PROC_COLUMNS = {"found": "found", "invalid": "invalid", "insert": "insert",
                "insert_failed": "insert_failed", "drop": "drop", "early_drop": "early_drop",
                "search_restart": "search_restart", "clashres": "clash_resolve"}
CT_MAX_SYSCTL = paths.proc("sys", "net", "netfilter", "nf_conntrack_max")
# Kernel event index -> name: CT_EV_* of bpf/conntrack.h ("table_full", "early_drop").
EVENTS = cdefs.names_by_value("conntrack.h", "CT_EV_", "CT_EVENTS")
RECENT_SHOWN = 32  # most recent drop flows carried in a reading (for /diagnose)


def parse_proc_stat(text: str) -> dict[str, int]:
    """Sum the per-CPU rows of /proc/net/stat/nf_conntrack (hex) into our field names."""
    lines = [ln.split() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError("no data rows in nf_conntrack stat")
    header = lines[0]
    out = {f: 0 for f in STAT_FIELDS}
    for row in lines[1:]:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} columns, header has {len(header)}")
        for col, value in zip(header, row):
            field = PROC_COLUMNS.get(col)
            if field:
                out[field] += int(value, 16)
    return out


def sum_netlink_stats(per_cpu: list[dict]) -> dict[str, int]:
    out = {f: 0 for f in STAT_FIELDS}
    for cpu in per_cpu:
        for f in STAT_FIELDS:
            out[f] += int(cpu.get(f, 0) or 0)
    return out


class NetnsSource:
    """Conntrack numbers of one netns, read by a worker thread that lives in that netns
    (pyroute2's sync API does not keep its socket bound to the creating thread's netns)."""

    def __init__(self, inode: int, path: str, prefer_netlink: bool = True):
        self.inode, self.path = inode, path
        self.source = "none"
        self.error = ""
        self._ct = None
        self._files: dict[str, Any] = {}
        self._worker = netns_mod.NetnsWorker(path, name=f"dpwatch-ct-{inode}")
        try:
            self._worker.call(lambda: self._open_here(prefer_netlink))
        except Exception:
            self._worker.close()
            raise

    def _open_here(self, prefer_netlink: bool) -> None:
        if prefer_netlink:
            try:
                from pyroute2 import Conntrack
                ct = Conntrack()
                # One event loop for this worker thread's calls, as pyroute2's IPRoute keeps:
                # without it the sync API makes and drops one per call and leaks ~100 B each
                # (its loop-id set and error queue grow; seen in bench/soak.py).
                ct.asyncore.local.keep_event_loop = True
                ct.stat()  # proves the netlink family answers in this netns
                self._ct, self.source = ct, "netlink"
            except Exception as exc:  # no nfnetlink_conntrack: fall back to /proc
                self.error = f"netlink: {exc}"
        for key, path in (("stat", paths.proc("thread-self", "net", "stat", "nf_conntrack")),
                          ("count", paths.proc("sys", "net", "netfilter", "nf_conntrack_count")),
                          ("max", paths.proc("sys", "net", "netfilter", "nf_conntrack_max")),
                          ("buckets", paths.proc("sys", "net", "netfilter", "nf_conntrack_buckets"))):
            try:
                self._files[key] = open(path, "rb", buffering=0)
            except OSError:
                pass
        if self._ct is None:
            self.source = "procfs" if "stat" in self._files else "none"

    def _read_file(self, key: str) -> str | None:
        fh = self._files.get(key)
        if fh is None:
            return None
        return os.pread(fh.fileno(), 1 << 16, 0).decode()

    def _read_here(self) -> dict[str, Any]:
        stats = None
        entries = maximum = None
        if self._ct is not None:
            try:
                stats = sum_netlink_stats(self._ct.stat())
                entries = int(self._ct.count())
                maximum = int(self._ct.conntrack_max_size())
            except Exception as exc:
                self.error = f"netlink read: {exc}"
                stats = None
        if stats is None:
            text = self._read_file("stat")
            if text is None:
                raise OSError(f"no conntrack source in netns {self.inode}: {self.error}")
            stats = parse_proc_stat(text)
        if entries is None:
            text = self._read_file("count")
            entries = int(text.strip()) if text else None
        if maximum is None:
            text = self._read_file("max")
            maximum = int(text.strip()) if text else None
        text = self._read_file("buckets")
        return {"stats": stats, "entries": entries, "max": maximum,
                "buckets": int(text.strip()) if text else None}

    def read(self) -> dict[str, Any]:
        return self._worker.call(self._read_here)

    def close(self) -> None:
        def shut():
            if self._ct is not None:
                try:
                    self._ct.close()
                except Exception:
                    pass
            for fh in self._files.values():
                fh.close()
            self._files.clear()
        try:
            self._worker.call(shut)
        finally:
            self._worker.close()


def format_tuple(rec: dict) -> str:
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}.get(rec["proto"], str(rec["proto"]))
    if rec["l3"] == socket.AF_INET6:
        s, d = f"[{rec['src']}]", f"[{rec['dst']}]"
    else:
        s, d = rec["src"], rec["dst"]
    if rec["proto"] in (6, 17, 132):
        return f"{proto} {s}:{rec['sport']} -> {d}:{rec['dport']}"
    return f"{proto} {s} -> {d}"


def decode_recent(key, value, now_ns: int) -> dict:
    """A ct_recent LRU entry (key fields as BCC exposes them) as a plain dict."""
    l3 = int(key.l3)
    raw_s, raw_d = bytes(key.saddr), bytes(key.daddr)
    if l3 == socket.AF_INET6:
        src, dst = str(ipaddress.IPv6Address(raw_s)), str(ipaddress.IPv6Address(raw_d))
    else:
        src, dst = str(ipaddress.IPv4Address(raw_s[:4])), str(ipaddress.IPv4Address(raw_d[:4]))
    rec = {"netns": int(key.netns), "event": EVENTS[key.kind] if key.kind < len(EVENTS) else str(key.kind),
           "l3": l3, "proto": int(key.proto), "src": src, "dst": dst,
           "sport": socket.ntohs(int(key.sport)), "dport": socket.ntohs(int(key.dport)),
           "count": int(value.count), "seconds_ago": round(max(0, now_ns - int(value.last_ns)) / 1e9, 1)}
    rec["flow"] = format_tuple(rec)
    return rec


class ConntrackProbe(Probe):
    name = "conntrack"
    bpf_source = "conntrack.c"
    description = "conntrack table fill, drops, early drops and insert failures, with their netns"
    finding_ids = ('conntrack.table_full', 'conntrack.table_pressure', 'conntrack.insert_failed')
    chart_series = charts.SERIES
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    param_checks = params_mod.CHECKS
    modes = (
        Mode("kprobe",
             (Hook("procfs", CT_MAX_SYSCTL), Hook("headers", "exact"),
              Hook("kprobe", "__nf_conntrack_alloc"), Hook("kretprobe", "__nf_conntrack_alloc"),
              Hook("kretprobe", "early_drop")),
             "netlink counters plus kprobes on the allocation-failure and early-drop paths"),
        Mode("correlated", (Hook("procfs", CT_MAX_SYSCTL), Hook("probe", "drops")),
             "netlink counters set against NETFILTER_DROP from the drops probe (no kprobes: "
             "no netns or 5-tuple of single drops)", degraded=True, bpf=False),
        Mode("stats", (Hook("procfs", CT_MAX_SYSCTL),),
             "netlink counters only", degraded=True, bpf=False),
    )
    error_slots = {"CT_ERR_RECENT": "ct_recent", "CT_ERR_INFLIGHT": "ct_inflight"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.sources: dict[int, NetnsSource] = {}
        self.skipped_netns = 0
        self.multi = bool(getattr(config, "conntrack_all_netns", False))
        self._last_enum = 0.0
        # read in collect, not in a finding (diagnose reads nothing)
        self._sysctls = sysctl.Watched(findings.SYSCTLS)

    # -- selection ----------------------------------------------------------------
    def choose_mode(self, features):
        for mode in self.modes:
            missing = []
            for hook in mode.hooks:
                if hook.kind == "probe":
                    if hook.target not in self.config.enabled_probes:
                        missing.append(f"probe {hook.target} (disabled)")
                elif hook.kind == "headers":
                    if not features.headers_exact:
                        missing.append("kernel headers of the running kernel")
                else:
                    from dpwatch.probes.base import hook_available
                    if not hook_available(hook, features):
                        missing.append(str(hook))
            if not missing:
                return mode, mode.description
            if mode.name == "stats":
                return None, f"nf_conntrack is not loaded (no {CT_MAX_SYSCTL})"
            log.debug("conntrack mode %s unavailable: %s", mode.name, ", ".join(missing))
        return None, "no mode available"

    def fallback_modes(self, features):
        # Only modes after the current one (as Probe.fallback_modes): from stats, not back up
        # to correlated.
        if self.mode not in self.modes:
            return []
        later = self.modes[self.modes.index(self.mode) + 1:]
        return [m for m in later if m.name != "correlated" or "drops" in self.config.enabled_probes]

    def cflags(self, features) -> list[str]:
        return [f"-DCT_RECENT_MAX={int(self.config.conntrack_recent_entries)}"]

    # -- lifecycle ------------------------------------------------------------------
    def attach(self, module) -> None:
        if self.mode.bpf:
            super().attach(module)
        else:
            self.module = module
            self._attached = []
        self._refresh_sources(force=True)
        if not self.sources:
            raise RuntimeError("no conntrack source could be opened")

    def _refresh_sources(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_enum < 30:
            return
        self._last_enum = now
        if self.multi:
            found, self.skipped_netns = netns_mod.enumerate_netns(int(self.config.conntrack_max_netns))
        else:
            # The netns of the thread that attaches (the daemon's own).
            own = netns_mod.own_inode() or 0
            found = {own: paths.proc("thread-self", "ns", "net")}
        for ino in [i for i in self.sources if i not in found]:
            self.sources.pop(ino).close()
        for ino, path in found.items():
            if ino in self.sources:
                continue
            try:
                src = NetnsSource(ino, path)
                if src.source != "none":
                    self.sources[ino] = src
                else:
                    src.close()
            except OSError as exc:
                log.debug("netns %s: %s", path, exc)

    def background(self) -> None:
        if self.multi:
            self._refresh_sources()

    def close(self) -> None:
        for src in self.sources.values():
            src.close()
        self.sources.clear()
        super().close()

    # -- collection -------------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        stats: dict[tuple[int, str], int] = {}
        entries: dict[int, int] = {}
        maxes: dict[int, int] = {}
        buckets: dict[int, int] = {}
        for ino, src in list(self.sources.items()):
            try:
                r = src.read()
            except (OSError, ValueError) as exc:
                log.debug("conntrack netns %s read failed: %s", ino, exc)
                continue
            for f, v in r["stats"].items():
                stats[(ino, f)] = v
            if r["entries"] is not None:
                entries[ino] = r["entries"]
            if r["max"] is not None:
                maxes[ino] = r["max"]
            if r["buckets"] is not None:
                buckets[ino] = r["buckets"]
        counters: dict[str, dict] = {"stats": stats}
        info: dict[str, Any] = {"sources": {ino: s.source for ino, s in self.sources.items()},
                                "sysctls": self._sysctls.read()}
        if self.mode.name == "correlated" and "drops" in (inputs or {}):
            counters["netfilter_drops"] = {(): reason_total(inputs["drops"], "NETFILTER_DROP")}
        if self.mode.name == "kprobe" and self.module is not None:
            events = self.table("ct_events")
            counters["events"] = {(EVENTS[i],): int(sum(events[events.Key(i)])) for i in range(len(EVENTS))}
            now = time.monotonic_ns()
            recent = [decode_recent(k, v, now) for k, v in self.table("ct_recent").items()]
            recent.sort(key=lambda r: r["seconds_ago"])
            info["recent"] = recent[:RECENT_SHOWN]
        return {"counters": counters, "gauges": {"entries": entries, "max": maxes, "buckets": buckets},
                "info": info}

    def metrics(self, reading: Reading) -> Iterable:
        labels = ["netns"] if self.multi else []

        def lv(ino):
            return [str(ino)] if self.multi else []

        g_entries = GaugeMetricFamily("dpwatch_conntrack_entries", "Conntrack entries in use.", labels=labels)
        g_max = GaugeMetricFamily("dpwatch_conntrack_max_entries",
                                  "nf_conntrack_max: the table limit (global; each netns counts against it).",
                                  labels=labels)
        for ino, v in sorted(reading["gauges"]["entries"].items()):
            g_entries.add_metric(lv(ino), v)
        for ino, v in sorted(reading["gauges"]["max"].items()):
            g_max.add_metric(lv(ino), v)
        yield g_entries
        yield g_max
        fams = {
            "drop": ("dpwatch_conntrack_drops", "Packets dropped because a conntrack entry could not be "
                     "created (table full)."),
            "early_drop": ("dpwatch_conntrack_early_drops", "Entries evicted early to make room in a full table."),
            "insert_failed": ("dpwatch_conntrack_insert_failed", "Entries that could not be inserted "
                              "(e.g. the UDP race of parallel DNS queries)."),
            "invalid": ("dpwatch_conntrack_invalid", "Packets conntrack could not track (invalid)."),
            "search_restart": ("dpwatch_conntrack_search_restarts", "Hash table lookups restarted "
                               "because of a resize or concurrent change."),
        }
        out = {f: CounterMetricFamily(name, help_, labels=labels) for f, (name, help_) in fams.items()}
        for (ino, f), v in sorted(reading["counters"]["stats"].items()):
            if f in out:
                out[f].add_metric(lv(ino), v)
        yield from out.values()
        if "events" in reading["counters"]:
            ev = CounterMetricFamily("dpwatch_conntrack_kernel_events", "Table-full drops and early "
                                     "drops seen by the kprobes (kprobe mode only).", labels=["event"])
            for (name,), v in sorted(reading["counters"]["events"].items()):
                ev.add_metric([name], v)
            yield ev

    def info(self) -> dict[str, Any]:
        return {"netns_watched": len(self.sources), "netns_skipped": self.skipped_netns,
                "all_netns": self.multi,
                "sources": sorted({s.source for s in self.sources.values()})}


    # -- findings ---------------------------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        """One function per finding id (findings.py), for each netns of the window."""
        cfg = self.config
        full, pressure = cfg.conntrack_full_percent, cfg.conntrack_pressure_percent
        out: list[Finding] = []
        for t in findings.tables(window, self.multi):
            for f in (findings.table_full(t, full), findings.table_pressure(t, pressure, full),
                      findings.insert_failed(t, full)):
                if f is not None:
                    out.append(f)
        return out
