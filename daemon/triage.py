"""The triage report behind /diagnose and `dpwatch diagnose`.

Each active probe contributes findings computed over a window: deltas between a snapshot
from the ring (taken by the sampler, never in a request) and a fresh reading taken now.
Then the report becomes more than their sum (``correlate``):

- NETFILTER_DROP drops that conntrack's table-full drops account for are reported as
  conntrack.table_full, not as a policy drop (drops.netfilter folds into it).
- DNS timeouts together with conntrack insert failures are the UDP conntrack race: one
  finding, triage.dns_conntrack_race, with its remediation.
- DNS timeouts while the conntrack table is full and drops at least as many packets fold
  into conntrack.table_full; NXDOMAINs that the search-path walk explains fold into
  dns.search_path_amplification.
- DNS timeouts next to at least as many netfilter drops say so (a rule may drop DNS); both
  stay, since the drops probe does not see ports.
- DNS lookups that failed (timeouts, SERVFAIL/REFUSED) rank above NXDOMAIN findings of the
  same window, whatever their rates: an NXDOMAIN is an answer.
- Fragmentation, reassembly failures and frag-needed messages next to an MTU mismatch are
  one root cause: mtu.mismatch, with the rest folded in as related evidence.
- A node-audit finding about the limit a live finding hits (nf_conntrack_max next to a full
  table, somaxconn next to listen overflows, ...) folds into the live finding.

Findings are then ranked by a score that adds the severity to the order of magnitude of
the impact (events per second explained), so a warning that explains 1000 drops/s ranks
above a critical that explains none; the top of the report is the likeliest cause. Nothing
is reported twice: a folded finding appears only under ``related`` of the one it joined.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import socket
import textwrap
import time
from typing import Any, Callable

from dpwatch.probes.base import SEVERITY_RANK, ContradictionError, Finding, Window, counter_delta
from dpwatch.probes.mtu.probe import ICMP_CAVEAT
from dpwatch.daemon.snapshots import SnapshotRing

log = logging.getLogger("dpwatch.triage")

# Ids of the findings triage itself creates (documented in docs/findings.md like the probes').
TRIAGE_FINDING_IDS = ("triage.dns_conntrack_race",)

# Live finding -> node-audit findings about the limit it hits (folded into it when both exist).
AUDIT_FOLDS: dict[str, tuple[str, ...]] = {
    "conntrack.table_full": ("node.conntrack_max_low",),
    "conntrack.table_pressure": ("node.conntrack_max_low",),
    "drops.listen_overflow": ("node.somaxconn_low",),
    "drops.socket_receive_buffer": ("node.socket_buffers_small",),
    "softnet.backlog_drops": ("node.netdev_max_backlog_low",),
}
# One event counted by two probes: the first id keeps the names (rule 3b).
SAME_EVENT: dict[str, tuple[str, ...]] = {
    "node.listen_queue_overflow": ("drops.listen_overflow", "node.somaxconn_low"),
}
# DNS lookups that failed, and NXDOMAIN findings (answers), which rank below them (rule 2c').
DNS_FAILURES = ("dns.timeouts", "dns.errors", "triage.dns_conntrack_race")
DNS_NEGATIVE = ("dns.nxdomain_rate", "dns.search_path_amplification")
# Symptoms of an MTU mismatch, folded into mtu.mismatch.
MTU_SYMPTOMS = ("frag.fragmentation_active", "frag.fragmentation_failed", "frag.reassembly_failures",
                "mtu.pmtu_frag_needed")
SEVERITY_BASE = {"info": 0.0, "warning": 1.0, "critical": 3.0}


def score(f: Finding) -> float:
    """Severity plus the order of magnitude of the impact. Info stays below every warning."""
    s = SEVERITY_BASE[f.severity] + math.log10(1.0 + max(0.0, f.impact))
    return min(s, 0.99) if f.severity == "info" else s


def _scalars(ev: dict[str, Any], limit: int = 8) -> dict[str, Any]:
    out = {}
    for k, v in ev.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "window_seconds":
            out[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = v
        if len(out) >= limit:
            break
    return out


def _fold(into: Finding, other: Finding, note: dict[str, Any] | None = None,
          merge_remediation: bool = True) -> None:
    """Put ``other`` under ``into``'s related evidence; its impact joins ``into``'s."""
    related = into.evidence.setdefault("related", {})
    entry = {"title": other.title, "severity": other.severity, **_scalars(other.evidence)}
    if note:
        entry.update(note)
    related[other.id] = entry
    if not merge_remediation:
        return
    keys = {_sysctl_key(r) for r in into.remediation}
    for step in other.remediation:
        key = _sysctl_key(step)
        if step not in into.remediation and (key is None or key not in keys):
            into.remediation.append(step)
            keys.add(key)


def _sysctl_key(step: str) -> str | None:
    if step.startswith("sysctl -w "):
        return step[len("sysctl -w "):].split("=", 1)[0].strip()
    return None


def _take(findings: list[Finding], fid: str) -> list[Finding]:
    return [f for f in findings if f.id == fid]


def correlate(findings: list[Finding]) -> list[Finding]:
    """Cross-probe reasoning over every probe's findings (see the module docstring). Returns a
    new list; the probes' findings are changed in place where one absorbs another."""
    out = list(findings)
    drop: set[int] = set()  # id() of findings folded away

    # 1. conntrack table-full drops explain NETFILTER_DROP drops.
    full = sorted(_take(out, "conntrack.table_full"), key=lambda f: -f.evidence.get("drops", 0))
    for nf in _take(out, "drops.netfilter"):
        ct_drops = sum(int(f.evidence.get("drops", 0)) for f in full)
        nf_drops = int(nf.evidence.get("drops", 0))
        if not full or not ct_drops or not nf_drops:
            continue
        explained = min(ct_drops, nf_drops)
        if explained >= nf_drops:
            _fold(full[0], nf, {"explained_by_conntrack": explained})
            full[0].summary += (f" The {nf_drops} NETFILTER_DROP drops the drops probe counted are these "
                                "conntrack drops, not a firewall or policy rule.")
            full[0].impact = max(full[0].impact, nf.impact)
            drop.add(id(nf))
        else:
            rest = nf_drops - explained
            nf.evidence["explained_by_conntrack"] = explained
            nf.evidence["unexplained_drops"] = rest
            nf.impact = nf.impact * rest / nf_drops
            nf.summary += (f" {explained} of them are conntrack table-full drops (see "
                           f"conntrack.table_full); the other {rest} come from rules.")
            full[0].evidence.setdefault("related", {})["drops.netfilter"] = {
                "explained_by_conntrack": explained, "note": "the rest stay under drops.netfilter"}

    # 2. DNS timeouts + conntrack insert failures: the UDP conntrack race.
    dns = [f for f in _take(out, "dns.timeouts") if id(f) not in drop]
    ins = [f for f in _take(out, "conntrack.insert_failed") if id(f) not in drop]
    if dns and ins:
        out.append(_udp_race(dns[0], ins[0]))
        drop.update((id(dns[0]), id(ins[0])))

    # 2b. DNS timeouts while conntrack drops more packets than that: the queries were among them.
    full = [f for f in _take(out, "conntrack.table_full") if id(f) not in drop]
    for d in [f for f in _take(out, "dns.timeouts") if id(f) not in drop]:
        ct_drops = sum(int(f.evidence.get("drops", 0)) for f in full)
        if full and ct_drops >= int(d.evidence.get("timeouts", 0)) > 0:
            _fold(full[0], d)
            full[0].summary += (f" {d.evidence.get('timeouts')} DNS queries timed out in the same window: "
                                "new UDP flows need a conntrack entry too, so lookups fail with the rest.")
            full[0].impact += d.impact
            drop.add(id(d))

    # 2b'. DNS timeouts next to at least as many netfilter drops: a rule may be dropping the
    # queries or their answers. The drops probe does not see ports, so both stay (the timeouts
    # first, as the symptom clients feel); the timeouts say so and how to look.
    nf = [f for f in _take(out, "drops.netfilter") if id(f) not in drop]
    for d in [f for f in _take(out, "dns.timeouts") if id(f) not in drop]:
        nf_drops = sum(int(f.evidence.get("unexplained_drops", f.evidence.get("drops", 0))) for f in nf)
        if nf_drops >= int(d.evidence.get("timeouts", 0)) > 0:
            d.evidence["netfilter_drops_in_window"] = nf_drops
            d.summary += (f" Netfilter dropped {nf_drops} packets in the same window (drops.netfilter): "
                          "if these queries or their answers are among them, a firewall rule or "
                          "NetworkPolicy blocks DNS.")
            d.remediation.insert(0, "nft list ruleset -a | grep -E 'dport 53|sport 53|drop'   "
                                    "# a rule (or a NetworkPolicy's) that drops DNS")

    # 2c. NXDOMAIN answers that the search-path walk produced are one finding, not two.
    for amp in _take(out, "dns.search_path_amplification"):
        for nx in _take(out, "dns.nxdomain_rate"):
            wasted = int(amp.evidence.get("wasted_queries", 0))
            total = int(nx.evidence.get("nxdomain", 0))
            if id(nx) not in drop and total and wasted >= 0.8 * total:
                _fold(amp, nx)
                drop.add(id(nx))

    # 2c'. DNS lookups that fail (no answer, SERVFAIL, REFUSED) rank above NXDOMAIN findings of
    # the same window, however many the NXDOMAINs: an NXDOMAIN is the server answering, in a
    # round trip, and the datapath works; a timeout stalls its client for the resolver's
    # timeout and the lookup fails. By rate alone a storm of cheap NXDOMAINs would come first
    # (and its queries dilute the failures' share, so they are often only a warning).
    failing = [f for f in out if f.id in DNS_FAILURES and id(f) not in drop]
    if failing:
        worst = max(failing, key=score)
        below = score(worst)
        for f in out:
            if f.id in DNS_NEGATIVE and id(f) not in drop and score(f) >= below:
                # the highest impact that keeps its score under the failure's (rates stay in evidence)
                f.impact = 0.9 * max(0.0, 10 ** (below - SEVERITY_BASE[f.severity]) - 1)
                f.evidence["ranked_below"] = worst.id

    # 2d. Packets too big to forward, answered with frag-needed / packet-too-big: that is path
    # MTU discovery, one story told by the ICMP side (which knows the announced MTU).
    pmtu = _take(out, "mtu.pmtu_frag_needed")
    if pmtu and not _take(out, "mtu.mismatch"):
        for ff in [f for f in _take(out, "frag.fragmentation_failed") if id(f) not in drop]:
            failed = int(sum(ff.evidence.get("fragmentation_failed", {}).values()))
            sent = sum(int(v) for k, v in pmtu[0].evidence.get("frag_needed", {}).items() if k.endswith("_sent"))
            _fold(pmtu[0], ff, {"frag_needed_sent": sent})
            pmtu[0].summary += (f" The node dropped {failed} packets it could not forward without "
                                "fragmenting them; these messages are its answers.")
            if failed > sent:
                # Not the ICMP rate limit: the kernel never limits frag-needed (icmpv4_mask_allow)
                # nor packet-too-big (icmpv6_ratemask leaves type 2 out).
                pmtu[0].summary += (f" {failed - sent} of them got no ICMP answer (these messages are "
                                    "never rate-limited; the kernel sends none when it has no route back "
                                    "to the sender, or for a packet to a broadcast or multicast address): "
                                    "their senders only retry.")
            pmtu[0].impact = max(pmtu[0].impact, ff.impact)
            drop.add(id(ff))

    # 2e. Frag-needed / packet-too-big sent while netfilter drops packets of the same family:
    # the node's answers are being filtered (its own output chain, or the senders' input), so
    # the senders never learn the path MTU: a PMTU black hole.
    for pm in _take(out, "mtu.pmtu_frag_needed")[:1]:
        for nf in [f for f in _take(out, "drops.netfilter") if id(f) not in drop][:1]:
            if _icmp_filtered(pm, nf):
                drop.add(id(nf))

    # 3. Fragmentation next to an MTU mismatch: one root cause.
    mism = _take(out, "mtu.mismatch")
    if mism:
        root = mism[0]
        folded = []
        for fid in MTU_SYMPTOMS:
            for f in _take(out, fid):
                _fold(root, f)
                root.impact += f.impact
                drop.add(id(f))
                folded.append(fid)
        if folded:
            root.summary += (" The " + ", ".join(folded) + " seen in this window follow from it "
                             "(see related).")
        # 3a. UDP buffer errors of the node next to a veth whose node end is the bigger one: the
        # far end drops the node's full-size datagrams, and the kernel counts the ENOBUFS their
        # senders get as SndbufErrors (in the node audit's buffer_errors), not a small buffer.
        if any(m.get("node_end_bigger") for m in root.evidence.get("mismatches", [])):
            for f in _take(out, "node.socket_buffers_small"):
                errors = int(f.evidence.get("buffer_errors_in_window", 0) or 0)
                if errors and id(f) not in drop:
                    fixes = list(root.remediation)  # its sysctl advice does not apply here
                    _fold(root, f, {"note": "UDP send errors: the node's datagrams over the safe MTU "
                                            "dropped at the veth's smaller end (ENOBUFS, counted as "
                                            "SndbufErrors); if they go on after the fix, see "
                                            "node.socket_buffers_small"})
                    root.remediation[:] = fixes
                    root.summary += (f" The {errors} UDP buffer errors of this window are the node's own "
                                     "datagrams dropped at the smaller end (the kernel counts that "
                                     "ENOBUFS as SndbufErrors), not small socket buffers.")
                    drop.add(id(f))

    # 3b. The same events seen twice: the finding with the names keeps them. A listener's
    # overflow is counted by the node probe (sock_diag, TcpExt: it names the socket and says
    # whether somaxconn caps it) and, where the kernel gives a drop reason, by the drops probe,
    # whose somaxconn advice is blind: its fix lines are not merged.
    for keep_id, others in SAME_EVENT.items():
        keep = next((f for f in _take(out, keep_id) if id(f) not in drop), None)
        for oid in others if keep else ():
            for o in [f for f in _take(out, oid) if id(f) not in drop]:
                _fold(keep, o, merge_remediation=False)
                keep.impact = max(keep.impact, o.impact)  # the same events: the larger, not the sum
                if SEVERITY_RANK[o.severity] > SEVERITY_RANK[keep.severity]:
                    keep.severity = o.severity
                drop.add(id(o))

    # 3c. Drops that are the fragmentation story's own packets (drop reasons PKT_TOO_BIG and the
    # reassembly ones, and unreasoned drops in the reassembly code: fragments refused while its
    # memory is full) belong to the finding that tells it, not to the catch-all drop finding.
    for top in [f for f in _take(out, "drops.top_reasons") if id(f) not in drop][:1]:
        if _frag_drops(top, out, drop):
            drop.add(id(top))

    # 4. Audit findings about the limit a live finding hits.
    for live_id, audit_ids in AUDIT_FOLDS.items():
        lives = [f for f in _take(out, live_id) if id(f) not in drop]
        if not lives:
            continue
        for aid in audit_ids:
            for a in _take(out, aid):
                if id(a) not in drop:
                    _fold(lives[0], a)
                    drop.add(id(a))

    # Nothing twice: the same id with the same summary is one finding.
    seen: set[tuple[str, str]] = set()
    result = []
    for f in out:
        key = (f.id, f.summary)
        if id(f) in drop or key in seen:
            continue
        seen.add(key)
        result.append(f)
    return result


