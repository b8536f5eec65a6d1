"""Cross-probe rules of the fragmentation / MTU story (the table is rules.RULES):

- packets too big to forward, answered with frag-needed: path MTU discovery (pmtu_discovery);
- those answers dropped by netfilter: a PMTU black hole (pmtu_black_hole);
- fragmentation and frag-needed next to an MTU mismatch: one root cause (mtu_mismatch_symptoms),
  UDP send errors at a veth whose node end is bigger too (udp_send_errors_at_veth);
- the kernel's drop counts of these packets belong to the finding that tells their story
  (frag_drops_home).
"""

from __future__ import annotations

from dpwatch.daemon.triage import evidence as E
from dpwatch.daemon.triage.board import Board, fold
from dpwatch.probes.base import Finding
from dpwatch.probes.mtu.probe import ICMP_CAVEAT

# Symptoms of an MTU mismatch, folded into mtu.mismatch.
MTU_SYMPTOMS = ("frag.fragmentation_active", "frag.fragmentation_failed", "frag.reassembly_failures",
                "mtu.pmtu_frag_needed")
# Drop reasons of the frag/mtu story -> the finding whose packets they are.
FRAG_DROPS = {"PKT_TOO_BIG": "frag.fragmentation_failed", "FRAG_REASM_TIMEOUT": "frag.reassembly_failures",
              "DUP_FRAG": "frag.reassembly_failures", "FRAG_TOO_FAR": "frag.reassembly_failures"}
# Kernel functions of IP reassembly: an unreasoned drop there is a fragment it refused or lost.
REASSEMBLY_CODE = ("ip_defrag", "ip_frag_queue", "ip_frag_reasm", "ip_expire", "ip6_frag_queue",
                   "ip6_frag_reasm", "ip6_frag_expire", "ipv6_frag_rcv", "nf_ct_frag6_gather",
                   "inet_frag_")


def pmtu_discovery(board: Board) -> None:
    """Packets too big to forward, answered with frag-needed / packet-too-big: that is path MTU
    discovery, one story told by the ICMP side (which knows the announced MTU). Not when an
    MTU mismatch tells a bigger one."""
    pmtu = board.all("mtu.pmtu_frag_needed")
    if not pmtu or board.all("mtu.mismatch"):
        return
    pm = pmtu[0]
    for ff in board.live("frag.fragmentation_failed"):
        failed = E.fragmentation_failed(ff)
        sent = sum(E.FragNeeded.of(pm).sent.values())
        fold(pm, ff, {"frag_needed_sent": sent})
        pm.summary += (f" The node dropped {failed} packets it could not forward without "
                       "fragmenting them; these messages are its answers.")
        if failed > sent:
            # Not the ICMP rate limit: the kernel never limits frag-needed (icmpv4_mask_allow)
            # nor packet-too-big (icmpv6_ratemask leaves type 2 out).
            pm.summary += (f" {failed - sent} of them got no ICMP answer (these messages are "
                           "never rate-limited; the kernel sends none when it has no route back "
                           "to the sender, or for a packet to a broadcast or multicast address): "
                           "their senders only retry.")
        pm.impact = max(pm.impact, ff.impact)
        board.remove(ff)


def pmtu_black_hole(board: Board) -> None:
    """Frag-needed / packet-too-big sent while netfilter drops packets of the same family: the
    node's answers are being filtered (its own output chain, or the senders' input), so the
    senders never learn the path MTU: a PMTU black hole."""
    for pm in board.all("mtu.pmtu_frag_needed")[:1]:
        for nf in board.live("drops.netfilter")[:1]:
            if _icmp_filtered(pm, nf):
                board.remove(nf)


def _icmp_filtered(pm: Finding, nf: Finding) -> bool:
    """Every netfilter drop of a family that frag-needed / packet-too-big were sent in can be
    one of them (no more drops than messages): pm becomes the PMTU black hole (critical) and
    nf folds into it (True). More drops than messages: both stay, each naming the other."""
    sent = {fam: n for fam, n in E.FragNeeded.of(pm).sent.items() if n > 0}
    view = E.NetfilterDrops.of(nf)
    dropped = {fam: view.by_protocol.get(fam, 0) for fam in sent if view.by_protocol.get(fam, 0) > 0}
    if not dropped or not view.unexplained:
        return False
    # (conntrack may have explained some of them already: only the rest count)
    total_sent, total_dropped = sum(sent.values()), min(sum(dropped.values()), view.unexplained)
    fams = "/".join(sorted(dropped))
    if total_dropped > total_sent:
        pm.summary += (f" Netfilter also dropped {total_dropped} {fams} packets in this window, more than "
                       f"these {total_sent} messages: if a rule drops ICMP type 3 code 4 / ICMPv6 type 2, "
                       "this is a PMTU black hole (see drops.netfilter).")
        nf.summary += (f" Up to {total_sent} of them can be the ICMP frag-needed / packet-too-big the node "
                       "sent in the same window (see mtu.pmtu_frag_needed).")
        pm.evidence["netfilter_drops"] = dropped
        return False
    _black_hole(pm, nf, dropped, total_sent, total_dropped, fams)
    return True


