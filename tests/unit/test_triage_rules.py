"""Each cross-probe rule of daemon/triage (rules.RULES) on its own: one test per rule, each
applying only that rule to a board of hand-built findings (the shapes the probes emit), plus
the table's order and the typed evidence views. tests/unit/test_triage.py checks the rules
together through correlate()."""

from __future__ import annotations

import pytest

from dpwatch.daemon.triage import evidence as E
from dpwatch.daemon.triage import frag_rules, rules
from dpwatch.daemon.triage.board import Board, score
from dpwatch.probes.base import Finding


def F(fid, sev="warning", impact=1.0, **ev) -> Finding:
    return Finding(id=fid, probe=fid.split(".")[0], severity=sev, title=fid.replace(".", " "),
                   summary=f"{fid} happened.", evidence=dict(ev),
                   remediation=[f"sysctl -w x.{fid}=1"], impact=impact)


def apply(rule, *findings) -> list[str]:
    """The ids reported after ``rule`` alone, in board order."""
    board = Board(findings)
    rule(board)
    return [f.id for f in board.reported()]


def test_the_table_lists_every_rule_once_in_order():
    names = [r.__name__ for r in rules.RULES]
    assert names == ["conntrack_explains_netfilter", "dns_conntrack_race", "dns_timeouts_in_full_table",
                     "dns_timeouts_next_to_netfilter", "nxdomain_from_search_path",
                     "dns_failures_above_nxdomain", "pmtu_discovery", "pmtu_black_hole",
                     "mtu_mismatch_symptoms", "udp_send_errors_at_veth", "same_event", "frag_drops_home",
                     "audit_folds"]
    # correlate applies only the rules it is given
    nf, full = F("drops.netfilter", drops=5), F("conntrack.table_full", "critical", drops=5)
    assert [f.id for f in rules.correlate([nf, full], rules=())] == ["drops.netfilter", "conntrack.table_full"]


def test_conntrack_explains_netfilter():
    full, nf = F("conntrack.table_full", "critical", 3.0, drops=30), F("drops.netfilter", impact=4.0, drops=30)
    assert apply(rules.conntrack_explains_netfilter, nf, full) == ["conntrack.table_full"]
    assert full.evidence["related"]["drops.netfilter"]["explained_by_conntrack"] == 30 and full.impact == 4.0
    # part of them: the rest stay under drops.netfilter, for the rules after this one
    full, nf = F("conntrack.table_full", "critical", drops=10), F("drops.netfilter", impact=3.0, drops=30)
    assert apply(rules.conntrack_explains_netfilter, nf, full) == ["drops.netfilter", "conntrack.table_full"]
    assert E.NetfilterDrops.of(nf).unexplained == 20 and nf.impact == pytest.approx(2.0)
    # no conntrack drops: nothing explained
    nf = F("drops.netfilter", drops=30)
    assert apply(rules.conntrack_explains_netfilter, nf, F("conntrack.table_full", drops=0)) == \
        ["drops.netfilter", "conntrack.table_full"] and E.UNEXPLAINED_DROPS not in nf.evidence


def test_dns_conntrack_race():
    dns = F("dns.timeouts", impact=2.0, timeouts=20, timeouts_per_second=2.0, window_seconds=10.0)
    ins = F("conntrack.insert_failed", "critical", 1.0, insert_failed=7, window_seconds=10.0)
    board = Board([dns, ins])
    rules.dns_conntrack_race(board)
    (race,) = board.reported()
    assert race.id in rules.TRIAGE_FINDING_IDS and race.severity == "critical" and race.impact == 3.0
    assert race.evidence == {"dns_timeouts": 20, "dns_timeouts_per_second": 2.0, "conntrack_insert_failed": 7,
                             "insert_failed_per_second": 1.0, "window_seconds": 10.0,
                             "related": race.evidence["related"]}
    assert "% of the queries" not in race.summary  # no timeout_percent in the evidence
    assert apply(rules.dns_conntrack_race, F("dns.timeouts", timeouts=3)) == ["dns.timeouts"]


def test_dns_timeouts_in_full_table():
    full, dns = F("conntrack.table_full", "critical", 5.0, drops=50), F("dns.timeouts", impact=1.5, timeouts=12)
    assert apply(rules.dns_timeouts_in_full_table, dns, full) == ["conntrack.table_full"]
    assert "12 DNS queries timed out in the same window" in full.summary and full.impact == 6.5
    assert apply(rules.dns_timeouts_in_full_table, F("dns.timeouts", timeouts=12),
                 F("conntrack.table_full", drops=11)) == ["dns.timeouts", "conntrack.table_full"]