# Drop reasons of the frag/mtu story -> the finding whose packets they are.
FRAG_DROPS = {"PKT_TOO_BIG": "frag.fragmentation_failed", "FRAG_REASM_TIMEOUT": "frag.reassembly_failures",
              "DUP_FRAG": "frag.reassembly_failures", "FRAG_TOO_FAR": "frag.reassembly_failures"}
# Kernel functions of IP reassembly: an unreasoned drop there is a fragment it refused or lost.
REASSEMBLY_CODE = ("ip_defrag", "ip_frag_queue", "ip_frag_reasm", "ip_expire", "ip6_frag_queue",
                   "ip6_frag_reasm", "ip6_frag_expire", "ipv6_frag_rcv", "nf_ct_frag6_gather",
                   "inet_frag_")


def _home(out: list[Finding], drop: set[int], fid: str) -> Finding | None:
    """The reported finding that tells ``fid``'s story: ``fid`` itself, or the one it folded into."""
    for f in out:
        if id(f) not in drop and (f.id == fid or fid in f.evidence.get("related", {})):
            return f
    return None


def _frag_drops(top: Finding, out: list[Finding], drop: set[int]) -> bool:
    """Rule 3c. Returns True when ``top`` (drops.top_reasons) folded away: without the drops a
    frag/mtu finding explains, the rest stays below its threshold. Else it keeps the rest."""
    homes: dict[int, tuple[Finding, int]] = {}

    def credit(fid: str, n: int) -> None:
        home = _home(out, drop, fid)
        if home is not None and n > 0:
            homes[id(home)] = (home, homes.get(id(home), (home, 0))[1] + n)

    for row in top.evidence.get("top_reasons", []):
        if row.get("reason") in FRAG_DROPS:
            credit(FRAG_DROPS[row["reason"]], int(row.get("drops", 0)))
    for loc in top.evidence.get("top_locations", []):
        func = str(loc.get("location", "")).split("+", 1)[0]
        if loc.get("reason") not in FRAG_DROPS and func.startswith(REASSEMBLY_CODE):
            credit("frag.reassembly_failures", int(loc.get("count", 0)))
    total = int(top.evidence.get("drops", 0))
    explained = min(total, sum(n for _f, n in homes.values()))
    if not homes or not explained:
        return False
    home = max(homes.values(), key=lambda hn: hn[1])[0]
    # Its impact is the rate of the drops no specific finding explains: take these off it.
    rate = float(top.evidence.get("drops_per_second", 0.0))
    rest_rate = max(0.0, top.impact - rate * explained / total)
    threshold = float(top.evidence.get("threshold_per_second", 0.0) or 0.0)
    if rest_rate < threshold:
        fixes = list(home.remediation)  # "look the reason up" adds nothing to the story's own fix
        _fold(home, top, {"explained_drops": explained})
        home.remediation[:] = fixes
        home.summary += (f" The kernel's drop counters show these packets too: {explained} of the {total} "
                         "drops of this window are theirs.")
        home.impact = max(home.impact, top.impact)
        return True
    top.evidence["explained_by_fragmentation"] = explained
    top.impact = rest_rate
    top.summary += (f" {explained} of them are the packets {home.id} tells about (see it); "
                    f"the other {total - explained} are not.")
    return False


