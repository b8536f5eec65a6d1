"""Cross-probe reasoning: the report becomes more than the sum of the probes' findings.

One function per correlation, applied in the order of ``RULES`` (a later rule sees what an
earlier one folded or changed):

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
  one root cause: mtu.mismatch, with the rest folded in as related evidence (frag_rules.py).
- A node-audit finding about the limit a live finding hits (nf_conntrack_max next to a full
  table, somaxconn next to listen overflows, ...) folds into the live finding.

Findings are then ranked by a score that adds the severity to the order of magnitude of
the impact (events per second explained), so a warning that explains 1000 drops/s ranks
above a critical that explains none; the top of the report is the likeliest cause. Nothing
is reported twice: a folded finding appears only under ``related`` of the one it joined.
"""

from __future__ import annotations

from typing import Any, Callable

from dpwatch.daemon.triage import evidence as E
from dpwatch.daemon.triage import frag_rules
from dpwatch.daemon.triage.board import SEVERITY_BASE, Board, fold, score
from dpwatch.probes.base import SEVERITY_RANK, Finding

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
# One event counted by two probes: the first id keeps the names.
SAME_EVENT: dict[str, tuple[str, ...]] = {
    "node.listen_queue_overflow": ("drops.listen_overflow", "node.somaxconn_low"),
}
# DNS lookups that failed, and NXDOMAIN findings (answers), which rank below them.
DNS_FAILURES = ("dns.timeouts", "dns.errors", "triage.dns_conntrack_race")
DNS_NEGATIVE = ("dns.nxdomain_rate", "dns.search_path_amplification")


def conntrack_explains_netfilter(board: Board) -> None:
    """conntrack table-full drops explain NETFILTER_DROP drops: all of them (drops.netfilter
    folds into conntrack.table_full) or part (drops.netfilter keeps the rest)."""
    full = sorted(board.all("conntrack.table_full"), key=lambda f: -E.drops(f))
    for nf in board.all("drops.netfilter"):
        ct_drops = sum(E.drops(f) for f in full)
        nf_drops = E.drops(nf)
        if not full or not ct_drops or not nf_drops:
            continue
        explained = min(ct_drops, nf_drops)
        if explained >= nf_drops:
            fold(full[0], nf, {"explained_by_conntrack": explained})
            full[0].summary += (f" The {nf_drops} NETFILTER_DROP drops the drops probe counted are these "
                                "conntrack drops, not a firewall or policy rule.")
            full[0].impact = max(full[0].impact, nf.impact)
            board.remove(nf)
        else:
            rest = nf_drops - explained
            nf.evidence["explained_by_conntrack"] = explained
            nf.evidence[E.UNEXPLAINED_DROPS] = rest
            nf.impact = nf.impact * rest / nf_drops
            nf.summary += (f" {explained} of them are conntrack table-full drops (see "
                           f"conntrack.table_full); the other {rest} come from rules.")
            full[0].evidence.setdefault(E.RELATED, {})["drops.netfilter"] = {
                "explained_by_conntrack": explained, "note": "the rest stay under drops.netfilter"}


def dns_conntrack_race(board: Board) -> None:
    """DNS timeouts + conntrack insert failures: the UDP conntrack race, one finding of its own."""
    dns, ins = board.live("dns.timeouts"), board.live("conntrack.insert_failed")
    if dns and ins:
        board.add(udp_race(dns[0], ins[0]))
        board.remove(dns[0], ins[0])


def dns_timeouts_in_full_table(board: Board) -> None:
    """DNS timeouts while conntrack drops more packets than that: the queries were among them."""
    full = board.live("conntrack.table_full")
    for d in board.live("dns.timeouts"):
        ct_drops = sum(E.drops(f) for f in full)
        timeouts = E.DnsTimeouts.of(d).timeouts
        if full and ct_drops >= timeouts > 0:
            fold(full[0], d)
            full[0].summary += (f" {timeouts} DNS queries timed out in the same window: "
                                "new UDP flows need a conntrack entry too, so lookups fail with the rest.")
            full[0].impact += d.impact
            board.remove(d)


def dns_timeouts_next_to_netfilter(board: Board) -> None:
    """DNS timeouts next to at least as many netfilter drops: a rule may be dropping the queries
    or their answers. The drops probe does not see ports, so both stay (the timeouts first, as
    the symptom clients feel); the timeouts say so and how to look."""
    nf = board.live("drops.netfilter")
    for d in board.live("dns.timeouts"):
        nf_drops = sum(E.NetfilterDrops.of(f).unexplained for f in nf)
        if nf_drops >= E.DnsTimeouts.of(d).timeouts > 0:
            d.evidence["netfilter_drops_in_window"] = nf_drops
            d.summary += (f" Netfilter dropped {nf_drops} packets in the same window (drops.netfilter): "
                          "if these queries or their answers are among them, a firewall rule or "
                          "NetworkPolicy blocks DNS.")
            d.remediation.insert(0, "nft list ruleset -a | grep -E 'dport 53|sport 53|drop'   "
                                    "# a rule (or a NetworkPolicy's) that drops DNS")


