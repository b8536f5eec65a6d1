"""The drops probe's findings: one pure function per finding id.

Each function reads a ``DropsWindow`` (the window's drops by reason and protocol, their
locations, and the node facts collect() read into the reading: the sysctls) plus the config
values it needs, and returns a Finding or None. Nothing here reads /proc or a sysctl; the one
outside service, naming kernel addresses, is injected as ``DropsWindow.resolve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from dpwatch.probes.base import Finding, Window

PROBE = "drops"
# Reasons that are not drops: the kernel may trace them through kfree_skb on some versions.
NOT_DROPS = frozenset({"NOT_DROPPED_YET", "CONSUMED"})
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
# The sysctls the findings show and size their advice on; collect() reads them into
# reading["info"]["sysctls"].
SYSCTLS = ("net.core.rmem_default", "net.core.rmem_max", "net.core.somaxconn",
           "net.ipv4.tcp_max_syn_backlog")

Resolver = Callable[[Iterable[int]], Mapping[int, str]]


@dataclass(frozen=True)
class DropsWindow:
    """One window of the drops reading, as the findings read it."""
    seconds: float
    by_reason: Mapping[str, float]                # real drops (no NOT_DROPS) by reason
    by_proto: Mapping[str, Mapping[str, float]]   # reason -> protocol class -> drops
    locations: Mapping[tuple[int, str], float]    # (kernel address, reason) -> drops
    sysctls: Mapping[str, int | None]             # node facts read by collect()
    resolve: Resolver                             # kernel address -> "symbol+0xoff"

    @classmethod
    def of(cls, window: Window, resolve: Resolver) -> "DropsWindow":
        by_reason: dict[str, float] = {}
        by_proto: dict[str, dict[str, float]] = {}
        for (reason, proto), n in window.delta("drops").items():
            if reason in NOT_DROPS:
                continue
            by_reason[reason] = by_reason.get(reason, 0) + n
            protos = by_proto.setdefault(reason, {})
            protos[proto] = protos.get(proto, 0) + n
        sysctls = (window.new.get("info") or {}).get("sysctls") or {}
        return cls(window.seconds, by_reason, by_proto, window.delta("locations"), sysctls, resolve)

    def rate(self, value: float) -> float:
        return value / self.seconds

    def sysctl(self, key: str) -> int | None:
        return self.sysctls.get(key)

    def top_locations(self, reason: str | None, n: int = 5) -> list[dict]:
        """The n busiest drop locations of one reason (None: of every real drop), named."""
        rows = [(addr, r, c) for (addr, r), c in self.locations.items()
                if (r == reason if reason is not None else r not in NOT_DROPS)]
        rows.sort(key=lambda row: row[2], reverse=True)
        # Names are resolved here, for the few rows shown, and cached by the resolver: one
        # /proc/kallsyms scan costs ~0.1 s of CPU, too much for the background of an idle daemon.
        names = self.resolve([addr for addr, _r, _c in rows[:n]])
        return [{"location": names[addr], "reason": r, "count": int(c)} for addr, r, c in rows[:n]]

    def evidence(self, reason: str) -> dict[str, Any]:
        """The evidence every reason-specific finding starts from."""
        count = self.by_reason[reason]
        return {"drops": int(count), "drops_per_second": round(self.rate(count), 3),
                "window_seconds": round(self.seconds, 1),
                "by_protocol": {p: int(v) for p, v in sorted(self.by_proto[reason].items())},
                "top_locations": self.top_locations(reason)}


def _rated(w: DropsWindow, reason: str, rate_critical: float, ev: dict[str, Any]) -> dict[str, Any]:
    """What every finding of one drop reason shares: its evidence claims the drops, its severity
    is critical from --drops-rate-critical, its impact is the reason's rate."""
    return {"probe": PROBE, "evidence": ev, "claims": ("drops",),
            "severity": "critical" if ev["drops_per_second"] >= rate_critical else "warning",
            "impact": w.rate(w.by_reason[reason])}


def suggest_buffer(rmem_max: int | None, rmem_default: int | None) -> int:
    """Next power of two at or above 4x the larger current value, between 4 MiB and 64 MiB,
    but never below the current values (advice must not shrink a buffer that overflows)."""
    base = max(rmem_max or 0, rmem_default or 0, 1 << 20) * 4
    want = 1 << (base - 1).bit_length()
    return max(4 << 20, min(want, 64 << 20), rmem_max or 0, rmem_default or 0)


def socket_receive_buffer(w: DropsWindow, rate_critical: float) -> Finding | None:
    """drops.socket_receive_buffer: SOCKET_RCVBUFF drops, with rmem advice that never shrinks."""
    if not w.by_reason.get("SOCKET_RCVBUFF"):
        return None
    ev = w.evidence("SOCKET_RCVBUFF")
    rmem_default, rmem_max = w.sysctl("net.core.rmem_default"), w.sysctl("net.core.rmem_max")
    ev.update({"net.core.rmem_default": rmem_default, "net.core.rmem_max": rmem_max})
    want_max = suggest_buffer(rmem_max, rmem_default)
    want_default = min(want_max, max(2 * (rmem_default or 212992), 1 << 20))
    return Finding(
        id="drops.socket_receive_buffer", **_rated(w, "SOCKET_RCVBUFF", rate_critical, ev),
        title="Socket receive buffers overflow",
        summary=(f"{ev['drops']} packets were dropped because a socket's receive buffer was "
                 f"full ({ev['drops_per_second']}/s). An application reads too slowly, or its "
                 f"buffer (rmem_default {rmem_default} B, rmem_max {rmem_max} B) is too small "
                 "for its bursts. UDP servers such as CoreDNS and metrics agents are the usual victims."),
        remediation=[
            f"sysctl -w net.core.rmem_max={want_max}",
            f"sysctl -w net.core.rmem_default={want_default}",
            f"let the application ask for a bigger buffer: setsockopt(SO_RCVBUF, {want_max}) "
            "(the kernel caps it at rmem_max)",
            "find the socket: ss -uamp | awk '$2 > 0' (non-zero Recv-Q) and check the reader's CPU",
        ])