def _icmp_filtered(pm: Finding, nf: Finding) -> bool:
    """Rule 2e. Every netfilter drop of a family that frag-needed / packet-too-big were sent in
    can be one of them (no more drops than messages): pm becomes the PMTU black hole (critical)
    and nf folds into it (True). More drops than messages: both stay, each naming the other."""
    sent = {k[:-len("_sent")]: int(v) for k, v in pm.evidence.get("frag_needed", {}).items()
            if k.endswith("_sent") and int(v) > 0}
    by_proto = nf.evidence.get("by_protocol", {})
    dropped = {fam: int(by_proto.get(fam, 0)) for fam in sent if int(by_proto.get(fam, 0)) > 0}
    available = int(nf.evidence.get("unexplained_drops", nf.evidence.get("drops", 0)))
    if not dropped or not available:
        return False
    # (conntrack may have explained some of them already: only the rest count)
    total_sent, total_dropped = sum(sent.values()), min(sum(dropped.values()), available)
    fams = "/".join(sorted(dropped))
    if total_dropped > total_sent:
        note = (f" Netfilter also dropped {total_dropped} {fams} packets in this window, more than these "
                f"{total_sent} messages: if a rule drops ICMP type 3 code 4 / ICMPv6 type 2, this is a "
                "PMTU black hole (see drops.netfilter).")
        pm.summary += note
        nf.summary += (f" Up to {total_sent} of them can be the ICMP frag-needed / packet-too-big the node "
                       "sent in the same window (see mtu.pmtu_frag_needed).")
        pm.evidence["netfilter_drops"] = dropped
        return False
    filtered = total_dropped
    repeated = [r for r in pm.evidence.get("recent", []) if r.get("direction") == "sent" and r.get("count", 0) > 1]
    _fold(pm, nf, {"frag_needed_filtered": filtered})
    pm.evidence["netfilter_drops"] = dropped
    pm.evidence["frag_needed_filtered"] = filtered
    pm.claims = tuple(pm.claims) + ("frag_needed_filtered",)
    pm.severity = "critical"
    pm.title = "PMTU black hole: the node's frag-needed / packet-too-big are dropped by netfilter"
    head = (f"PMTU black hole: netfilter dropped {total_dropped} {fams} packets in the same window as the "
            f"{total_sent} ICMP frag-needed/packet-too-big messages the node sent, no more than them: most "
            "likely it dropped those messages (a rule in this node's output chain, or in the senders' own "
            "input). Senders never learn the path MTU, so their packets above it vanish and connections "
            "hang as soon as they send a full-size packet.")
    if repeated:
        head += (" The frag-needed went out again and again for the same destinations (" +
                 ", ".join(f"{r['dst']}: {r['count']} times" for r in repeated[:4]) +
                 "), as when the senders never get them.")
    pm.summary = head + " " + pm.summary.replace(ICMP_CAVEAT, "")
    pm.remediation[:0] = [
        "nft list ruleset -a | grep -n -E 'icmp|reject|drop'   # the rule that drops the frag-needed "
        "(output and forward chains here; the senders' own policies)",
        "accept them before any drop: nft insert rule <family> <table> <chain> icmp type "
        "destination-unreachable icmp code frag-needed accept (IPv6: icmpv6 type packet-too-big accept)",
    ]
    pm.impact = max(pm.impact, nf.impact)
    return True


