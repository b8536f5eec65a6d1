"""The mtu probe's findings: one pure function per finding id, over the window of its readings.

What they need beyond the readings is handed in: the daemon's netns inode (which end of a veth
is the node's) and the route-MTU lookup toward a destination (a netlink query the probe makes
on its own netns worker). No finding reads /proc, /sys or sysctls.
"""

from __future__ import annotations

from typing import Callable

from dpwatch.probes.base import Finding, Window
from dpwatch.probes.mtu.model import Issue
from dpwatch.probes.mtu.remediation import cni_remediation

PROBE = "mtu"
# The last sentence of mtu.pmtu_frag_needed's summary; triage drops it once it sees the ICMP dropped.
ICMP_CAVEAT = " If anything on the path drops ICMP, this becomes a black hole."
CNI_NAMES = ("Cilium", "Calico", "Flannel")


def mismatch_evidence(issue: Issue, own_netns: int | None) -> dict:
    out = {"kind": issue.kind, "devices": issue.devices, "overhead": issue.overhead,
           "safe_mtu": issue.safe_mtu}
    if issue.kind == "veth_mismatch" and issue.devices:
        # The bigger end in the daemon's netns: what the node itself sends through it over
        # the smaller MTU is dropped at the far end (its UDP senders see ENOBUFS).
        big = max(issue.devices, key=lambda d: d["mtu"])
        out["node_end_bigger"] = big.get("netns") is not None and big.get("netns") == own_netns
    return out


def _mismatch_remediation(issues: list[Issue], safe: int | None) -> list[str]:
    """Every issue's steps once, in order, then the CNI settings for the safe MTU unless an
    issue already gave them."""
    remediation: list[str] = []
    for issue in issues:
        for step in issue.remediation:
            if step not in remediation:
                remediation.append(step)
    if safe and not any(name in r for r in remediation for name in CNI_NAMES):
        overhead = next((i.overhead for i in issues if i.safe_mtu == safe and i.overhead), None)
        remediation += cni_remediation(safe, overhead)
    return remediation


def mismatch(window: Window, own_netns: int | None) -> Finding | None:
    """mtu.mismatch: the last MTU audit flagged links (the reading's info["issues"])."""
    issues: list[Issue] = window.new.get("info", {}).get("issues", [])
    if not issues:
        return None
    safe = min((i.safe_mtu for i in issues if i.safe_mtu), default=None)
    return Finding(
        id="mtu.mismatch", probe=PROBE, severity="critical",
        title="MTU mismatch: packets can vanish (black hole)",
        summary=(f"The MTU audit found {len(issues)} problem(s): " +
                 " ".join(i.summary for i in issues[:3]) +
                 (" ..." if len(issues) > 3 else "") +
                 " Packets bigger than the smallest MTU on the path are dropped silently or "
                 "fragmented: connections hang on large transfers while small ones work."),
        evidence={"mismatches": [mismatch_evidence(i, own_netns) for i in issues[:10]],
                  "safe_mtu": safe},
        claims=("mismatches",), remediation=_mismatch_remediation(issues, safe)[:16],
        impact=float(len(issues)))


def pmtu_frag_needed(window: Window, route_mtu: Callable[[str], int | None]) -> Finding | None:
    """mtu.pmtu_frag_needed: ICMP frag-needed / packet-too-big sent or received in the window.
    ``route_mtu(dst)``: the MTU this node uses toward dst (what a frag-needed it sent announced)."""
    fn = window.delta("frag_needed")
    total = int(sum(fn.values()))
    if not total:
        return None
    info = window.new.get("info", {})
    recent = [r for r in info.get("recent", []) if r["seconds_ago"] <= window.seconds]
    shown = []
    for r in recent[:8]:
        mtu = r["mtu"] if r["direction"] == "received" else route_mtu(r["dst"])
        shown.append({"direction": r["direction"], "dst": r["dst"], "mtu": mtu, "count": r["count"]})
    pmtu = [p for p in info.get("pmtu", [])][:8]
    announced = sorted({s["mtu"] for s in shown if s["mtu"]} | {p["mtu"] for p in pmtu if p.get("mtu")})
    return Finding(
        id="mtu.pmtu_frag_needed", probe=PROBE, severity="warning",
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
        impact=window.rate(total))
