"""Typed views of the probes' evidence that the cross-probe rules read.

A rule never looks up a key of another probe's evidence itself: it asks this module, which
knows each finding's evidence layout, so a key renamed in a probe fails here, in one place
(and in test_triage_rules.py, which builds findings through the probes' own key names).

Views are read when a rule asks, not up front: earlier rules write into evidence that later
ones read (UNEXPLAINED_DROPS), so a view always reflects the board as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpwatch.probes.base import Finding

# Keys triage itself writes into evidence and reads back in a later rule.
RELATED = "related"                        # folded findings, by id (see board.fold)
UNEXPLAINED_DROPS = "unexplained_drops"    # drops.netfilter: the part conntrack does not explain


def drops(f: Finding) -> int:
    """Packets dropped in the window: conntrack.table_full, drops.netfilter, drops.top_reasons."""
    return int(f.evidence.get("drops", 0))


def related_ids(f: Finding) -> dict:
    """The findings folded into ``f`` so far (id -> what was kept of them)."""
    return f.evidence.get(RELATED, {})


@dataclass(frozen=True)
class NetfilterDrops:
    """drops.netfilter."""
    drops: int
    unexplained: int                # not explained by conntrack (all of them until rule 1 says)
    by_protocol: dict[str, int]     # family -> drops

    @classmethod
    def of(cls, f: Finding) -> "NetfilterDrops":
        ev = f.evidence
        total = int(ev.get("drops", 0))
        by_proto = {fam: int(n) for fam, n in ev.get("by_protocol", {}).items()}
        return cls(total, int(ev.get(UNEXPLAINED_DROPS, total)), by_proto)


@dataclass(frozen=True)
class DnsTimeouts:
    """dns.timeouts."""
    timeouts: int
    per_second: float | None
    percent: float | None
    window_seconds: float | None

    @classmethod
    def of(cls, f: Finding) -> "DnsTimeouts":
        ev = f.evidence
        return cls(int(ev.get("timeouts", 0)), ev.get("timeouts_per_second"), ev.get("timeout_percent"),
                   ev.get("window_seconds"))


@dataclass(frozen=True)
class InsertFailed:
    """conntrack.insert_failed."""
    failed: int
    window_seconds: float | None

    @classmethod
    def of(cls, f: Finding) -> "InsertFailed":
        return cls(int(f.evidence.get("insert_failed", 0)), f.evidence.get("window_seconds"))


def nxdomain(f: Finding) -> int:
    """dns.nxdomain_rate: NXDOMAIN answers in the window."""
    return int(f.evidence.get("nxdomain", 0))


def wasted_queries(f: Finding) -> int:
    """dns.search_path_amplification: queries the search-path walk added."""
    return int(f.evidence.get("wasted_queries", 0))


@dataclass(frozen=True)
class FragNeeded:
    """mtu.pmtu_frag_needed."""
    sent: dict[str, int]                 # family -> frag-needed / packet-too-big sent
    repeated: list[tuple[str, int]]      # (destination, times) sent more than once

    @classmethod
    def of(cls, f: Finding) -> "FragNeeded":
        ev = f.evidence
        sent = {k[:-len("_sent")]: int(v) for k, v in ev.get("frag_needed", {}).items() if k.endswith("_sent")}
        repeated = [(r["dst"], r["count"]) for r in ev.get("recent", [])
                    if r.get("direction") == "sent" and r.get("count", 0) > 1]
        return cls(sent, repeated)


def fragmentation_failed(f: Finding) -> int:
    """frag.fragmentation_failed: packets the node could not fragment, every family."""
    return int(sum(f.evidence.get("fragmentation_failed", {}).values()))


def node_end_bigger(f: Finding) -> bool:
    """mtu.mismatch: one of its mismatches is a veth whose node end is the bigger one."""
    return any(m.get("node_end_bigger") for m in f.evidence.get("mismatches", []))


def buffer_errors(f: Finding) -> int:
    """node.socket_buffers_small: UDP buffer errors of the window."""
    return int(f.evidence.get("buffer_errors_in_window", 0) or 0)


@dataclass(frozen=True)
class TopReasons:
    """drops.top_reasons."""
    drops: int
    per_second: float
    threshold: float
    reasons: list[tuple[str, int]]            # (drop reason, drops)
    locations: list[tuple[str, str, int]]     # (kernel function, drop reason, drops)

    @classmethod
    def of(cls, f: Finding) -> "TopReasons":
        ev = f.evidence
        reasons = [(row.get("reason"), int(row.get("drops", 0))) for row in ev.get("top_reasons", [])]
        locations = [(str(loc.get("location", "")).split("+", 1)[0], loc.get("reason"), int(loc.get("count", 0)))
                     for loc in ev.get("top_locations", [])]
        return cls(int(ev.get("drops", 0)), float(ev.get("drops_per_second", 0.0)),
                   float(ev.get("threshold_per_second", 0.0) or 0.0), reasons, locations)
