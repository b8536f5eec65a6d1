"""node: the node audit, as a user-space probe.

The audit (probes/node/audit.py) reads the settings the field tunes again and again
(conntrack size, somaxconn, the ephemeral port range, tcp_tw_reuse, netdev_max_backlog,
socket buffer limits, congestion control, inotify limits, netfilter rule counts, overlay
devices) on the sampler thread every --node-audit-interval, in the daemon's netns. Each
snapshot adds the cheap counters that say whether a limit is being hit right now (listen
overflows, socket buffer errors, backlog drops, conntrack drops and peak use), so a check is
"info" on a quiet node and "warning" when the window shows the limit biting.

Each reading also lists the netns' TCP listeners through sock_diag (probes/node/listeners.py: one
inet_diag dump per family, on a thread of its own in the daemon's netns), with each socket's
accept queue, backlog and drop counter, so node.listen_queue_overflow names the listeners
that refused connections. The owner of such a listener is looked up in /proc only when it
is full or its drops grow, once per socket.

diagnose() reads nothing from the node: the findings (probes/node/findings.py, one pure
function per finding id) judge from the reading's audit facts, counters and listeners sample.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterable

from prometheus_client.core import GaugeMetricFamily

from dpwatch.daemon.host import paths
from dpwatch.probes.node import audit as nodeaudit
from dpwatch.probes.node import counters, findings, listeners
from dpwatch.probes.node import params as params_mod
from dpwatch.probes.node.culprits import ListenWindow
from dpwatch.probes.node import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window

log = logging.getLogger("dpwatch.node")
# The soonest the audit runs again when its inputs changed (~60 ms on a small node, more with
# many rules and sockets; the early audit skips the inotify scan): at most one early audit per
# this many seconds, so a node whose rules or sockets churn pays at most ~1% of a CPU here.
EARLY_AUDIT_GAP_SECONDS = 5.0


class NodeProbe(Probe):
    name = "node"
    bpf_source = None
    description = ("node audit: conntrack size, somaxconn, port range, tw_reuse, backlog, socket "
                   "buffers, congestion control, inotify, netfilter rule count, overlays")
    finding_ids = ("node.conntrack_max_low", "node.listen_queue_overflow", "node.somaxconn_low",
                   "node.port_range_small",
                   "node.tcp_tw_reuse_off", "node.netdev_max_backlog_low", "node.socket_buffers_small",
                   "node.congestion_control", "node.inotify_limits_low", "netfilter.rule_count_high",
                   "node.overlay_in_use")
    chart_series = charts.SERIES
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    modes = (
        Mode("audit", (Hook("procfs", paths.proc("sys", "net", "core", "somaxconn")),),
             "sysctls, /proc/net/tcp, sock_diag listeners, nfnetlink and iptables-legacy rule "
             "counts, rtnetlink links", bpf=False),
    )

    def __init__(self, config: Any):
        super().__init__(config)
        self._files: dict[str, Any] = {}
        self._worker = None
        self._lock = threading.Lock()
        self.facts: nodeaudit.Facts | None = None
        self.audit_error = ""
        self._audit_at = 0.0
        self.audit_seconds = 0.0
        self._signature: dict[str, Any] | None = None
        self.audits: dict[str, int] = {}
        self.peak = 0
        self._listen_worker = None
        self.tracker = listeners.Tracker(horizon=float(getattr(config, "max_window", 3600.0)))
        self._owners: dict[int, tuple[list[tuple[int, str]], float]] = {}  # inode -> (owners, when)
        self.owner_scans = 0
        self.owner_fds_scanned = 0
        self.listen_error = ""

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, module) -> None:
        self.module = module
        self._attached = []
        # Held open from the attaching thread, so they stay bound to the daemon's netns.
        for key, path in counters.files().items():
            try:
                self._files[key] = open(path, "rb", buffering=0)
            except OSError:
                pass
        from dpwatch.daemon.host.netns import NetnsWorker
        netns = paths.proc("thread-self", "ns", "net")
        self._worker = NetnsWorker(netns, name="dpwatch-node")
        # Its own thread, so a report's fresh reading never waits behind a running audit.
        self._listen_worker = NetnsWorker(netns, name="dpwatch-listen")
        self.run_audit()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        for worker in (self._worker, self._listen_worker):
            if worker is not None:
                worker.close()
        self._worker = self._listen_worker = None
        super().close()

    def run_audit(self, why: str = "interval") -> None:
        """The whole audit (``interval``), or an early one when its cheap inputs moved: that
        one skips the inotify scan (every fd of every process, the audit's dearest part) and
        keeps the last scan's figures."""
        start = time.monotonic()
        early = why != "interval"
        try:
            self._signature = self._worker.call(nodeaudit.change_signature, timeout=10)
            facts = self._worker.call(lambda: nodeaudit.gather(inotify=not early), timeout=60)
            if early and self.facts is not None:
                facts.inotify = self.facts.inotify
            err = ""
            self.audits[why] = self.audits.get(why, 0) + 1
        except Exception as exc:  # the audit must never take the daemon down
            log.warning("node audit failed: %s", exc)
            facts, err = self.facts, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.facts, self.audit_error = facts, err
            self._audit_at = time.monotonic()
            self.audit_seconds = self._audit_at - start

    def background(self) -> None:
        since = time.monotonic() - self._audit_at
        if since >= self.config.node_audit_interval:
            self.run_audit()
            return
        # Between audits, the cheap counters (nf_tables generation, iptables-legacy table
        # sizes, TCP sockets in use) say when the audit's answer may have changed: a rule load
        # or a connection storm is then seen within a sampler pass or two, not a minute later.
        if since < EARLY_AUDIT_GAP_SECONDS:
            return
        try:
            now = self._worker.call(nodeaudit.change_signature, timeout=10)
        except Exception as exc:
            log.debug("node audit signature failed: %s", exc)
            return
        why = nodeaudit.audit_due(self._signature, now)
        if why:
            self.run_audit(f"changed_{why}")

    # -- collection -------------------------------------------------------------------------------
    def _read(self, key: str) -> str | None:
        fh = self._files.get(key)
        if fh is None:
            return None
        try:
            return os.pread(fh.fileno(), 1 << 20, 0).decode()
        except OSError:
            return None

    def _sample_listeners(self) -> listeners.ListenSample:
        """The netns' listeners now, remembered by the tracker; owners of the hot ones named."""
        if self._listen_worker is None:
            return listeners.ListenSample(ok=False, error="not attached")
        try:
            found, error, somaxconn = self._listen_worker.call(listeners.sample_netns, timeout=5)
        except Exception as exc:  # no sock_diag here: the finding still counts, without names
            self.listen_error = f"{type(exc).__name__}: {exc}"
            return listeners.ListenSample(ok=False, error=self.listen_error)
        self.listen_error = error
        now = time.monotonic()
        with self._lock:
            hot = self.tracker.observe(now, found)
            self._name_owners(hot, {x.inode for x in found}, now)
            owners = {inode: o for inode, (o, _at) in self._owners.items()}
            return listeners.ListenSample(found, somaxconn, self.tracker.view(now), owners,
                                          self.tracker.untracked, error)

    def _name_owners(self, hot: set[int], live: set[int], now: float) -> None:
        for inode in [i for i in self._owners if i not in live]:
            del self._owners[inode]
        need = [i for i in hot if i not in self._owners
                or (not self._owners[i][0] and now - self._owners[i][1] >= listeners.OWNER_RETRY_SECONDS)]
        if not need:
            return
        found, scanned, _truncated = listeners.socket_owners(need)
        self.owner_scans += 1
        self.owner_fds_scanned = scanned
        for inode in need:
            self._owners[inode] = (found.get(inode, []), now)

    def collect(self, inputs=None) -> Reading:
        c = counters.limit_counters(self._read)
        text = self._read("ct_count")
        if text and text.strip().isdigit():
            self.peak = max(self.peak, int(text))
        with self._lock:
            facts = self.facts
        listen = self._sample_listeners()
        gauges = {"conntrack_peak": {(): self.peak}}
        if listen.ok:
            gauges["listeners"] = {("listening",): len(listen.listeners),
                                   ("full",): sum(1 for x in listen.listeners if x.full)}
        return {"counters": {"limits": c, "listener_drops": listeners.drop_counters(listen.listeners)},
                "gauges": gauges, "info": {"facts": facts, "listen": listen}}

    def metrics(self, reading: Reading) -> Iterable:
        facts = reading.get("info", {}).get("facts")
        rules = GaugeMetricFamily("dpwatch_netfilter_rules", "Netfilter rules in the daemon's netns, "
                                  "counted by the kernel (nf_tables dump, iptables-legacy tables).",
                                  labels=["backend"])
        socks = GaugeMetricFamily("dpwatch_tcp_sockets", "TCP sockets in the daemon's netns by state "
                                  "(at the last node audit).", labels=["state"])
        if facts is not None:
            for backend, key in (("nftables", "nft_rules"), ("iptables-legacy", "iptables_legacy_rules"),
                                 ("ip6tables-legacy", "ip6tables_legacy_rules")):
                value = facts.netfilter.get(key)
                if value is not None:
                    rules.add_metric([backend], value)
            for state, n in sorted(facts.tcp_states.items()):
                socks.add_metric([state], n)
        yield rules
        yield socks
        counts = reading.get("gauges", {}).get("listeners")
        if counts is not None:
            yield GaugeMetricFamily("dpwatch_tcp_listeners", "TCP listening sockets in the daemon's netns "
                                    "(sock_diag, at scrape time).", value=counts[("listening",)])
            yield GaugeMetricFamily("dpwatch_tcp_listeners_full", "TCP listeners in the daemon's netns "
                                    "whose accept queue is full (queue above backlog: the next connection "
                                    "attempt is refused), at scrape time.", value=counts[("full",)])

    def info(self) -> dict[str, Any]:
        facts = self.facts
        return {"audit_interval_seconds": self.config.node_audit_interval,
                "audit_seconds": round(self.audit_seconds, 3), "audit_error": self.audit_error,
                "audits": dict(self.audits),
                "read_errors": facts.errors if facts else {},
                "listeners": {"read_error": self.listen_error, "tracked": len(self.tracker.tracks),
                              "untracked": self.tracker.untracked, "owner_scans": self.owner_scans,
                              "owner_fds_scanned_last": self.owner_fds_scanned}}

    # -- findings -----------------------------------------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        info = window.new.get("info", {})
        facts = info.get("facts")
        d = {k[0]: int(v) for k, v in window.delta("limits").items()}
        listen = ListenWindow(
            window.seconds, overflows=d.get("listen_overflows", 0), drops=d.get("listen_drops", 0),
            passive_opens=d.get("passive_opens", 0),
            socket_drops={k[0]: int(v) for k, v in window.delta("listener_drops").items()},
            sample=info.get("listen"))
        if facts is None:  # no audit yet: the live listen check still stands on the counters
            results = [r for r in (findings.listen_queue_overflow(listen),) if r is not None]
        else:
            results = findings.check(
                facts, conntrack_peak=window.new["gauges"]["conntrack_peak"].get(()),
                conntrack_drops=d.get("conntrack_drops", 0), listen=listen,
                buffer_errors=d.get("buffer_errors", 0), backlog_drops=d.get("backlog_drops", 0),
                netfilter_threshold=int(self.config.netfilter_rules_warning))
        out = []
        for r in results:
            ev = {k: v for k, v in r.evidence.items() if v is not None}
            rate_impact = window.rate(r.impact) if r.id in EVENT_IMPACT else 0.0
            out.append(Finding(id=r.id, probe=self.name, severity=r.severity, title=r.title,
                               summary=r.summary, evidence=ev, remediation=r.remediation,
                               impact=rate_impact, claims=r.claims))
        return out


# Checks whose impact is a count of events in the window (made a rate here); the others
# measure a level (sockets, rules), not events per second, and rank by severity alone.
EVENT_IMPACT = frozenset({"node.conntrack_max_low", "node.listen_queue_overflow",
                          "node.netdev_max_backlog_low", "node.socket_buffers_small"})
