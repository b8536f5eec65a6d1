"""frag: IP fragmentation and reassembly, from the kernel's own counters.

Counters: /proc/net/snmp (Ip: FragCreates, FragOKs, FragFails, ReasmReqds, ReasmOKs,
ReasmFails, ReasmTimeout; Icmp: In/OutDestUnreachs) and /proc/net/snmp6 (the Ip6 and Icmp6
equivalents), of the daemon's own netns. The frag-related drop reasons (PKT_TOO_BIG,
FRAG_REASM_TIMEOUT, DUP_FRAG, FRAG_TOO_FAR) come from the drops probe's maps when it is
attached: the same skb:kfree_skb attach, read again, never a second one.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily

from dpwatch.daemon.host import sysctl
from dpwatch.probes.mtu.audit import OVERHEAD
from dpwatch.daemon.host.snmp import SnmpFiles
from dpwatch.probes.drops.readings import reason_totals
from dpwatch.probes.frag import params as params_mod
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window

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
# Tunnel kinds (probes/mtu/audit.py's): with one up, fragmentation is most likely its overhead.
OVERLAY_KINDS = frozenset(OVERHEAD)


def parse_sockstat_frag(text: str, tag: str) -> int | None:
    """Bytes held by IP reassembly: the memory of the ``tag`` line ("FRAG:" in /proc/net/sockstat,
    "FRAG6:" in sockstat6: 'FRAG: inuse 5 memory 21736'), None when there is none."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == tag:
            fields = dict(zip(parts[1::2], parts[2::2]))
            try:
                return int(fields["memory"])
            except (KeyError, ValueError):
                return None
    return None


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
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    # frag drop reasons (DUP_FRAG, FRAG_TOO_FAR, ...) from drops; the node's own links from mtu's audit
    needs = ("drops", "mtu")
    modes = (
        Mode("snmp", (Hook("procfs", "/proc/net/snmp"),),
             "kernel snmp counters of the daemon's netns, plus frag drop reasons from the drops probe",
             bpf=False),
    )

    def __init__(self, config: Any):
        super().__init__(config)
        self.files: SnmpFiles | None = None
        self._sockstat: dict[str, Any] = {}  # family -> held /proc/thread-self/net/sockstat(6)

    def attach(self, module) -> None:
        self.module = module
        self._attached = []
        self.files = SnmpFiles()  # bound to the attaching thread's netns
        for family, name in (("ipv4", "sockstat"), ("ipv6", "sockstat6")):
            try:
                self._sockstat[family] = open(f"/proc/thread-self/net/{name}", "rb", buffering=0)
            except OSError:  # IPv6 disabled: no reassembly memory to read
                pass

    def close(self) -> None:
        if self.files:
            self.files.close()
            self.files = None
        for fh in self._sockstat.values():
            fh.close()
        self._sockstat.clear()
        super().close()

    def collect(self, inputs=None) -> Reading:
        v4, v6 = self.files.read()
        counters: dict[str, dict] = {"snmp": counters_from_snmp(v4, v6)}
        if "drops" in (inputs or {}):
            counters["drop_reasons"] = reason_totals(inputs["drops"], FRAG_DROP_REASONS)
        memory: dict[tuple[str], int] = {}
        for family, fh in self._sockstat.items():
            try:
                value = parse_sockstat_frag(os.pread(fh.fileno(), 1 << 14, 0).decode(),
                                            "FRAG:" if family == "ipv4" else "FRAG6:")
            except OSError:
                value = None
            if value is not None:
                memory[(family,)] = value
        info = {}
        if "mtu" in (inputs or {}):
            info["mtu_links"] = list(inputs["mtu"].get("info", {}).get("own_links", []))
        return {"counters": counters, "gauges": {"frag_memory": memory}, "info": info}

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
            smaller, largest, overlay = smaller_links(window.new.get("info", {}).get("mtu_links"))
            where = ("typically an overlay (VXLAN/Geneve/IPIP/WireGuard) whose overhead was not taken "
                     "off the pod MTU")
            if smaller and not overlay:
                where = ("here the node's own links differ: " +
                         ", ".join(f"{l['name']} (MTU {l['mtu']})" for l in smaller) +
                         f" below the {largest} of the others, so what it forwards onto them from "
                         "the bigger ones is fragmented")
            extra = {"smaller_links": smaller, "largest_link_mtu": largest} if smaller else {}
            findings.append(Finding(
                id="frag.fragmentation_active", probe=self.name, severity="warning",
                title="The node is fragmenting packets",
                summary=(f"This node created {sum(created.values())} IP fragments in "
                         f"{window.seconds:.0f}s ({rate:.1f}/s). Fragmentation means a path MTU is "
                         f"smaller than what senders use: {where}. Fragments cost CPU, "
                         "break through NAT/conntrack and firewalls, and any lost fragment loses the "
                         "packet."),
                evidence={"fragments_created": created, "fragmentation_failed": failed,
                          "fragments_created_per_second": round(rate, 3), **extra, **common},
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
            findings.append(self._reassembly(window, rfail, rtime, drops))
        return findings

    def _reassembly(self, window: Window, rfail: dict[str, int], rtime: dict[str, int],
                    drops: dict[str, int]) -> Finding:
        """frag.reassembly_failures, with what the counters say about the cause. ReasmFails
        counts timeouts (ReasmTimeout), bad fragments (overlapping: DUP_FRAG; too far out of
        order: FRAG_TOO_FAR) and fragments refused because reassembly memory is above
        ipfrag_high_thresh (no queue is made for them; freed without a reason)."""
        ipfrag_time = sysctl.read_int("net.ipv4.ipfrag_time")
        high = sysctl.read_int("net.ipv4.ipfrag_high_thresh")
        fails, timeouts = sum(rfail.values()), sum(rtime.values())
        beyond = {f: max(0, rfail[f] - rtime[f]) for f in rfail}
        dup, far = drops.get("DUP_FRAG", 0), drops.get("FRAG_TOO_FAR", 0)
        memory = {f: int(v) for (f,), v in window.new.get("gauges", {}).get("frag_memory", {}).items()}
        # Failures that neither a timeout nor a bad fragment explains: refused for memory. With
        # bad fragments in the window too, only when the memory is seen at least half full (a
        # flood of one source's fragments gets both: FRAG_TOO_FAR and a full memory).
        refused = max(0, sum(beyond.values()) - dup - far)
        if (dup or far) and not any(high and v >= high // 2 for v in memory.values()):
            refused = 0
        ev = {"reassembly_failed": rfail, "reassembly_timeouts": rtime,
              "failed_without_timeout": beyond,
              "drop_reasons": {r: drops.get(r, 0) for r in FRAG_DROP_REASONS[1:]},
              "net.ipv4.ipfrag_time": ipfrag_time,
              "net.ipv4.ipfrag_high_thresh": high}
        if memory:
            ev["reassembly_memory_bytes"] = memory
        ev["window_seconds"] = round(window.seconds, 1)
        summary = (f"{fails} reassembly failures ({timeouts} timeouts) in {window.seconds:.0f}s: whole "
                   "packets are lost.")
        fix = ["stop the fragmentation at its source: fix the MTU (see frag.fragmentation_active "
               "and mtu.mismatch)"]
        if timeouts:
            summary += (f" {timeouts} fragment sets timed out incomplete (net.ipv4.ipfrag_time "
                        f"{ipfrag_time} s): a fragment was lost on the way (a firewall that drops "
                        "fragments, or loss on the path).")
            fix.append("find where fragments are lost: rules that drop fragments (non-first fragments "
                       "carry no ports: nft list ruleset | grep -n -E 'frag|drop'), drops on the senders' path")
        if refused:
            held = memory.get("ipv4" if beyond["ipv4"] else "ipv6")
            summary += (f" {refused} failed without a timeout or a bad fragment: the kernel refuses "
                        "fragments while the reassembly memory is above net.ipv4.ipfrag_high_thresh "
                        f"({high} bytes)" + (f"; it holds {held} bytes now" if held is not None else "") +
                        ". Incomplete sets keep their memory until they time out.")
            fix.append(f"sysctl -w net.ipv4.ipfrag_high_thresh={max(8 << 20, 2 * (high or 0))}"
                       + ("   # and net.ipv6.ip6frag_high_thresh" if beyond["ipv6"] else ""))
            fix.append(f"if a flood of incomplete fragment sets fills it, shorten how long each is kept: "
                       f"sysctl -w net.ipv4.ipfrag_time={max(1, min(ipfrag_time or 30, 30) // 2)}")
        if dup or far:
            summary += (f" {dup} duplicate or overlapping fragments and {far} fragments too far out of "
                        "order (net.ipv4.ipfrag_max_dist) were dropped with their sets.")
            if dup:
                fix.append("overlapping fragments come from a broken sender or an attack: find the source "
                           "with tcpdump -ni any 'ip[6:2] & 0x3fff != 0'")
            if far:
                fix.append("a source whose fragments arrive this much out of order: raise "
                           "net.ipv4.ipfrag_max_dist (0 turns the check off)")
        return Finding(
            id="frag.reassembly_failures", probe=self.name, severity="warning",
            title="IP reassembly fails", summary=summary, evidence=ev,
            claims=("reassembly_failed",) if fails else ("reassembly_timeouts",),
            remediation=fix, impact=window.rate(fails))


def smaller_links(own_links: list[dict] | None) -> tuple[list[dict], int | None, bool]:
    """From the mtu probe's last audit (its reading's own_links: the daemon's netns), the up
    links (not loopback) whose MTU is below the largest: the links the node fragments for when
    it forwards from the others. Also that largest MTU, and whether an overlay device is up."""
    links = [l for l in own_links or () if l["up"] and l["kind"] != "loopback" and l["mtu"]]
    overlay = any(l["kind"] in OVERLAY_KINDS for l in links)
    if not links:
        return [], None, overlay
    largest = max(l["mtu"] for l in links)
    smaller = sorted((l for l in links if l["mtu"] < largest), key=lambda l: (l["mtu"], l["name"]))
    return [{"name": l["name"], "kind": l["kind"], "mtu": l["mtu"]} for l in smaller[:5]], largest, overlay