def nxdomain_from_search_path(board: Board) -> None:
    """NXDOMAIN answers that the search-path walk produced (80% of them or more) are one
    finding, not two."""
    for amp in board.all("dns.search_path_amplification"):
        for nx in board.all("dns.nxdomain_rate"):
            wasted, total = E.wasted_queries(amp), E.nxdomain(nx)
            if not board.gone(nx) and total and wasted >= 0.8 * total:
                fold(amp, nx)
                board.remove(nx)


def dns_failures_above_nxdomain(board: Board) -> None:
    """DNS lookups that fail (no answer, SERVFAIL, REFUSED) rank above NXDOMAIN findings of the
    same window, however many the NXDOMAINs: an NXDOMAIN is the server answering, in a round
    trip, and the datapath works; a timeout stalls its client for the resolver's timeout and
    the lookup fails. By rate alone a storm of cheap NXDOMAINs would come first (and its
    queries dilute the failures' share, so they are often only a warning)."""
    failing = board.live_of(DNS_FAILURES)
    if not failing:
        return
    worst = max(failing, key=score)
    below = score(worst)
    for f in board.live_of(DNS_NEGATIVE):
        if score(f) >= below:
            # the highest impact that keeps its score under the failure's (rates stay in evidence)
            f.impact = 0.9 * max(0.0, 10 ** (below - SEVERITY_BASE[f.severity]) - 1)
            f.evidence["ranked_below"] = worst.id


def same_event(board: Board) -> None:
    """The same events seen twice: the finding with the names keeps them. A listener's overflow
    is counted by the node probe (sock_diag, TcpExt: it names the socket and says whether
    somaxconn caps it) and, where the kernel gives a drop reason, by the drops probe, whose
    somaxconn advice is blind: its fix lines are not merged."""
    for keep_id, others in SAME_EVENT.items():
        keep = next(iter(board.live(keep_id)), None)
        for oid in others if keep else ():
            for o in board.live(oid):
                fold(keep, o, merge_remediation=False)
                keep.impact = max(keep.impact, o.impact)  # the same events: the larger, not the sum
                if SEVERITY_RANK[o.severity] > SEVERITY_RANK[keep.severity]:
                    keep.severity = o.severity
                board.remove(o)


def audit_folds(board: Board) -> None:
    """Audit findings about the limit a live finding hits fold into the live finding."""
    for live_id, audit_ids in AUDIT_FOLDS.items():
        lives = board.live(live_id)
        if not lives:
            continue
        for aid in audit_ids:
            for a in board.all(aid):
                if not board.gone(a):
                    fold(lives[0], a)
                    board.remove(a)


Rule = Callable[[Board], None]
# The rules, in the order they apply.
RULES: tuple[Rule, ...] = (
    conntrack_explains_netfilter,
    dns_conntrack_race,
    dns_timeouts_in_full_table,
    dns_timeouts_next_to_netfilter,
    nxdomain_from_search_path,
    dns_failures_above_nxdomain,
    frag_rules.pmtu_discovery,
    frag_rules.pmtu_black_hole,
    frag_rules.mtu_mismatch_symptoms,
    frag_rules.udp_send_errors_at_veth,
    same_event,
    frag_rules.frag_drops_home,
    audit_folds,
)


def correlate(findings: list[Finding], rules: tuple[Rule, ...] = RULES) -> list[Finding]:
    """Cross-probe reasoning over every probe's findings (see the module docstring). Returns a
    new list; the probes' findings are changed in place where one absorbs another."""
    board = Board(findings)
    for rule in rules:
        rule(board)
    return board.reported()


def udp_race(dns: Finding, ins: Finding) -> Finding:
    """triage.dns_conntrack_race, with the DNS timeouts and the insert failures folded in."""
    d, i = E.DnsTimeouts.of(dns), E.InsertFailed.of(ins)
    sev = "critical" if "critical" in (dns.severity, ins.severity) else "warning"
    summary = (f"{d.timeouts} DNS queries timed out while conntrack failed to insert {i.failed} entries in "
               "the same window: the UDP conntrack race. A client sends the A and AAAA queries in "
               "parallel from one socket; both race to create the same conntrack entry (through the "
               "DNAT of the DNS service), one loses and is dropped, and the resolver waits its "
               "full timeout (5 s) before retrying.")
    if d.percent is not None:
        summary += f" {d.percent}% of the queries were affected."
    ev: dict[str, Any] = {"dns_timeouts": d.timeouts,
                          "dns_timeouts_per_second": d.per_second,
                          "timeout_percent": d.percent,
                          "conntrack_insert_failed": i.failed,
                          "insert_failed_per_second": round(ins.impact, 3),
                          "window_seconds": d.window_seconds if d.window_seconds is not None else i.window_seconds}
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
    fold(f, dns)
    fold(f, ins)
    return f
