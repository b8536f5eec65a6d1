"""frag: IP fragmentation and reassembly, from the kernel's own counters.

Counters: /proc/net/snmp (Ip: FragCreates, FragOKs, FragFails, ReasmReqds, ReasmOKs,
ReasmFails, ReasmTimeout; Icmp: In/OutDestUnreachs) and /proc/net/snmp6 (the Ip6 and Icmp6
equivalents), of the daemon's own netns. The frag-related drop reasons (PKT_TOO_BIG,
FRAG_REASM_TIMEOUT, DUP_FRAG, FRAG_TOO_FAR) come from the drops probe's maps when it is
attached: the same skb:kfree_skb attach, read again, never a second one.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily

from ..daemon import sysctl
from ..daemon.snmp import SnmpFiles
from .base import Finding, Hook, Mode, Probe, Reading, Window

# Our counter name -> (snmp table, key) for IPv4, and the snmp6 key for IPv6.
COUNTERS = {
    "frag_creates": (("Ip", "FragCreates"), "Ip6FragCreates"),
    "frag_oks": (("Ip", "FragOKs"), "Ip6FragOKs"),
    "frag_fails": (("Ip", "FragFails"), "Ip6FragFails"),
    "reasm_reqds": (("Ip", "ReasmReqds"), "Ip6ReasmReqds"),
    "reasm_oks": (("Ip", "ReasmOKs"), "Ip6ReasmOKs"),
    "reasm_fails": (("Ip", "ReasmFails"), "Ip6ReasmFails"),
    "reasm_timeout": (("Ip", "ReasmTimeout"), "Ip6ReasmTimeout"),
    "dest_unreach_in": (("Icmp", "InDestUnreachs"), "Icmp6InDestUnreachs"),
    "dest_unreach_out": (("Icmp", "OutDestUnreachs"), "Icmp6OutDestUnreachs"),
}
FRAG_DROP_REASONS = ("PKT_TOO_BIG", "FRAG_REASM_TIMEOUT", "DUP_FRAG", "FRAG_TOO_FAR")


def counters_from_snmp(v4: dict[str, dict[str, int]], v6: dict[str, int]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for name, ((table, key), key6) in COUNTERS.items():
        if key in v4.get(table, {}):
            out[(name, "ipv4")] = v4[table][key]
        if key6 in v6:
            out[(name, "ipv6")] = v6[key6]
    return out


class FragProbe(Probe):
    name = "frag"
    bpf_source = None
    description = "IP fragments created, fragmentation failures, reassembly failures and timeouts"
    finding_ids = ('frag.fragmentation_active', 'frag.fragmentation_failed', 'frag.reassembly_failures')
    modes = (
        Mode("snmp", (Hook("procfs", "/proc/net/snmp"),),
             "kernel snmp counters of the daemon's netns, plus frag drop reasons from the drops probe",
             bpf=False),
    )

    def __init__(self, config: Any):
        super().__init__(config)
        self.files: SnmpFiles | None = None

    def attach(self, module) -> None:
        self.module = module
        self._attached = []
        self.files = SnmpFiles()  # bound to the attaching thread's netns

    def close(self) -> None:
        if self.files:
            self.files.close()
            self.files = None
        super().close()

    def collect(self) -> Reading:
        v4, v6 = self.files.read()
        counters: dict[str, dict] = {"snmp": counters_from_snmp(v4, v6)}
        drops = self.peers.get("drops")
        if drops is not None and drops.module is not None:
            counters["drop_reasons"] = {(r,): drops.reason_total(r) for r in FRAG_DROP_REASONS}
        return {"counters": counters, "gauges": {}}

    def metrics(self, reading: Reading) -> Iterable:
        fams = {
            "frag_creates": ("dpwatch_ip_fragments_created", "IP fragments this node created."),
            "frag_fails": ("dpwatch_ip_fragmentation_failed", "Packets that needed fragmenting but "
                           "could not be (DF set, or IPv6 in transit): dropped."),
            "reasm_fails": ("dpwatch_ip_reassembly_failed", "Reassembly failures (fragments dropped)."),
            "reasm_timeout": ("dpwatch_ip_reassembly_timeouts", "Fragment sets that timed out "
                              "incomplete (ipfrag_time)."),
            "reasm_reqds": ("dpwatch_ip_fragments_received", "IP fragments received for reassembly."),
        }
        out = {k: CounterMetricFamily(n, h, labels=["family"]) for k, (n, h) in fams.items()}
        unreach = CounterMetricFamily("dpwatch_icmp_dest_unreachable", "ICMP destination unreachable "
                                      "messages, by direction.", labels=["family", "direction"])
        for (name, family), value in sorted(reading["counters"]["snmp"].items()):
            if name in out:
                out[name].add_metric([family], value)
            elif name == "dest_unreach_in":
                unreach.add_metric([family, "received"], value)
            elif name == "dest_unreach_out":
                unreach.add_metric([family, "sent"], value)
        yield from out.values()
        yield unreach

    def diagnose(self, window: Window) -> list[Finding]:
        cfg = self.config
        d = window.delta("snmp")
        drops = {r: int(n) for (r,), n in window.delta("drop_reasons").items()} if \
            "drop_reasons" in window.new["counters"] else {}
        findings: list[Finding] = []
        created = {f: int(d.get(("frag_creates", f), 0)) for f in ("ipv4", "ipv6")}
        failed = {f: int(d.get(("frag_fails", f), 0)) for f in ("ipv4", "ipv6")}
        rate = window.rate(sum(created.values()))
        common = {"pkt_too_big_drops": drops.get("PKT_TOO_BIG", 0), "window_seconds": round(window.seconds, 1)}
        if sum(created.values()) and rate >= cfg.frag_rate_warning:
            findings.append(Finding(
                id="frag.fragmentation_active", probe=self.name, severity="warning",
                title="The node is fragmenting packets",
                summary=(f"This node created {sum(created.values())} IP fragments in "
                         f"{window.seconds:.0f}s ({rate:.1f}/s). Fragmentation means a path MTU is "
                         "smaller than what senders use: typically an overlay (VXLAN/Geneve/IPIP/"
                         "WireGuard) whose overhead was not taken off the pod MTU. Fragments cost CPU, "
                         "break through NAT/conntrack and firewalls, and any lost fragment loses the "
                         "packet."),
                evidence={"fragments_created": created, "fragmentation_failed": failed,
                          "fragments_created_per_second": round(rate, 3), **common},
                claims=("fragments_created",),
                remediation=[
                    "find the MTU mismatch: see the mtu probe's findings (mtu.mismatch), or "
                    "ip -d link show | grep -E 'mtu|vxlan|geneve'",
                    "lower the pod/overlay MTU so that packets fit the underlay (overlay MTU = underlay "
                    "MTU - overhead: VXLAN 50, Geneve 50+, IPIP 20, WireGuard 60/80)",
                ],
                impact=rate))
        if sum(failed.values()):
            # DF set (or IPv6, which routers never fragment): the packet is dropped, and the
            # sender learns the path MTU only from the ICMP frag-needed / packet-too-big the
            # node sends (mtu.pmtu_frag_needed, into which triage folds this).
            findings.append(Finding(
                id="frag.fragmentation_failed", probe=self.name, severity="warning",
                title="Packets too big for the next hop are dropped",
                summary=(f"{sum(failed.values())} packets in {window.seconds:.0f}s were bigger than the "
                         "MTU of the link they were to leave by and could not be fragmented (DF set, or "
                         "IPv6 in transit), so the node dropped them. Senders recover only if the ICMP "
                         "frag-needed / packet-too-big reaches them; where it is filtered, or the "
                         "sender ignores it, large packets vanish: a path MTU black hole."),
                evidence={"fragmentation_failed": failed, "fragments_created": created,
                          "fragmentation_failed_per_second": round(window.rate(sum(failed.values())), 3),
                          **common},
                claims=("fragmentation_failed",),
                remediation=[
                    "find the link with the smaller MTU: ip -d link show | grep -E 'mtu|vxlan|geneve', "
                    "and the mtu probe's findings (mtu.mismatch, mtu.pmtu_frag_needed)",
                    "make senders use the path MTU: equal MTUs on both sides of the node, or the "
                    "smaller one on the pods (the CNI's MTU setting)",
                    "never filter ICMP type 3 code 4 / ICMPv6 type 2 between the node and the senders",
                ],
                impact=window.rate(sum(failed.values()))))
        rfail = {f: int(d.get(("reasm_fails", f), 0)) for f in ("ipv4", "ipv6")}
        rtime = {f: int(d.get(("reasm_timeout", f), 0)) for f in ("ipv4", "ipv6")}
        if sum(rfail.values()) or sum(rtime.values()):
            ipfrag_time = sysctl.read_int("net.ipv4.ipfrag_time")
            high = sysctl.read_int("net.ipv4.ipfrag_high_thresh")
            findings.append(Finding(
                id="frag.reassembly_failures", probe=self.name, severity="warning",
                title="IP reassembly fails",
                summary=(f"{sum(rfail.values())} reassembly failures ({sum(rtime.values())} timeouts) in "
                         f"{window.seconds:.0f}s: fragments arrive incomplete, late or duplicated, so "
                         "whole packets are lost. Usually a fragment was dropped on the path (a "
                         "firewall or a too-small MTU), or the reassembly memory is exhausted."),
                evidence={"reassembly_failed": rfail, "reassembly_timeouts": rtime,
                          "drop_reasons": {r: drops.get(r, 0) for r in FRAG_DROP_REASONS[1:]},
                          "net.ipv4.ipfrag_time": ipfrag_time,
                          "net.ipv4.ipfrag_high_thresh": high,
                          "window_seconds": round(window.seconds, 1)},
                claims=("reassembly_failed",) if sum(rfail.values()) else ("reassembly_timeouts",),
                remediation=[
                    "stop the fragmentation at its source: fix the MTU (see frag.fragmentation_active "
                    "and mtu.mismatch)",
                    f"if DUP_FRAG/FRAG_TOO_FAR drops dominate, allow more reassembly memory: "
                    f"sysctl -w net.ipv4.ipfrag_high_thresh={max(8 << 20, 2 * (high or 0))}",
                ],
                impact=window.rate(sum(rfail.values()))))
        return findings