def test_dns_timeouts_next_to_netfilter():
    dns = F("dns.timeouts", timeouts=12)
    nf = F("drops.netfilter", drops=100, **{E.UNEXPLAINED_DROPS: 15})  # what conntrack left
    assert apply(rules.dns_timeouts_next_to_netfilter, dns, nf) == ["dns.timeouts", "drops.netfilter"]
    assert dns.evidence["netfilter_drops_in_window"] == 15 and dns.remediation[0].startswith("nft list")
    few = F("dns.timeouts", timeouts=12)
    apply(rules.dns_timeouts_next_to_netfilter, few, F("drops.netfilter", drops=100, **{E.UNEXPLAINED_DROPS: 11}))
    assert "netfilter_drops_in_window" not in few.evidence


def test_nxdomain_from_search_path():
    amp, nx = F("dns.search_path_amplification", wasted_queries=80), F("dns.nxdomain_rate", nxdomain=100)
    assert apply(rules.nxdomain_from_search_path, nx, amp) == ["dns.search_path_amplification"]
    assert "dns.nxdomain_rate" in E.related_ids(amp)
    assert apply(rules.nxdomain_from_search_path, F("dns.nxdomain_rate", nxdomain=101),
                 F("dns.search_path_amplification", wasted_queries=80)) == \
        ["dns.nxdomain_rate", "dns.search_path_amplification"]


def test_dns_failures_above_nxdomain():
    errors, nx = F("dns.errors", impact=0.5), F("dns.nxdomain_rate", impact=50.0, nxdomain=500)
    assert apply(rules.dns_failures_above_nxdomain, nx, errors) == ["dns.nxdomain_rate", "dns.errors"]
    assert score(nx) < score(errors) and nx.evidence["ranked_below"] == "dns.errors"
    # already below: left as it is
    low = F("dns.nxdomain_rate", impact=0.1)
    apply(rules.dns_failures_above_nxdomain, low, F("dns.timeouts", "critical", 1.0))
    assert low.impact == 0.1 and "ranked_below" not in low.evidence


def test_pmtu_discovery():
    pm = F("mtu.pmtu_frag_needed", frag_needed={"ipv4_sent": 2, "ipv6_received": 9})
    ff = F("frag.fragmentation_failed", impact=3.0, fragmentation_failed={"ipv4": 5, "ipv6": 0})
    assert apply(frag_rules.pmtu_discovery, ff, pm) == ["mtu.pmtu_frag_needed"]
    assert pm.evidence["related"]["frag.fragmentation_failed"]["frag_needed_sent"] == 2
    assert "3 of them got no ICMP answer" in pm.summary and pm.impact == 3.0
    # next to an MTU mismatch this rule leaves both to it
    assert apply(frag_rules.pmtu_discovery, F("frag.fragmentation_failed"), F("mtu.pmtu_frag_needed"),
                 F("mtu.mismatch", "critical")) == \
        ["frag.fragmentation_failed", "mtu.pmtu_frag_needed", "mtu.mismatch"]


def test_pmtu_black_hole():
    pm = F("mtu.pmtu_frag_needed", frag_needed={"ipv4_sent": 10, "ipv6_sent": 0},
           recent=[{"direction": "sent", "dst": "10.0.0.9", "count": 4},
                   {"direction": "received", "dst": "10.0.0.8", "count": 9}])
    nf = F("drops.netfilter", drops=8, by_protocol={"ipv4": 8, "ipv6": 3})
    assert apply(frag_rules.pmtu_black_hole, pm, nf) == ["mtu.pmtu_frag_needed"]
    assert pm.severity == "critical" and pm.evidence["netfilter_drops"] == {"ipv4": 8}
    assert "(10.0.0.9: 4 times)" in pm.summary and "10.0.0.8" not in pm.summary
    # no frag-needed of that family: unrelated
    assert apply(frag_rules.pmtu_black_hole, F("mtu.pmtu_frag_needed", frag_needed={"ipv6_sent": 3}),
                 F("drops.netfilter", drops=8, by_protocol={"ipv4": 8})) == \
        ["mtu.pmtu_frag_needed", "drops.netfilter"]


def test_mtu_mismatch_symptoms():
    mm = F("mtu.mismatch", "critical", 1.0)
    fr, pm = F("frag.fragmentation_active", impact=10.0), F("mtu.pmtu_frag_needed", impact=2.0)
    other = F("dns.timeouts")
    assert apply(frag_rules.mtu_mismatch_symptoms, fr, other, pm, mm) == ["dns.timeouts", "mtu.mismatch"]
    assert mm.impact == 13.0 and set(E.related_ids(mm)) == {"frag.fragmentation_active", "mtu.pmtu_frag_needed"}
    assert "frag.fragmentation_active, mtu.pmtu_frag_needed seen in this window" in mm.summary