def listen_overflow(w: DropsWindow, rate_critical: float) -> Finding | None:
    """drops.listen_overflow: TCP_LISTEN_OVERFLOW drops; somaxconn advised only for a backlog it caps."""
    if not w.by_reason.get("TCP_LISTEN_OVERFLOW"):
        return None
    ev = w.evidence("TCP_LISTEN_OVERFLOW")
    somaxconn = w.sysctl("net.core.somaxconn")
    syn_backlog = w.sysctl("net.ipv4.tcp_max_syn_backlog")
    ev.update({"net.core.somaxconn": somaxconn, "net.ipv4.tcp_max_syn_backlog": syn_backlog})
    want = max(4096, 2 * (somaxconn or 0))
    return Finding(
        id="drops.listen_overflow", **_rated(w, "TCP_LISTEN_OVERFLOW", rate_critical, ev),
        title="TCP accept queues overflow",
        summary=(f"{ev['drops']} connection attempts were dropped because a listener's accept "
                 f"queue was full ({ev['drops_per_second']}/s). The application accepts too "
                 f"slowly, or its listen() backlog is too small (net.core.somaxconn={somaxconn} "
                 "caps it; the node probe's node.listen_queue_overflow names the listener and "
                 "says whether somaxconn is what limits it)."),
        remediation=[
            "ss -ltn | awk '$2 >= $3'   # the full listener: Recv-Q at Send-Q; Send-Q is its backlog",
            f"a backlog below somaxconn ({somaxconn}): raise the application's listen() backlog "
            f"(e.g. nginx 'listen ... backlog={want}') or make it accept faster; no sysctl helps",
            f"only a backlog equal to somaxconn is capped by it: sysctl -w net.core.somaxconn={want}, "
            "then restart the application so it calls listen() again",
        ])


def netfilter(w: DropsWindow, rate_critical: float) -> Finding | None:
    """drops.netfilter: NETFILTER_DROP drops (a rule, or conntrack refusing new entries)."""
    if not w.by_reason.get("NETFILTER_DROP"):
        return None
    ev = w.evidence("NETFILTER_DROP")
    return Finding(
        id="drops.netfilter", **_rated(w, "NETFILTER_DROP", rate_critical, ev),
        title="Netfilter drops packets",
        summary=(f"{ev['drops']} packets were dropped by netfilter ({ev['drops_per_second']}/s): "
                 "a firewall or network-policy rule, or conntrack refusing new entries."),
        remediation=[
            "nft list ruleset -a | grep -nE 'drop|reject'   # rules that drop, with handles",
            "iptables-save -c | grep -E '(DROP|REJECT)' | sort -t[ -k2 -rn | head   # busiest legacy rules",
            "conntrack -S   # drop, early_drop or insert_failed non-zero means a full or racing conntrack table",
        ])


def top_reasons(w: DropsWindow, rate_warning: float, rate_critical: float,
                enabled_probes: Iterable[str] = ()) -> Finding | None:
    """drops.top_reasons: every drop at or above the warning rate, ranked and rated by the
    drops no specific finding (here or in an enabled peer probe) explains."""
    total = sum(w.by_reason.values())
    rate = w.rate(total)
    if not total or rate < rate_warning:
        return None
    top = sorted(w.by_reason.items(), key=lambda kv: kv[1], reverse=True)[:8]
    enabled = set(enabled_probes)
    covered = SPECIFIC_REASONS | {r for r, peer in PEER_REASONS.items() if peer in enabled}
    uncovered = sum(n for r, n in w.by_reason.items() if r not in covered)
    # When specific findings explain most drops, this summary is info; it is critical only
    # when drops of packets a receiver wanted reach the critical rate.
    lost_rate = w.rate(sum(n for r, n in w.by_reason.items()
                           if r not in covered and r not in NO_RECEIVER_REASONS))
    sev = ("info" if w.rate(uncovered) < rate_warning
           else "critical" if lost_rate >= rate_critical else "warning")
    hint = REASON_HINTS.get(top[0][0])
    return Finding(
        id="drops.top_reasons", probe=PROBE, severity=sev,
        title="High packet drop rate",
        summary=(f"The kernel dropped {int(total)} packets in {w.seconds:.0f}s "
                 f"({rate:.1f}/s, threshold {rate_warning}/s). Top reason: "
                 f"{top[0][0]} ({int(top[0][1])})" + (f": {hint}" if hint else ".")),
        evidence={"drops": int(total), "drops_per_second": round(rate, 3),
                  "window_seconds": round(w.seconds, 1),
                  "threshold_per_second": rate_warning,
                  "top_reasons": [{"reason": r, "drops": int(n),
                                   "drops_per_second": round(w.rate(n), 3)} for r, n in top],
                  "top_locations": w.top_locations(None)},
        claims=("drops",),
        remediation=REASON_STEPS.get(top[0][0], []) + [
            f"look up the top reason {top[0][0]} in the kernel's enum skb_drop_reason "
            "(include/net/dropreason-core.h) and its top location above",
            "watch it live: perf record -e skb:kfree_skb -g -a -- sleep 10 && perf script",
        ],
        impact=w.rate(uncovered))


# Finding id -> its function, in the order diagnose() emits them.
FINDINGS = {
    "drops.socket_receive_buffer": socket_receive_buffer,
    "drops.listen_overflow": listen_overflow,
    "drops.netfilter": netfilter,
    "drops.top_reasons": top_reasons,
}
