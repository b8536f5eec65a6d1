"""mtu: the MTU audit (misconfigurations that make black holes) and ICMP frag-needed traffic.

- Audit (pyroute2 netlink: probes/mtu/netlink.py and snapshot.py read, audit.py judges): every
  link's kind, MTU and lower device,
  overlay overhead, route MTUs and cached PMTU exceptions; veth pairs with unequal ends
  (across netns), tunnels bigger than their underlay can carry, bridge ports that differ,
  pod MTUs above the node's overlay MTU. Run on the sampler thread every
  --mtu-audit-interval, never in a request.
- Frag-needed sent (IPv4): tracepoint icmp:icmp_send (bpf/mtu.c). Received (IPv4): kprobe on
  icmp_unreach in kprobe mode. IPv6 packet-too-big: /proc/net/snmp6 (no hook exists).
- Findings: probes/mtu/findings.py (one function per finding id).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dpwatch.daemon.host.snmp import SnmpFiles
from dpwatch.probes.mtu import params as params_mod
from dpwatch.probes.mtu import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window
from dpwatch.daemon.host import paths
from dpwatch.probes import cdefs
from dpwatch.probes.mtu import findings
from dpwatch.probes.mtu.audit import audit
from dpwatch.probes.mtu.findings import ICMP_CAVEAT  # noqa: F401  (triage's import)
from dpwatch.probes.mtu.model import Issue, Snapshot
from dpwatch.probes.mtu.peers import peer_read_mode, peers_changed
from dpwatch.probes.mtu.snapshot import collect as collect_snapshot

log = logging.getLogger("dpwatch.mtu")
DIRS = cdefs.names_by_value("mtu.h", "MTU_EV_", "MTU_EVENTS")  # ("sent", "received"): MTU_EV_*
EV = cdefs.defines("mtu.h")
LINK_SETTLE = 1.0       # re-audit once link events have been quiet this long (s) ...
LINK_MAX_WAIT = 5.0     # ... or this long after the first one, whichever comes first
PEER_POLL = 4.5         # least time between two polls of the far ends read by nsid (s)


def decode_recent(key, value, now_ns: int) -> dict:
    return {"direction": DIRS[key.dir] if key.dir < len(DIRS) else str(key.dir),
            "dst": str(ipaddress.IPv4Address(bytes(key.daddr))),
            "mtu": int(key.mtu) or None, "count": int(value.count),
            "seconds_ago": round(max(0, now_ns - int(value.last_ns)) / 1e9, 1)}


class MtuProbe(Probe):
    name = "mtu"
    bpf_source = "mtu.c"
    description = "MTU audit (veth/bridge/overlay mismatches, route MTUs, PMTU cache) and ICMP frag-needed"
    finding_ids = ('mtu.mismatch', 'mtu.pmtu_frag_needed')
    chart_series = charts.SERIES
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    modes = (
        Mode("kprobe", (Hook("tracepoint", "icmp:icmp_send"), Hook("kprobe", "icmp_unreach"),
                        Hook("headers", "exact")),
             "audit, frag-needed sent (icmp:icmp_send) and received (kprobe icmp_unreach)"),
        Mode("tracepoint", (Hook("tracepoint", "icmp:icmp_send"),),
             "audit and frag-needed sent (icmp:icmp_send); IPv4 frag-needed received is not "
             "counted without kprobes", degraded=True),
        Mode("audit", (Hook("procfs", paths.proc("net", "snmp")),),
             "audit and snmp counters only (no icmp:icmp_send tracepoint)", degraded=True, bpf=False),
    )
    error_slots = {"MTU_ERR_RECENT": "mtu_recent"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.files: SnmpFiles | None = None
        self.audit_snapshot: Snapshot | None = None
        self.issues: list[Issue] = []
        self.audit_error = ""
        self._audit_at = 0.0
        self._route_mtu: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._ipr = None
        self._worker = None
        self._audit_workers: dict = {}
        self.own_ino: int | None = None
        self._link_watch = None             # daemon.linkwatch.LinkWatch
        self._changed: tuple[float, float] | None = None  # (first, last) link event not yet audited
        self._polled_at = 0.0
        self.audits: dict[str, int] = {"interval": 0, "link_event": 0, "peer_change": 0}

    def cflags(self, features) -> list[str]:
        flags = [f"-DMTU_RECENT_MAX={int(self.config.mtu_recent_entries)}"]
        if self.mode is not None and self.mode.name == "kprobe":
            flags.append("-DMTU_KPROBE=1")
        return flags

    def attach(self, module) -> None:
        if self.mode.bpf:
            super().attach(module)
        else:
            self.module = module
            self._attached = []
        self.files = SnmpFiles()
        from dpwatch.daemon.host.netns import NetnsWorker, own_inode
        self.own_ino = own_inode()
        # pyroute2's sync API must be called from inside the netns: route lookups and the
        # audit run on a worker thread that lives in the daemon's (attaching thread's) netns.
        self._worker = NetnsWorker(paths.proc("thread-self", "ns", "net"), name="dpwatch-mtu")

        def _open():
            from pyroute2 import IPRoute
            self._ipr = IPRoute()
        self._worker.call(_open)
        from dpwatch.daemon.host.linkwatch import LinkWatch
        self._link_watch = LinkWatch(self._link_event, name="dpwatch-mtu-links",  # this thread's netns
                                     fallback="the audit runs every --mtu-audit-interval")
        self.run_audit()

    def close(self) -> None:
        if self._link_watch is not None:
            self._link_watch.stop()
        if self.files:
            self.files.close()
            self.files = None
        if self._worker is not None:
            def _shut():
                if self._ipr is not None:
                    self._ipr.close()
                for w in self._audit_workers.values():
                    w.close()
                self._audit_workers.clear()
            try:
                self._worker.call(_shut)
            finally:
                self._worker.close()
                self._worker, self._ipr = None, None
        super().close()

    # -- the audit, on the sampler thread -------------------------------------------------
    def run_audit(self) -> None:
        try:
            snap = self._worker.call(lambda: collect_snapshot(
                all_netns=bool(self.config.mtu_all_netns), max_netns=int(self.config.mtu_max_netns),
                workers=self._audit_workers), timeout=60)
            issues = audit(snap)
            err = ""
        except Exception as exc:  # an audit failure must not take the probe down
            log.warning("MTU audit failed: %s", exc)
            snap, issues, err = self.audit_snapshot, self.issues, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.audit_snapshot, self.issues, self.audit_error = snap, issues, err
            self._audit_at = time.monotonic()

    def _link_event(self, at: float) -> None:
        with self._lock:
            self._changed = (self._changed[0] if self._changed else at, at)

    def background(self) -> None:
        """The audit every --mtu-audit-interval; sooner after a link of the daemon's netns
        changed (debounced), or when a far end read by nsid changed (polled: a pod's own
        links announce their changes only in the pod's netns)."""
        now = time.monotonic()
        with self._lock:
            changed, snap = self._changed, self.audit_snapshot
        reason = None
        if now - self._audit_at >= self.config.mtu_audit_interval:
            reason = "interval"
        elif changed and (now - changed[1] >= LINK_SETTLE or now - changed[0] >= LINK_MAX_WAIT):
            reason = "link_event"
        elif snap is not None and snap.netns_ids and now - self._polled_at >= PEER_POLL:
            self._polled_at = now
            try:
                if self._worker.call(lambda: peers_changed(snap)):
                    reason = "peer_change"
            except Exception as exc:
                log.debug("mtu peer poll: %s", exc)
        if reason is None:
            return
        with self._lock:
            self._changed = None  # events from here on call for another audit
        self.audits[reason] += 1
        self.run_audit()

    def route_mtu(self, dst: str) -> int | None:
        """The MTU this node uses toward dst: what a frag-needed it sent announced."""
        if dst in self._route_mtu:
            return self._route_mtu[dst]
        def lookup():
            (route,) = self._ipr.route("get", dst=dst)[:1]
            metrics = route.get_attr("RTA_METRICS")
            found = metrics.get_attr("RTAX_MTU") if metrics is not None else None
            if not found:
                link = self._ipr.link("get", index=route.get_attr("RTA_OIF"))[0]
                found = link.get_attr("IFLA_MTU")
            return found
        mtu = None
        try:
            mtu = self._worker.call(lookup)
        except Exception as exc:
            log.debug("route get %s: %s", dst, exc)
        if len(self._route_mtu) > 1024:
            self._route_mtu.clear()
        self._route_mtu[dst] = mtu
        return mtu

    # -- collection -------------------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        v4, v6 = self.files.read()
        counters: dict[str, dict] = {"frag_needed": {}}
        fn = counters["frag_needed"]
        if "Icmp6OutPktTooBigs" in v6:
            fn[("ipv6", "sent")] = v6["Icmp6OutPktTooBigs"]
            fn[("ipv6", "received")] = v6.get("Icmp6InPktTooBigs", 0)
        info: dict[str, Any] = {}
        if self.mode.bpf and self.module is not None:
            ev = self.table("mtu_events")
            fn[("ipv4", "sent")] = int(sum(ev[ev.Key(EV["MTU_EV_SENT"])]))
            if self.mode.name == "kprobe":
                fn[("ipv4", "received")] = int(sum(ev[ev.Key(EV["MTU_EV_RECEIVED"])]))
            now = time.monotonic_ns()
            recent = [decode_recent(k, v, now) for k, v in self.table("mtu_recent").items()]
            recent.sort(key=lambda r: r["seconds_ago"])
            info["recent"] = recent[:32]
        with self._lock:
            snap, issues = self.audit_snapshot, list(self.issues)
        links = snap.links if snap else []
        mtus = {(ln.name, ln.kind): ln.mtu for ln in links if ln.netns == self.own_ino}
        info["issues"] = issues
        info["pmtu"] = list(snap.pmtu) if snap else []
        # The daemon's own links, for the frag probe (it declares needs = ("drops", "mtu")).
        info["own_links"] = [{"name": ln.name, "kind": ln.kind, "mtu": ln.mtu, "up": ln.up}
                             for ln in links if ln.netns == self.own_ino]
        return {"counters": counters,
                "gauges": {"interface_mtu": mtus,
                           # flagged links (a veth pair with unequal ends is two), as the metric says
                           "mismatches": {(): len({(d["netns"], d["name"]) for i in issues
                                                   for d in i.devices})}},
                "info": info}

    def metrics(self, reading: Reading) -> Iterable:
        sent = CounterMetricFamily("dpwatch_icmp_frag_needed_sent", "ICMP fragmentation-needed "
                                   "(IPv4) and packet-too-big (IPv6) messages this node sent.",
                                   labels=["family"])
        recv = CounterMetricFamily("dpwatch_icmp_frag_needed_received", "ICMP fragmentation-needed "
                                   "(IPv4, kprobe mode only) and packet-too-big (IPv6) messages "
                                   "received.", labels=["family"])
        for (family, direction), v in sorted(reading["counters"]["frag_needed"].items()):
            (sent if direction == "sent" else recv).add_metric([family], v)
        yield sent
        yield recv
        mtu = GaugeMetricFamily("dpwatch_interface_mtu_bytes", "MTU of each interface in the daemon's "
                                "netns.", labels=["interface", "kind"])
        cap = int(self.config.mtu_max_interfaces)
        for i, ((name, kind), v) in enumerate(sorted(reading["gauges"]["interface_mtu"].items())):
            if i >= cap:
                break
            mtu.add_metric([name, kind], v)
        yield mtu
        yield GaugeMetricFamily("dpwatch_mtu_mismatches", "Links the MTU audit flags (possible black "
                                "holes).", value=reading["gauges"]["mismatches"][()])

    def info(self) -> dict[str, Any]:
        snap = self.audit_snapshot
        return {"links": len(snap.links) if snap else 0,
                "netns_skipped": snap.netns_skipped if snap else 0,
                "all_netns": bool(self.config.mtu_all_netns),
                "audit_error": self.audit_error, "mismatches": len(self.issues),
                # the far ends of the daemon's veths: how they were read, how many were not
                "peer_read": peer_read_mode(snap, bool(self.config.mtu_all_netns)),
                **{f"peers_{k}": (snap.peers if snap else {}).get(k, 0) for k in ("read", "refused", "unnamed")},
                "peer_error": (snap.peers if snap else {}).get("error", ""),
                "link_watch": self._link_watch.state if self._link_watch else "not started",
                "audits": dict(self.audits)}

    # -- findings (probes/mtu/findings.py) -------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        found = (findings.mismatch(window, self.own_ino),
                 findings.pmtu_frag_needed(window, self.route_mtu))
        return [f for f in found if f is not None]