def _udp_race(dns: Finding, ins: Finding) -> Finding:
    dev, iev = dns.evidence, ins.evidence
    timeouts = int(dev.get("timeouts", 0))
    failed = int(iev.get("insert_failed", 0))
    share = dev.get("timeout_percent")
    sev = "critical" if "critical" in (dns.severity, ins.severity) else "warning"
    summary = (f"{timeouts} DNS queries timed out while conntrack failed to insert {failed} entries in "
               "the same window: the UDP conntrack race. A client sends the A and AAAA queries in "
               "parallel from one socket; both race to create the same conntrack entry (through the "
               "DNAT of the DNS service), one loses and is dropped, and the resolver waits its "
               "full timeout (5 s) before retrying.")
    if share is not None:
        summary += f" {share}% of the queries were affected."
    ev: dict[str, Any] = {"dns_timeouts": timeouts,
                          "dns_timeouts_per_second": dev.get("timeouts_per_second"),
                          "timeout_percent": share,
                          "conntrack_insert_failed": failed,
                          "insert_failed_per_second": round(ins.impact, 3),
                          "window_seconds": dev.get("window_seconds", iev.get("window_seconds"))}
    ev = {k: v for k, v in ev.items() if v is not None}
    f = Finding(
        id="triage.dns_conntrack_race", probe="triage", severity=sev,
        title="DNS timeouts from the UDP conntrack race",
        summary=summary, evidence=ev,
        remediation=[
            "pods: spec.dnsConfig.options: [{name: single-request-reopen}] (glibc: A and AAAA from "
            "different sockets, so they no longer race)",
            "deploy NodeLocal DNSCache: pod DNS goes to a node-local address without DNAT, and the "
            "cache talks TCP upstream",
            "or make resolvers use TCP: dnsConfig.options [{name: use-vc}]",
            "conntrack -S   # insert_failed should stop growing once the race is gone",
        ],
        impact=dns.impact + ins.impact)
    _fold(f, dns)
    _fold(f, ins)
    return f