def _black_hole(pm: Finding, nf: Finding, dropped: dict[str, int], total_sent: int,
                total_dropped: int, fams: str) -> None:
    repeated = E.FragNeeded.of(pm).repeated
    fold(pm, nf, {"frag_needed_filtered": total_dropped})
    pm.evidence["netfilter_drops"] = dropped
    pm.evidence["frag_needed_filtered"] = total_dropped
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
                 ", ".join(f"{dst}: {count} times" for dst, count in repeated[:4]) +
                 "), as when the senders never get them.")
    pm.summary = head + " " + pm.summary.replace(ICMP_CAVEAT, "")
    pm.remediation[:0] = [
        "nft list ruleset -a | grep -n -E 'icmp|reject|drop'   # the rule that drops the frag-needed "
        "(output and forward chains here; the senders' own policies)",
        "accept them before any drop: nft insert rule <family> <table> <chain> icmp type "
        "destination-unreachable icmp code frag-needed accept (IPv6: icmpv6 type packet-too-big accept)",
    ]
    pm.impact = max(pm.impact, nf.impact)


def mtu_mismatch_symptoms(board: Board) -> None:
    """Fragmentation, reassembly failures and frag-needed next to an MTU mismatch: one root
    cause, the mismatch, with the rest folded in (even what another finding took already)."""
    mism = board.all("mtu.mismatch")
    if not mism:
        return
    root = mism[0]
    folded = []
    for fid in MTU_SYMPTOMS:
        for f in board.all(fid):
            fold(root, f)
            root.impact += f.impact
            board.remove(f)
            folded.append(fid)
    if folded:
        root.summary += (" The " + ", ".join(folded) + " seen in this window follow from it "
                         "(see related).")


def udp_send_errors_at_veth(board: Board) -> None:
    """UDP buffer errors of the node next to a veth whose node end is the bigger one: the far
    end drops the node's full-size datagrams, and the kernel counts the ENOBUFS their senders
    get as SndbufErrors (in the node audit's buffer_errors), not a small buffer."""
    mism = board.all("mtu.mismatch")
    if not mism or not E.node_end_bigger(mism[0]):
        return
    root = mism[0]
    for f in board.all("node.socket_buffers_small"):
        errors = E.buffer_errors(f)
        if errors and not board.gone(f):
            # its sysctl advice does not apply here
            fold(root, f, {"note": "UDP send errors: the node's datagrams over the safe MTU "
                                   "dropped at the veth's smaller end (ENOBUFS, counted as "
                                   "SndbufErrors); if they go on after the fix, see "
                                   "node.socket_buffers_small"}, merge_remediation=False)
            root.summary += (f" The {errors} UDP buffer errors of this window are the node's own "
                             "datagrams dropped at the smaller end (the kernel counts that "
                             "ENOBUFS as SndbufErrors), not small socket buffers.")
            board.remove(f)


def frag_drops_home(board: Board) -> None:
    """Drops that are the fragmentation story's own packets (drop reasons PKT_TOO_BIG and the
    reassembly ones, and unreasoned drops in the reassembly code: fragments refused while its
    memory is full) belong to the finding that tells it, not to the catch-all drop finding."""
    for top in board.live("drops.top_reasons")[:1]:
        if _frag_drops(top, board):
            board.remove(top)


def _credits(top: E.TopReasons, board: Board) -> dict[int, tuple[Finding, int]]:
    """id() of each reported finding that tells some of these drops' story -> (it, how many)."""
    homes: dict[int, tuple[Finding, int]] = {}

    def credit(fid: str, n: int) -> None:
        home = board.home(fid)
        if home is not None and n > 0:
            homes[id(home)] = (home, homes.get(id(home), (home, 0))[1] + n)

    for reason, n in top.reasons:
        if reason in FRAG_DROPS:
            credit(FRAG_DROPS[reason], n)
    for func, reason, n in top.locations:
        if reason not in FRAG_DROPS and func.startswith(REASSEMBLY_CODE):
            credit("frag.reassembly_failures", n)
    return homes


def _frag_drops(top: Finding, board: Board) -> bool:
    """True when ``top`` (drops.top_reasons) folded away: without the drops a frag/mtu finding
    explains, the rest stays below its threshold. Else it keeps the rest."""
    view = E.TopReasons.of(top)
    homes = _credits(view, board)
    explained = min(view.drops, sum(n for _f, n in homes.values()))
    if not homes or not explained:
        return False
    home = max(homes.values(), key=lambda hn: hn[1])[0]
    # Its impact is the rate of the drops no specific finding explains: take these off it.
    rest_rate = max(0.0, top.impact - view.per_second * explained / view.drops)
    if rest_rate < view.threshold:
        # "look the reason up" adds nothing to the story's own fix
        fold(home, top, {"explained_drops": explained}, merge_remediation=False)
        home.summary += (f" The kernel's drop counters show these packets too: {explained} of the "
                         f"{view.drops} drops of this window are theirs.")
        home.impact = max(home.impact, top.impact)
        return True
    top.evidence["explained_by_fragmentation"] = explained
    top.impact = rest_rate
    top.summary += (f" {explained} of them are the packets {home.id} tells about (see it); "
                    f"the other {view.drops - explained} are not.")
    return False