def test_udp_send_errors_at_veth():
    mm = F("mtu.mismatch", "critical", mismatches=[{"kind": "veth_mismatch"}, {"node_end_bigger": True}])
    bufs = F("node.socket_buffers_small", buffer_errors_in_window=6)
    assert apply(frag_rules.udp_send_errors_at_veth, bufs, mm) == ["mtu.mismatch"]
    assert mm.remediation == ["sysctl -w x.mtu.mismatch=1"] and "The 6 UDP buffer errors" in mm.summary
    # no send errors, or the pod's end the bigger one: the audit finding stays
    assert apply(frag_rules.udp_send_errors_at_veth, F("node.socket_buffers_small", buffer_errors_in_window=None),
                 F("mtu.mismatch", mismatches=[{"node_end_bigger": True}])) == \
        ["node.socket_buffers_small", "mtu.mismatch"]
    assert apply(frag_rules.udp_send_errors_at_veth, F("node.socket_buffers_small", buffer_errors_in_window=6),
                 F("mtu.mismatch", mismatches=[{"node_end_bigger": False}])) == \
        ["node.socket_buffers_small", "mtu.mismatch"]


def test_same_event():
    node = F("node.listen_queue_overflow", "warning", 5.0)
    drops = F("drops.listen_overflow", "critical", 2.0, drops=20)
    assert apply(rules.same_event, drops, node) == ["node.listen_queue_overflow"]
    assert (node.severity, node.impact) == ("critical", 5.0)
    assert node.remediation == ["sysctl -w x.node.listen_queue_overflow=1"]  # the blind advice stays out
    assert apply(rules.same_event, F("drops.listen_overflow"), F("node.somaxconn_low", "info")) == \
        ["drops.listen_overflow", "node.somaxconn_low"]


def test_frag_drops_home():
    ra = F("frag.reassembly_failures", impact=50.0)
    top = F("drops.top_reasons", impact=60.0, drops=600, drops_per_second=60.0, threshold_per_second=50.0,
            top_reasons=[{"reason": "FRAG_REASM_TIMEOUT", "drops": 500}, {"reason": "NO_SOCKET", "drops": 100}],
            top_locations=[])
    assert apply(frag_rules.frag_drops_home, top, ra) == ["frag.reassembly_failures"]
    assert ra.evidence["related"]["drops.top_reasons"]["explained_drops"] == 500 and ra.impact == 60.0
    # the drops of a finding folded elsewhere go to where it went
    pm = F("mtu.pmtu_frag_needed", related={"frag.fragmentation_failed": {}})
    top = F("drops.top_reasons", impact=100.0, drops=1000, drops_per_second=100.0, threshold_per_second=50.0,
            top_reasons=[{"reason": "PKT_TOO_BIG", "drops": 100}],
            top_locations=[{"location": "ip_defrag+0x1", "reason": "NOT_SPECIFIED", "count": 50}])
    assert apply(frag_rules.frag_drops_home, top, pm) == ["drops.top_reasons", "mtu.pmtu_frag_needed"]
    assert top.evidence["explained_by_fragmentation"] == 100 and top.impact == pytest.approx(90.0)


def test_audit_folds():
    live, audit = F("softnet.backlog_drops"), F("node.netdev_max_backlog_low", "info")
    assert apply(rules.audit_folds, audit, live) == ["softnet.backlog_drops"]
    assert "node.netdev_max_backlog_low" in E.related_ids(live)
    assert apply(rules.audit_folds, F("node.netdev_max_backlog_low", "info")) == ["node.netdev_max_backlog_low"]


def test_evidence_views_read_the_probes_keys():
    nf = F("drops.netfilter", drops=9, by_protocol={"ipv6": 4})
    assert E.NetfilterDrops.of(nf) == E.NetfilterDrops(9, 9, {"ipv6": 4})
    pm = F("mtu.pmtu_frag_needed", frag_needed={"ipv4_sent": 1, "ipv4_received": 5, "ipv6_sent": 0})
    assert E.FragNeeded.of(pm).sent == {"ipv4": 1, "ipv6": 0}
    top = F("drops.top_reasons", drops=3, top_locations=[{"location": "ip_expire+0x9/0x40", "reason": "R",
                                                          "count": 2}])
    assert E.TopReasons.of(top).locations == [("ip_expire", "R", 2)]
    assert E.DnsTimeouts.of(F("dns.timeouts")) == E.DnsTimeouts(0, None, None, None)
