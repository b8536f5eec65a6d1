"""The frag probe's findings: one pure function per finding id, over the window of its readings.

Everything a finding reads is in the readings: the snmp counters, the frag drop reasons (from
the drops probe's reading), the reassembly memory, the node's own links (from the mtu probe's
reading) and the reassembly sysctls (read in collect: info["sysctls"]). No finding reads
/proc, /sys or sysctls itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpwatch.probes.base import Finding, Window
from dpwatch.probes.encap import OVERHEAD

PROBE = "frag"
FAMILIES = ("ipv4", "ipv6")
FRAG_DROP_REASONS = ("PKT_TOO_BIG", "FRAG_REASM_TIMEOUT", "DUP_FRAG", "FRAG_TOO_FAR")
# The sysctls collect() puts in the reading's info["sysctls"] for frag.reassembly_failures.
SYSCTLS = ("net.ipv4.ipfrag_time", "net.ipv4.ipfrag_high_thresh")
# Tunnel kinds (probes/encap.py): with one up, fragmentation is most likely its overhead.
OVERLAY_KINDS = frozenset(OVERHEAD)


@dataclass
class Counts:
    """The window's snmp deltas by family, and its frag drop reasons (empty without drops)."""
    created: dict[str, int]
    failed: dict[str, int]
    reasm_failed: dict[str, int]
    reasm_timeouts: dict[str, int]
    drops: dict[str, int]


def counts(window: Window) -> Counts:
    d = window.delta("snmp")
    drops = {r: int(n) for (r,), n in window.delta("drop_reasons").items()} if \
        "drop_reasons" in window.new["counters"] else {}

    def of(name: str) -> dict[str, int]:
        return {f: int(d.get((name, f), 0)) for f in FAMILIES}
    return Counts(of("frag_creates"), of("frag_fails"), of("reasm_fails"), of("reasm_timeout"), drops)


def _common(window: Window, c: Counts) -> dict:
    return {"pkt_too_big_drops": c.drops.get("PKT_TOO_BIG", 0), "window_seconds": round(window.seconds, 1)}


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


def fragmentation_active(window: Window, rate_warning: float) -> Finding | None:
    """frag.fragmentation_active: the node created fragments at ``rate_warning``/s or more."""
    c = counts(window)
    total = sum(c.created.values())
    rate = window.rate(total)
    if not total or rate < rate_warning:
        return None
    smaller, largest, overlay = smaller_links(window.new.get("info", {}).get("mtu_links"))
    where = ("typically an overlay (VXLAN/Geneve/IPIP/WireGuard) whose overhead was not taken "
             "off the pod MTU")
    if smaller and not overlay:
        where = ("here the node's own links differ: " +
                 ", ".join(f"{l['name']} (MTU {l['mtu']})" for l in smaller) +
                 f" below the {largest} of the others, so what it forwards onto them from "
                 "the bigger ones is fragmented")
    extra = {"smaller_links": smaller, "largest_link_mtu": largest} if smaller else {}
    return Finding(
        id="frag.fragmentation_active", probe=PROBE, severity="warning",
        title="The node is fragmenting packets",
        summary=(f"This node created {total} IP fragments in "
                 f"{window.seconds:.0f}s ({rate:.1f}/s). Fragmentation means a path MTU is "
                 f"smaller than what senders use: {where}. Fragments cost CPU, "
                 "break through NAT/conntrack and firewalls, and any lost fragment loses the "
                 "packet."),
        evidence={"fragments_created": c.created, "fragmentation_failed": c.failed,
                  "fragments_created_per_second": round(rate, 3), **extra, **_common(window, c)},
        claims=("fragments_created",),
        remediation=[
            "find the MTU mismatch: see the mtu probe's findings (mtu.mismatch), or "
            "ip -d link show | grep -E 'mtu|vxlan|geneve'",
            "lower the pod/overlay MTU so that packets fit the underlay (overlay MTU = underlay "
            "MTU - overhead: VXLAN 50, Geneve 50+, IPIP 20, WireGuard 60/80)",
        ],
        impact=rate)