# -- series: the window's rates, for the HTML charts ---------------------------------------------

def _sum(pred: Callable[[Any], bool] | None) -> Callable[[dict], float]:
    return lambda d: float(sum(v for k, v in d.items() if pred is None or pred(k)))


NOT_DROPS = ("NOT_DROPPED_YET", "CONSUMED")
# (series id, title, unit, probe, counter group, key filter). Counters become per-second rates.
SERIES: tuple[tuple[str, str, str, str, str, Callable[[Any], bool] | None], ...] = (
    ("drops", "packet drops", "/s", "drops", "drops", lambda k: k[0] not in NOT_DROPS),
    ("conntrack_drops", "conntrack drops (table full)", "/s", "conntrack", "stats", lambda k: k[1] == "drop"),
    ("conntrack_insert_failed", "conntrack insert failures", "/s", "conntrack", "stats",
     lambda k: k[1] == "insert_failed"),
    ("fragments_created", "IP fragments created", "/s", "frag", "snmp", lambda k: k[0] == "frag_creates"),
    ("reassembly_failed", "IP reassembly failures", "/s", "frag", "snmp", lambda k: k[0] == "reasm_fails"),
    ("frag_needed", "ICMP frag-needed / packet-too-big", "/s", "mtu", "frag_needed", None),
    ("softnet_dropped", "softnet backlog drops", "/s", "softirq", "softnet", lambda k: k[1] == "dropped"),
    ("softnet_squeezed", "softnet time squeezes", "/s", "softirq", "softnet", lambda k: k[1] == "time_squeeze"),
    ("dns_queries", "DNS queries", "/s", "dns", "queries", None),
    ("dns_timeouts", "DNS timeouts", "/s", "dns", "timeouts", None),
    ("listen_overflows", "TCP listen overflows", "/s", "node", "limits", lambda k: k[0] == "listen_overflows"),
)
MAX_POINTS = 60


