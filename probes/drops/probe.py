"""drops: packet drops by the kernel's own drop reason (tracepoint skb:kfree_skb).

Reason names come from the running kernel: the tracepoint format's __print_symbolic list,
or else the BTF enum skb_drop_reason. Numbers differ between kernels, so there is no table
here. Kernel side: bpf/drops.c.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily

from dpwatch.daemon.host import sysctl
from dpwatch.daemon.host.kallsyms import KallsymsResolver
from dpwatch.daemon.host import tracefs
from dpwatch.probes.drops import params as params_mod
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window

PROTOCOLS = ("ipv4", "ipv6", "arp", "other")  # index = protocol class in bpf/drops.c
# Reasons that are not drops: the kernel may trace them through kfree_skb on some versions.
NOT_DROPS = frozenset({"NOT_DROPPED_YET", "CONSUMED"})
MAX_DENSE_REASONS = 1024
LOC_EXACT = 64  # per CPU and (reason, protocol): locations of the first drops are all recorded
SUBSYS_SHIFT = 16  # enum skb_drop_reason_subsys: reason = (subsys << 16) | code
# Reasons that get a finding of their own; drops.top_reasons ranks by the rest.
SPECIFIC_REASONS = frozenset({"SOCKET_RCVBUFF", "TCP_LISTEN_OVERFLOW", "NETFILTER_DROP"})
# Reasons another probe reports on its own when it is enabled: a CPU_BACKLOG drop is the event
# softnet_stat's dropped column counts (enqueue_to_backlog counts it and frees the packet with
# this reason), which softnet.backlog_drops reports in every softirq mode, procfs included.
PEER_REASONS = {"CPU_BACKLOG": "softirq"}
# Drops of packets nothing on the node was there to receive: no socket on the port (answered
# with a TCP reset or an ICMP port unreachable: the sender sees "connection refused" at once),
# no handler for the protocol, a frame for another host's MAC. Nothing a receiver wanted was
# lost, so these alone never make drops.top_reasons critical.
NO_RECEIVER_REASONS = frozenset({"NO_SOCKET", "UNHANDLED_PROTO", "OTHERHOST"})
# What the top reason means, for reasons without a finding of their own.
REASON_HINTS = {
    "NO_SOCKET": ("packets to ports where no socket listens, answered with a TCP reset or an ICMP "
                  "port unreachable: clients see 'connection refused'. A server is down or restarting, "
                  "or clients use a wrong address or port."),
}
REASON_STEPS = {
    "NO_SOCKET": ["ss -ltnup   # the node's listeners: is the server of the refused port running "
                  "(and listening on the address the clients use)?",
                  "kubectl get endpoints -A | grep '<none>'   # Services whose pods are gone"],
}


def load_reason_names(tracefs_path: str | None = None) -> tuple[dict[int, str], str]:
    """Drop reason value -> name from the running kernel, and where the names came from."""
    fmt = tracefs.read_format("skb", "kfree_skb", tracefs_path)
    if fmt is not None:
        names = fmt.symbolic("reason")
        if names:
            return names, "tracefs:skb/kfree_skb/format"
    try:
        from dpwatch.daemon.host import btf
        members = btf.read_enum("skb_drop_reason")
    except Exception:  # a malformed BTF blob must not stop the probe
        members = None
    if members:
        return btf.strip_prefix(members, "SKB_DROP_REASON_"), "btf:enum skb_drop_reason"
    return {}, "none (reasons shown as numbers)"


def reason_name(names: dict[int, str], value: int) -> str:
    name = names.get(value)
    if name:
        return name
    if value >> SUBSYS_SHIFT:
        return f"SUBSYS_{value >> SUBSYS_SHIFT}_{value & 0xFFFF}"
    return f"UNKNOWN_{value}"


class DropsProbe(Probe):
    name = "drops"
    bpf_source = "drops.c"
    description = "packet drops by kernel drop reason and protocol, with top drop locations"
    finding_ids = ('drops.socket_receive_buffer', 'drops.listen_overflow', 'drops.netfilter', 'drops.top_reasons')
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    param_checks = params_mod.CHECKS
    modes = (
        Mode("tracepoint",
             (Hook("tracepoint", "skb:kfree_skb"), Hook("tracepoint_field", "skb:kfree_skb:reason")),
             "skb:kfree_skb with the reason field"),
        Mode("tracepoint-noreason", (Hook("tracepoint", "skb:kfree_skb"),),
             "skb:kfree_skb has no reason field (kernel before 5.17): drops counted without reasons",
             degraded=True),
    )
    error_slots = {"DROPS_ERR_OTHER": "drops_other", "DROPS_ERR_LOC": "drops_locs"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.names: dict[int, str] = {}
        self.name_source = ""
        self.max_reason = 1
        self.kallsyms = KallsymsResolver()

    def cflags(self, features) -> list[str]:
        if self.mode is not None and self.mode.name == "tracepoint":
            self.names, self.name_source = load_reason_names(features.tracefs)
            # Dense array for every named reason; anything above goes to the small hash.
            top = max(self.names, default=0)
            self.max_reason = max(1, min(MAX_DENSE_REASONS, top + 1))
            flags = ["-DDROPS_HAVE_REASON=1"]
            consumed = [v for v, n in self.names.items() if n == "CONSUMED"]
            if consumed:
                flags.append(f"-DDROPS_CONSUMED={consumed[0]}")
        else:
            self.names, self.name_source = {0: "UNKNOWN"}, "no reason field on this kernel"
            self.max_reason = 1
            flags = []
        flags += [
            f"-DDROPS_MAX_REASON={self.max_reason}",
            f"-DDROPS_OTHER_MAX={int(self.config.drops_other_entries)}",
            f"-DDROPS_LOC_MAX={int(self.config.drops_location_entries)}",
            f"-DDROPS_LOC_EXACT={LOC_EXACT}",
            f"-DDROPS_LOC_SAMPLE={int(self.config.drops_location_sample)}",
        ]
        return flags

    # -- collection -----------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        drops: dict[tuple[str, str], int] = {}
        counts = self.table("drops_counts")
        for key, per_cpu in counts.items():
            total = sum(per_cpu)
            if not total:
                continue
            idx = key.value
            pclass, reason = divmod(idx, self.max_reason)
            k = (reason_name(self.names, reason), PROTOCOLS[pclass] if pclass < 4 else "other")
            drops[k] = drops.get(k, 0) + total
        for key, per_cpu in self.table("drops_other").items():
            total = sum(per_cpu)
            k = (reason_name(self.names, key.reason),
                 PROTOCOLS[key.pclass] if key.pclass < 4 else "other")
            drops[k] = drops.get(k, 0) + total
        locations: dict[tuple[int, str], int] = {}
        if int(self.config.drops_location_entries) > 0:
            for key, value in self.table("drops_locs").items():
                locations[(int(key.location), reason_name(self.names, key.reason))] = int(value.value)
        return {"counters": {"drops": drops, "locations": locations}, "gauges": {}}

    def metrics(self, reading: Reading) -> Iterable:
        fam = CounterMetricFamily(
            "dpwatch_skb_drops", "Packets dropped by the kernel (skb:kfree_skb), by drop reason "
            "and protocol (ipv4, ipv6, arp, other).", labels=["reason", "protocol"])
        for (reason, proto), value in sorted(reading["counters"]["drops"].items()):
            if reason not in NOT_DROPS:
                fam.add_metric([reason, proto], value)
        yield fam

    def info(self) -> dict[str, Any]:
        return {"reason_names": len(self.names), "reason_name_source": self.name_source,
                "dense_reasons": self.max_reason,
                "location_entries": int(self.config.drops_location_entries),
                "location_sample": int(self.config.drops_location_sample)}

    # -- findings ---------------------------------------------------------------------
    def _by_reason(self, window: Window) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        by_reason: dict[str, float] = {}
        by_proto: dict[str, dict[str, float]] = {}
        for (reason, proto), n in window.delta("drops").items():
            if reason in NOT_DROPS:
                continue
            by_reason[reason] = by_reason.get(reason, 0) + n
            by_proto.setdefault(reason, {})[proto] = by_proto.setdefault(reason, {}).get(proto, 0) + n
        return by_reason, by_proto

    def _top_locations(self, window: Window, reason: str | None, n: int = 5) -> list[dict]:
        rows = [(addr, r, c) for (addr, r), c in window.delta("locations").items()
                if (r == reason if reason is not None else r not in NOT_DROPS)]
        rows.sort(key=lambda row: row[2], reverse=True)
        # Names are resolved here, for the few rows shown, and cached: one /proc/kallsyms scan
        # costs ~0.1 s of CPU, too much to spend in the background of an idle daemon.
        names = self.kallsyms.resolve([addr for addr, _r, _c in rows[:n]])
        return [{"location": names[addr], "reason": r, "count": int(c)} for addr, r, c in rows[:n]]

    def diagnose(self, window: Window) -> list[Finding]:
        cfg = self.config
        by_reason, by_proto = self._by_reason(window)
        total = sum(by_reason.values())
        findings: list[Finding] = []

        def base_evidence(reason: str) -> dict[str, Any]:
            count = by_reason[reason]
            return {"drops": int(count), "drops_per_second": round(window.rate(count), 3),
                    "window_seconds": round(window.seconds, 1),
                    "by_protocol": {p: int(v) for p, v in sorted(by_proto[reason].items())},
                    "top_locations": self._top_locations(window, reason)}

        def severity(rate: float) -> str:
            return "critical" if rate >= cfg.drops_rate_critical else "warning"

        if by_reason.get("SOCKET_RCVBUFF"):
            ev = base_evidence("SOCKET_RCVBUFF")
            rmem_default = sysctl.read_int("net.core.rmem_default")
            rmem_max = sysctl.read_int("net.core.rmem_max")
            ev.update({"net.core.rmem_default": rmem_default, "net.core.rmem_max": rmem_max})
            want_max = _suggest_buffer(rmem_max, rmem_default)
            want_default = min(want_max, max(2 * (rmem_default or 212992), 1 << 20))
            findings.append(Finding(
                id="drops.socket_receive_buffer", probe=self.name,
                severity=severity(ev["drops_per_second"]),
                title="Socket receive buffers overflow",
                summary=(f"{ev['drops']} packets were dropped because a socket's receive buffer was "
                         f"full ({ev['drops_per_second']}/s). An application reads too slowly, or its "
                         f"buffer (rmem_default {rmem_default} B, rmem_max {rmem_max} B) is too small "
                         "for its bursts. UDP servers such as CoreDNS and metrics agents are the usual victims."),
                evidence=ev, claims=("drops",),
                remediation=[
                    f"sysctl -w net.core.rmem_max={want_max}",
                    f"sysctl -w net.core.rmem_default={want_default}",
                    f"let the application ask for a bigger buffer: setsockopt(SO_RCVBUF, {want_max}) "
                    "(the kernel caps it at rmem_max)",
                    "find the socket: ss -uamp | awk '$2 > 0' (non-zero Recv-Q) and check the reader's CPU",
                ],
                impact=window.rate(by_reason["SOCKET_RCVBUFF"])))

        if by_reason.get("TCP_LISTEN_OVERFLOW"):
            ev = base_evidence("TCP_LISTEN_OVERFLOW")
            somaxconn = sysctl.read_int("net.core.somaxconn")
            syn_backlog = sysctl.read_int("net.ipv4.tcp_max_syn_backlog")
            ev.update({"net.core.somaxconn": somaxconn, "net.ipv4.tcp_max_syn_backlog": syn_backlog})
            want = max(4096, 2 * (somaxconn or 0))
            findings.append(Finding(
                id="drops.listen_overflow", probe=self.name, severity=severity(ev["drops_per_second"]),
                title="TCP accept queues overflow",
                summary=(f"{ev['drops']} connection attempts were dropped because a listener's accept "
                         f"queue was full ({ev['drops_per_second']}/s). The application accepts too "
                         f"slowly, or its listen() backlog is too small (net.core.somaxconn={somaxconn} "
                         "caps it; the node probe's node.listen_queue_overflow names the listener and "
                         "says whether somaxconn is what limits it)."),
                evidence=ev, claims=("drops",),
                remediation=[
                    "ss -ltn | awk '$2 >= $3'   # the full listener: Recv-Q at Send-Q; Send-Q is its backlog",
                    f"a backlog below somaxconn ({somaxconn}): raise the application's listen() backlog "
                    f"(e.g. nginx 'listen ... backlog={want}') or make it accept faster; no sysctl helps",
                    f"only a backlog equal to somaxconn is capped by it: sysctl -w net.core.somaxconn={want}, "
                    "then restart the application so it calls listen() again",
                ],
                impact=window.rate(by_reason["TCP_LISTEN_OVERFLOW"])))

        if by_reason.get("NETFILTER_DROP"):
            ev = base_evidence("NETFILTER_DROP")
            findings.append(Finding(
                id="drops.netfilter", probe=self.name, severity=severity(ev["drops_per_second"]),
                title="Netfilter drops packets",
                summary=(f"{ev['drops']} packets were dropped by netfilter ({ev['drops_per_second']}/s): "
                         "a firewall or network-policy rule, or conntrack refusing new entries."),
                evidence=ev, claims=("drops",),
                remediation=[
                    "nft list ruleset -a | grep -nE 'drop|reject'   # rules that drop, with handles",
                    "iptables-save -c | grep -E '(DROP|REJECT)' | sort -t[ -k2 -rn | head   # busiest legacy rules",
                    "conntrack -S   # drop, early_drop or insert_failed non-zero means a full or racing conntrack table",
                ],
                impact=window.rate(by_reason["NETFILTER_DROP"])))

        rate = window.rate(total)
        if total and rate >= cfg.drops_rate_warning:
            top = sorted(by_reason.items(), key=lambda kv: kv[1], reverse=True)[:8]
            # Rank by the drops no specific finding above explains, so those findings come first.
            enabled = getattr(cfg, "enabled_probes", ())
            covered = SPECIFIC_REASONS | {r for r, peer in PEER_REASONS.items() if peer in enabled}
            uncovered = sum(n for r, n in by_reason.items() if r not in covered)
            # Severity too: when specific findings explain most drops, this summary is info; it
            # is critical only when drops of packets a receiver wanted reach the critical rate.
            u_rate = window.rate(uncovered)
            lost_rate = window.rate(sum(n for r, n in by_reason.items()
                                        if r not in covered and r not in NO_RECEIVER_REASONS))
            sev = ("info" if u_rate < cfg.drops_rate_warning
                   else "critical" if lost_rate >= cfg.drops_rate_critical else "warning")
            hint = REASON_HINTS.get(top[0][0])
            findings.append(Finding(
                id="drops.top_reasons", probe=self.name, severity=sev,
                title="High packet drop rate",
                summary=(f"The kernel dropped {int(total)} packets in {window.seconds:.0f}s "
                         f"({rate:.1f}/s, threshold {cfg.drops_rate_warning}/s). Top reason: "
                         f"{top[0][0]} ({int(top[0][1])})" + (f": {hint}" if hint else ".")),
                evidence={"drops": int(total), "drops_per_second": round(rate, 3),
                          "window_seconds": round(window.seconds, 1),
                          "threshold_per_second": cfg.drops_rate_warning,
                          "top_reasons": [{"reason": r, "drops": int(n),
                                           "drops_per_second": round(window.rate(n), 3)} for r, n in top],
                          "top_locations": self._top_locations(window, None)},
                claims=("drops",),
                remediation=REASON_STEPS.get(top[0][0], []) + [
                    f"look up the top reason {top[0][0]} in the kernel's enum skb_drop_reason "
                    "(include/net/dropreason-core.h) and its top location above",
                    "watch it live: perf record -e skb:kfree_skb -g -a -- sleep 10 && perf script",
                ],
                impact=window.rate(uncovered)))
        return findings


def _suggest_buffer(rmem_max: int | None, rmem_default: int | None) -> int:
    """Next power of two at or above 4x the larger current value, between 4 MiB and 64 MiB,
    but never below the current values (advice must not shrink a buffer that overflows)."""
    base = max(rmem_max or 0, rmem_default or 0, 1 << 20) * 4
    want = 1 << (base - 1).bit_length()
    return max(4 << 20, min(want, 64 << 20), rmem_max or 0, rmem_default or 0)