def fragmentation_failed(window: Window) -> Finding | None:
    """frag.fragmentation_failed: packets too big for the next hop that could not be fragmented.
    DF set (or IPv6, which routers never fragment): the packet is dropped, and the sender
    learns the path MTU only from the ICMP frag-needed / packet-too-big the node sends
    (mtu.pmtu_frag_needed, into which triage folds this)."""
    c = counts(window)
    total = sum(c.failed.values())
    if not total:
        return None
    return Finding(
        id="frag.fragmentation_failed", probe=PROBE, severity="warning",
        title="Packets too big for the next hop are dropped",
        summary=(f"{total} packets in {window.seconds:.0f}s were bigger than the "
                 "MTU of the link they were to leave by and could not be fragmented (DF set, or "
                 "IPv6 in transit), so the node dropped them. Senders recover only if the ICMP "
                 "frag-needed / packet-too-big reaches them; where it is filtered, or the "
                 "sender ignores it, large packets vanish: a path MTU black hole."),
        evidence={"fragmentation_failed": c.failed, "fragments_created": c.created,
                  "fragmentation_failed_per_second": round(window.rate(total), 3),
                  **_common(window, c)},
        claims=("fragmentation_failed",),
        remediation=[
            "find the link with the smaller MTU: ip -d link show | grep -E 'mtu|vxlan|geneve', "
            "and the mtu probe's findings (mtu.mismatch, mtu.pmtu_frag_needed)",
            "make senders use the path MTU: equal MTUs on both sides of the node, or the "
            "smaller one on the pods (the CNI's MTU setting)",
            "never filter ICMP type 3 code 4 / ICMPv6 type 2 between the node and the senders",
        ],
        impact=window.rate(total))


def _refused(c: Counts, beyond: dict[str, int], memory: dict[str, int], high: int | None) -> int:
    """Failures that neither a timeout nor a bad fragment explains: refused for memory. With
    bad fragments in the window too, only when the memory is seen at least half full (a flood
    of one source's fragments gets both: FRAG_TOO_FAR and a full memory)."""
    dup, far = c.drops.get("DUP_FRAG", 0), c.drops.get("FRAG_TOO_FAR", 0)
    refused = max(0, sum(beyond.values()) - dup - far)
    if (dup or far) and not any(high and v >= high // 2 for v in memory.values()):
        refused = 0
    return refused


def _reassembly_text(window: Window, c: Counts, beyond: dict[str, int], refused: int,
                     memory: dict[str, int], sysctls: dict) -> tuple[str, list[str]]:
    """frag.reassembly_failures' summary and remediation."""
    ipfrag_time, high = sysctls.get("net.ipv4.ipfrag_time"), sysctls.get("net.ipv4.ipfrag_high_thresh")
    fails, timeouts = sum(c.reasm_failed.values()), sum(c.reasm_timeouts.values())
    dup, far = c.drops.get("DUP_FRAG", 0), c.drops.get("FRAG_TOO_FAR", 0)
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
    return summary, fix


def reassembly_failures(window: Window) -> Finding | None:
    """frag.reassembly_failures, with what the counters say about the cause. ReasmFails
    counts timeouts (ReasmTimeout), bad fragments (overlapping: DUP_FRAG; too far out of
    order: FRAG_TOO_FAR) and fragments refused because reassembly memory is above
    ipfrag_high_thresh (no queue is made for them; freed without a reason)."""
    c = counts(window)
    fails, timeouts = sum(c.reasm_failed.values()), sum(c.reasm_timeouts.values())
    if not fails and not timeouts:
        return None
    sysctls = window.new.get("info", {}).get("sysctls", {})
    beyond = {f: max(0, c.reasm_failed[f] - c.reasm_timeouts[f]) for f in c.reasm_failed}
    memory = {f: int(v) for (f,), v in window.new.get("gauges", {}).get("frag_memory", {}).items()}
    refused = _refused(c, beyond, memory, sysctls.get("net.ipv4.ipfrag_high_thresh"))
    ev = {"reassembly_failed": c.reasm_failed, "reassembly_timeouts": c.reasm_timeouts,
          "failed_without_timeout": beyond,
          "drop_reasons": {r: c.drops.get(r, 0) for r in FRAG_DROP_REASONS[1:]},
          **{key: sysctls.get(key) for key in SYSCTLS}}
    if memory:
        ev["reassembly_memory_bytes"] = memory
    ev["window_seconds"] = round(window.seconds, 1)
    summary, fix = _reassembly_text(window, c, beyond, refused, memory, sysctls)
    return Finding(
        id="frag.reassembly_failures", probe=PROBE, severity="warning",
        title="IP reassembly fails", summary=summary, evidence=ev,
        claims=("reassembly_failed",) if fails else ("reassembly_timeouts",),
        remediation=fix, impact=window.rate(fails))