def _snapshots(ring: SnapshotRing) -> list:
    lock = getattr(ring, "_lock", None)
    if lock is None:
        return []
    with lock:
        return list(ring._ring)


def build_series(ring: SnapshotRing, start_mono: float, now_mono: float, fresh: dict[str, Any],
                 active: set[str]) -> list[dict[str, Any]]:
    """Per-second rates between consecutive snapshots of the window (the fresh reading last),
    at most MAX_POINTS points per series (neighbouring intervals merged)."""
    snaps = [(s.mono, s.readings) for s in _snapshots(ring) if s.mono >= start_mono - 1e-6]
    snaps.append((now_mono, fresh))
    if len(snaps) < 2:
        return []
    step = max(1, math.ceil((len(snaps) - 1) / MAX_POINTS))
    picks = snaps[::step]
    if picks[-1] is not snaps[-1]:
        picks.append(snaps[-1])
    out = []
    for sid, title, unit, probe, group, pred in SERIES:
        if probe not in active:
            continue
        t, v = [], []
        seen = False
        for (m0, r0), (m1, r1) in zip(picks, picks[1:]):
            new = (r1.get(probe) or {}).get("counters", {}).get(group)
            if new is None:
                continue
            seen = True
            old = (r0.get(probe) or {}).get("counters", {}).get(group, {})
            dt = max(m1 - m0, 1e-6)
            t.append(round(m1 - now_mono, 1))
            v.append(round(_sum(pred)(counter_delta(old, new)) / dt, 3))
        if seen:
            out.append({"id": sid, "title": title, "unit": unit, "probe": probe, "t": t, "v": v})
    return out


