"""mtu: the MTU audit (misconfigurations that make black holes) and ICMP frag-needed traffic.

- Audit (probes/mtu/audit.py, pyroute2 netlink): every link's kind, MTU and lower device,
  overlay overhead, route MTUs and cached PMTU exceptions; veth pairs with unequal ends
  (across netns), tunnels bigger than their underlay can carry, bridge ports that differ,
  pod MTUs above the node's overlay MTU. Run on the sampler thread every
  --mtu-audit-interval, never in a request.
- Frag-needed sent (IPv4): tracepoint icmp:icmp_send (bpf/mtu.c). Received (IPv4): kprobe on
  icmp_unreach in kprobe mode. IPv6 packet-too-big: /proc/net/snmp6 (no hook exists).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dpwatch.probes.mtu import audit as mtuaudit
from dpwatch.daemon.host.snmp import SnmpFiles
from dpwatch.probes.mtu import params as params_mod
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window

log = logging.getLogger("dpwatch.mtu")
DIRS = ("sent", "received")  # index = MTU_EV_* in bpf/mtu.c
LINK_SETTLE = 1.0       # re-audit once link events have been quiet this long (s) ...
LINK_MAX_WAIT = 5.0     # ... or this long after the first one, whichever comes first
PEER_POLL = 4.5         # least time between two polls of the far ends read by nsid (s)
# The last sentence of mtu.pmtu_frag_needed's summary; triage drops it once it sees the ICMP dropped.
ICMP_CAVEAT = " If anything on the path drops ICMP, this becomes a black hole."


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
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    modes = (
        Mode("kprobe", (Hook("tracepoint", "icmp:icmp_send"), Hook("kprobe", "icmp_unreach"),
                        Hook("headers", "exact")),
             "audit, frag-needed sent (icmp:icmp_send) and received (kprobe icmp_unreach)"),
        Mode("tracepoint", (Hook("tracepoint", "icmp:icmp_send"),),
             "audit and frag-needed sent (icmp:icmp_send); IPv4 frag-needed received is not "
             "counted without kprobes", degraded=True),
        Mode("audit", (Hook("procfs", "/proc/net/snmp"),),
             "audit and snmp counters only (no icmp:icmp_send tracepoint)", degraded=True, bpf=False),
    )
    error_slots = {"MTU_ERR_RECENT": "mtu_recent"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.files: SnmpFiles | None = None
        self.audit_snapshot: mtuaudit.Snapshot | None = None
        self.issues: list[mtuaudit.Issue] = []
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
        self._worker = NetnsWorker("/proc/thread-self/ns/net", name="dpwatch-mtu")

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
            snap = self._worker.call(lambda: mtuaudit.collect(
                all_netns=bool(self.config.mtu_all_netns), max_netns=int(self.config.mtu_max_netns),
                workers=self._audit_workers), timeout=60)
            issues = mtuaudit.audit(snap)
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
                if self._worker.call(lambda: mtuaudit.peers_changed(snap)):
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
            fn[("ipv4", "sent")] = int(sum(ev[ev.Key(0)]))
            if self.mode.name == "kprobe":
                fn[("ipv4", "received")] = int(sum(ev[ev.Key(1)]))
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
                "peer_read": mtuaudit.peer_read_mode(snap, bool(self.config.mtu_all_netns)),
                **{f"peers_{k}": (snap.peers if snap else {}).get(k, 0) for k in ("read", "refused", "unnamed")},
                "peer_error": (snap.peers if snap else {}).get("error", ""),
                "link_watch": self._link_watch.state if self._link_watch else "not started",
                "audits": dict(self.audits)}

    # -- findings -----------------------------------------------------------------------------
    def _mismatch_evidence(self, issue: mtuaudit.Issue) -> dict:
        out = {"kind": issue.kind, "devices": issue.devices, "overhead": issue.overhead,
               "safe_mtu": issue.safe_mtu}
        if issue.kind == "veth_mismatch" and issue.devices:
            # The bigger end in the daemon's netns: what the node itself sends through it over
            # the smaller MTU is dropped at the far end (its UDP senders see ENOBUFS).
            big = max(issue.devices, key=lambda d: d["mtu"])
            out["node_end_bigger"] = big.get("netns") is not None and big.get("netns") == self.own_ino
        return out

    def diagnose(self, window: Window) -> list[Finding]:
        findings: list[Finding] = []
        info = window.new.get("info", {})
        issues: list[mtuaudit.Issue] = info.get("issues", [])
        if issues:
            safe = min((i.safe_mtu for i in issues if i.safe_mtu), default=None)
            remediation: list[str] = []
            for issue in issues:
                for step in issue.remediation:
                    if step not in remediation:
                        remediation.append(step)
            if safe and not any("Cilium" in r or "Calico" in r or "Flannel" in r for r in remediation):
                overhead = next((i.overhead for i in issues if i.safe_mtu == safe and i.overhead), None)
                remediation += mtuaudit.cni_remediation(safe, overhead)
            findings.append(Finding(
                id="mtu.mismatch", probe=self.name, severity="critical",
                title="MTU mismatch: packets can vanish (black hole)",
                summary=(f"The MTU audit found {len(issues)} problem(s): " +
                         " ".join(i.summary for i in issues[:3]) +
                         (" ..." if len(issues) > 3 else "") +
                         " Packets bigger than the smallest MTU on the path are dropped silently or "
                         "fragmented: connections hang on large transfers while small ones work."),
                evidence={"mismatches": [self._mismatch_evidence(i) for i in issues[:10]],
                          "safe_mtu": safe},
                claims=("mismatches",), remediation=remediation[:16],
                impact=float(len(issues))))
        fn = window.delta("frag_needed")
        total = int(sum(fn.values()))
        if total:
            recent = [r for r in info.get("recent", []) if r["seconds_ago"] <= window.seconds]
            shown = []
            for r in recent[:8]:
                mtu = r["mtu"] if r["direction"] == "received" else self.route_mtu(r["dst"])
                shown.append({"direction": r["direction"], "dst": r["dst"], "mtu": mtu, "count": r["count"]})
            pmtu = [p for p in info.get("pmtu", [])][:8]
            announced = sorted({s["mtu"] for s in shown if s["mtu"]} | {p["mtu"] for p in pmtu if p.get("mtu")})
            findings.append(Finding(
                id="mtu.pmtu_frag_needed", probe=self.name, severity="warning",
                title="Path MTU discovery at work: frag-needed / packet-too-big",
                summary=(f"{total} ICMP frag-needed/packet-too-big messages in {window.seconds:.0f}s "
                         f"(" + ", ".join(f"{fam} {d}: {int(n)}" for (fam, d), n in sorted(fn.items()) if n) +
                         "). A path has a smaller MTU than senders use" +
                         (f" (announced: {', '.join(map(str, announced))})" if announced else "") +
                         "." + ICMP_CAVEAT),
                evidence={"frag_needed": {f"{fam}_{d}": int(n) for (fam, d), n in sorted(fn.items())},
                          "recent": shown, "pmtu_cache": pmtu, "announced_mtus": announced,
                          "window_seconds": round(window.seconds, 1)},
                claims=("frag_needed",),
                remediation=[
                    "set the sending side's MTU to the announced MTU (or lower): ip link set dev <dev> mtu "
                    + (str(min(announced)) if announced else "<announced>"),
                    "ip route get <dst>   # shows the cached PMTU exception for a destination",
                    "never block ICMP type 3 code 4 / ICMPv6 type 2 in firewalls or security groups",
                ],
                impact=window.rate(total)))
        return findings