# -- the report ----------------------------------------------------------------------------------

def node_name() -> str:
    """The node as Kubernetes names it: NODE_NAME (the DaemonSet sets it from the downward
    API; with hostNetwork the hostname is usually the same, but not on every cloud), else the
    hostname."""
    return os.environ.get("NODE_NAME", "").strip() or socket.gethostname()


def build_report(manager, ring: SnapshotRing, window_seconds: float, features) -> dict[str, Any]:
    now_mono, now_wall = time.monotonic(), time.time()
    fresh = manager.collect()
    old = ring.at(now_mono - window_seconds)
    span = (now_mono - old.mono) if old is not None else 0.0
    findings: list[Finding] = []
    errors: dict[str, str] = {}
    undeclared: dict[str, list[str]] = {}
    active = manager.active()
    for name, probe in active.items():
        if name not in fresh:
            continue
        win = Window(span, old.readings.get(name) if old else None, fresh[name])
        try:
            found = probe.diagnose(win)
        except ContradictionError:  # only raised under the test suite's check: fail loudly
            raise
        except Exception as exc:  # a probe bug must not take the report down
            log.exception("probe %s diagnose failed", name)
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        declared = set(getattr(type(probe), "finding_ids", ()))
        bad = sorted({f.id for f in found if f.id not in declared})
        if bad:
            log.warning("probe %s emitted undeclared finding ids %s (add them to finding_ids "
                        "and docs/findings.md)", name, ", ".join(bad))
            undeclared[name] = bad
        findings.extend(found)
    try:
        findings = correlate(findings)
    except Exception as exc:  # the probes' own findings still make a report
        log.exception("cross-probe reasoning failed")
        errors["triage"] = f"{type(exc).__name__}: {exc}"
    findings.sort(key=lambda f: (-score(f), -SEVERITY_RANK[f.severity], -f.impact, f.id))
    worst = max((SEVERITY_RANK[f.severity] for f in findings), default=0)
    status = {0: "ok", 1: "warning", 2: "critical"}[worst]
    probes = manager.statuses()
    for entry in probes:
        if entry["name"] in errors:
            entry["diagnose_error"] = errors[entry["name"]]
        if entry["name"] in undeclared:
            entry["undeclared_finding_ids"] = undeclared[entry["name"]]
    try:
        series = build_series(ring, now_mono - span if old else now_mono, now_mono, fresh, set(active))
    except Exception as exc:  # charts are a nicety: never fail the report for them
        log.warning("series failed: %s", exc)
        series = []
    report = {
        "node": node_name(),
        "kernel": features.kernel_release,
        "generated_at": _dt.datetime.fromtimestamp(now_wall, _dt.timezone.utc).isoformat(timespec="seconds"),
        "window_seconds": round(span, 3),
        "window_requested_seconds": window_seconds,
        "status": status,
        "findings": [dict(f.as_dict(), score=round(score(f), 3)) for f in findings],
        "probes": probes,
        "series": series,
    }
    if "triage" in errors:
        report["triage_error"] = errors["triage"]
    return report


EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2}
# Remediation lines starting with one of these are shown as shell commands ("$ ...").
SHELL_COMMANDS = frozenset({"sysctl", "nft", "iptables-save", "conntrack", "ss", "ip", "perf", "nstat",
                            "ethtool", "tc", "kubectl", "echo", "cat", "helm", "nsenter", "modprobe"})
LIST_ROWS = 8  # rows of an evidence list shown in text (JSON has them all)


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _inline(value: dict) -> str:
    return ", ".join(f"{k}={_fmt_value(v) if not isinstance(v, dict) else '{' + _inline(v) + '}'}"
                     for k, v in value.items())


def _render_evidence(evidence: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    scalars = {k: v for k, v in evidence.items() if not isinstance(v, (dict, list))}
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        lines.append(f"{indent}{key.ljust(width)}  {_fmt_value(value)}")
    for key, value in evidence.items():
        if key == "related":
            continue
        if isinstance(value, dict):
            if value:
                lines.append(f"{indent}{key}: {_inline(value)}")
        elif isinstance(value, list) and value:
            lines.append(f"{indent}{key}:")
            for row in value[:LIST_ROWS]:
                if isinstance(row, dict):
                    lines.append(f"{indent}  - " + "  ".join(
                        f"{k}={_inline(v) if isinstance(v, dict) else _fmt_value(v)}" for k, v in row.items()))
                else:
                    lines.append(f"{indent}  - {_fmt_value(row)}")
            if len(value) > LIST_ROWS:
                lines.append(f"{indent}  ... {len(value) - LIST_ROWS} more (see ?format=json)")
    return lines


def _render_finding(out: list[str], i: int, f: dict[str, Any], width: int) -> None:
    out.append(f"{i}. [{f['severity'].upper()}] {f['title']}  ({f['id']})")
    for line in textwrap.wrap(f["summary"], width=width - 3):
        out.append("   " + line)
    evidence = f["evidence"]
    if evidence:
        out.append("   evidence:")
        out.extend(_render_evidence(evidence, "     "))
    related = evidence.get("related") if isinstance(evidence, dict) else None
    if related:
        out.append("   also explains (folded in, not reported again):")
        for rid, entry in related.items():
            facts = {k: v for k, v in entry.items() if k not in ("title", "severity")}
            title = entry.get("title")
            out.append(f"     - {rid}" + (f": {title}" if title else "") +
                       (f"  ({_inline(facts)})" if facts else ""))
    if f["remediation"]:
        out.append("   fix:")
        for step in f["remediation"]:
            shell = step.split(" ", 1)[0] in SHELL_COMMANDS
            out.append(f"     $ {step}" if shell else f"     - {step}")
    out.append("")


def render_text(report: dict[str, Any], width: int = 100) -> str:
    findings = report["findings"]
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in ("critical", "warning", "info")}
    head = (f"dpwatch diagnose  node={report['node']}  kernel={report['kernel']}  "
            f"window={report['window_seconds']:.0f}s  at {report['generated_at']}")
    out = [head, "=" * min(len(head), width)]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
    if report["status"] == "ok" and findings:
        summary = f"all clear: nothing above info; {summary}"
    out.append(f"STATUS: {report['status'].upper()}  ({summary})")
    if report["window_seconds"] + 1 < report.get("window_requested_seconds", 0):
        out.append(f"note: the daemon has data for {report['window_seconds']:.0f}s only, "
                   f"less than the {report['window_requested_seconds']:.0f}s asked for")
    out.append("")
    problems = [f for f in findings if f["severity"] != "info"]
    if not problems:
        out.append("Nothing abnormal seen in this window.")
        out.append("")
        if findings:
            out.append("Notes on the node's settings (info):")
            out.append("")
    for i, f in enumerate(findings, 1):
        _render_finding(out, i, f, width)
    out.append("probes:")
    for p in report["probes"]:
        mode = f" ({p['mode']})" if p.get("mode") else ""
        reason = "" if p["state"] == "attached" else f": {p['reason']}"
        out.append(f"  {p['name']:<12} {p['state']}{mode}{reason}")
        if p.get("diagnose_error"):
            out.append(f"  {'':<12} diagnose failed: {p['diagnose_error']}")
        if p.get("undeclared_finding_ids"):
            out.append(f"  {'':<12} undeclared finding ids: {', '.join(p['undeclared_finding_ids'])}")
    return "\n".join(out) + "\n"
