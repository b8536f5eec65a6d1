"""Unit tests of the triage report: cross-probe reasoning, ranking, the undeclared-id check,
the window's rate series, and the text/HTML renderings; plus content negotiation and
`dpwatch diagnose --url` against a real local HTTP server.

Findings here are built by hand in the shapes the probes emit (the probes' own tests check
those shapes against real readings). The DNS + conntrack-race scenario is synthetic here:
tests/e2e/test_triage_e2e.py runs the conntrack + DNS-timeout scenario for real."""

from __future__ import annotations

import http.server
import json
import threading
import time
from html.parser import HTMLParser

import pytest

from dpwatch.daemon import cli, triage
from dpwatch.daemon.app import BadRequest, report_format
from dpwatch.daemon.triage.html import render_html, sparkline
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.probes.base import Finding, Probe
from dpwatch.probes.charts import ChartSeries
from fakes import FakeFeatures, FakeManager


def F(fid, sev, impact=0.0, **ev) -> Finding:
    return Finding(id=fid, probe=fid.split(".")[0], severity=sev, title=fid.replace(".", " "),
                   summary=f"{fid} happened.", evidence=dict(ev),
                   remediation=[f"sysctl -w x.{fid}=1"], impact=impact)


def ids(findings) -> list[str]:
    out = [f.id for f in findings]
    assert len(out) == len(set(out)), f"reported twice: {out}"
    return out


def ranked(findings):
    return sorted(triage.correlate(findings), key=lambda f: -triage.score(f))


def test_conntrack_drops_explain_netfilter_drops():
    full = F("conntrack.table_full", "critical", 3.6, drops=36, entries=64, max=64)
    nf = F("drops.netfilter", "warning", 3.6, drops=36, drops_per_second=3.6)
    top = F("drops.top_reasons", "info", 0.1, drops=40)
    out = ranked([nf, top, full])
    assert ids(out) == ["conntrack.table_full", "drops.top_reasons"]
    rel = out[0].evidence["related"]["drops.netfilter"]
    assert rel["drops"] == 36 and rel["explained_by_conntrack"] == 36
    assert "not a firewall or policy rule" in out[0].summary
    assert "sysctl -w x.drops.netfilter=1" in out[0].remediation


def test_conntrack_explains_part_of_the_netfilter_drops():
    full = F("conntrack.table_full", "critical", 1.0, drops=10)
    nf = F("drops.netfilter", "warning", 3.0, drops=30)
    out = triage.correlate([nf, full])
    assert ids(out) == ["drops.netfilter", "conntrack.table_full"]
    assert nf.evidence["unexplained_drops"] == 20 and nf.evidence["explained_by_conntrack"] == 10
    assert nf.impact == pytest.approx(2.0)
    assert full.evidence["related"]["drops.netfilter"]["explained_by_conntrack"] == 10


def test_dns_timeouts_with_insert_failed_are_the_udp_race():
    dns = F("dns.timeouts", "warning", 2.0, timeouts=20, timeouts_per_second=2.0, timeout_percent=25.0,
            window_seconds=10.0)
    ins = F("conntrack.insert_failed", "warning", 2.1, insert_failed=21)
    other = F("drops.socket_receive_buffer", "warning", 0.5, drops=5)
    out = ranked([other, dns, ins])
    assert ids(out) == ["triage.dns_conntrack_race", "drops.socket_receive_buffer"]
    race = out[0]
    assert race.probe == "triage" and race.severity == "warning"
    assert race.evidence["dns_timeouts"] == 20 and race.evidence["conntrack_insert_failed"] == 21
    assert race.evidence["timeout_percent"] == 25.0 and "25.0% of the queries" in race.summary
    assert race.impact == pytest.approx(4.1)
    assert set(race.evidence["related"]) == {"dns.timeouts", "conntrack.insert_failed"}
    assert any("single-request-reopen" in r for r in race.remediation)
    assert any("NodeLocal DNSCache" in r for r in race.remediation)
    assert triage.TRIAGE_FINDING_IDS == ("triage.dns_conntrack_race",)


def test_dns_timeouts_inside_a_full_conntrack_table():
    full = F("conntrack.table_full", "critical", 5.0, drops=50)
    dns = F("dns.timeouts", "critical", 1.2, timeouts=12)
    out = ranked([dns, full])
    assert ids(out) == ["conntrack.table_full"]
    assert out[0].evidence["related"]["dns.timeouts"]["timeouts"] == 12
    assert out[0].impact == pytest.approx(6.2)
    # More timeouts than the table dropped: not explained, both stay.
    assert ids(triage.correlate([F("conntrack.table_full", "critical", 1, drops=5),
                                 F("dns.timeouts", "critical", 1, timeouts=12)])) == \
        ["conntrack.table_full", "dns.timeouts"]


def test_mtu_mismatch_absorbs_fragmentation():
    mm = F("mtu.mismatch", "critical", 1.0, safe_mtu=1450)
    fr = F("frag.fragmentation_active", "warning", 500.0, fragments_created_per_second=500.0)
    ra = F("frag.reassembly_failures", "warning", 2.0)
    pm = F("mtu.pmtu_frag_needed", "warning", 1.0)
    out = ranked([fr, ra, pm, mm])
    assert ids(out) == ["mtu.mismatch"]
    assert out[0].impact == pytest.approx(504.0)
    assert set(out[0].evidence["related"]) == {"frag.fragmentation_active", "frag.reassembly_failures",
                                               "mtu.pmtu_frag_needed"}
    # Without a mismatch, fragmentation stays itself.
    assert ids(triage.correlate([fr])) == ["frag.fragmentation_active"]


def test_df_packets_too_big_are_path_mtu_discovery_not_fragmentation():
    """The issue's case: frag-needed sent 3, fragmentation failed 3, fragments created 0. The
    frag probe says nothing about fragmenting; its failure folds into mtu.pmtu_frag_needed."""
    pmtu = F("mtu.pmtu_frag_needed", "warning", 0.1, frag_needed={"ipv4_sent": 3})
    failed = F("frag.fragmentation_failed", "warning", 0.1,
               fragmentation_failed={"ipv4": 5, "ipv6": 0}, fragments_created={"ipv4": 0, "ipv6": 0})
    out = triage.correlate([failed, pmtu])
    assert ids(out) == ["mtu.pmtu_frag_needed"]
    rel = out[0].evidence["related"]["frag.fragmentation_failed"]
    assert rel["frag_needed_sent"] == 3
    assert "dropped 5 packets it could not forward" in out[0].summary
    assert "2 of them got no ICMP answer" in out[0].summary
    # Next to an MTU mismatch, both are its symptoms.
    out = triage.correlate([failed, F("mtu.pmtu_frag_needed", "warning", 0.1, frag_needed={"ipv4_sent": 3}),
                            F("mtu.mismatch", "critical", 1.0, mismatches=[{}])])
    assert ids(out) == ["mtu.mismatch"]
    assert set(out[0].evidence["related"]) == {"frag.fragmentation_failed", "mtu.pmtu_frag_needed"}


def _pmtu_story(sent: dict, nf_drops: int, by_protocol: dict):
    pm = F("mtu.pmtu_frag_needed", "warning", 2.0, frag_needed=sent,
           recent=[{"direction": "sent", "dst": "198.18.1.2", "mtu": 1400, "count": 20}])
    pm.summary += triage.ICMP_CAVEAT
    failed = F("frag.fragmentation_failed", "warning", 2.0, fragmentation_failed={"ipv4": 20, "ipv6": 0})
    nf = F("drops.netfilter", "warning", 2.0, drops=nf_drops, by_protocol=by_protocol)
    return pm, failed, nf


def test_frag_needed_dropped_by_netfilter_is_a_pmtu_black_hole():
    """The node sent 20 frag-needed and netfilter dropped 20 IPv4 packets in the same window: the
    answers are filtered. One critical finding that says so, with both drops folded in."""
    pm, failed, nf = _pmtu_story({"ipv4_sent": 20}, 20, {"ipv4": 20})
    other = F("softirq.imbalance", "warning", 5.0)
    out = ranked([nf, other, failed, pm])
    assert ids(out) == ["mtu.pmtu_frag_needed", "softirq.imbalance"]
    top = out[0]
    assert top.severity == "critical" and top.title.startswith("PMTU black hole")
    assert top.summary.startswith("PMTU black hole: netfilter dropped 20 ipv4 packets")
    assert "(198.18.1.2: 20 times)" in top.summary and triage.ICMP_CAVEAT not in top.summary
    assert top.evidence["frag_needed_filtered"] == 20 and top.evidence["netfilter_drops"] == {"ipv4": 20}
    assert set(top.evidence["related"]) == {"frag.fragmentation_failed", "drops.netfilter"}
    assert "frag_needed_filtered" in top.claims
    assert top.remediation[0].startswith("nft list ruleset -a")
    # Part of the netfilter drops already explained by conntrack: only the rest is compared.
    pm, failed, nf = _pmtu_story({"ipv4_sent": 5}, 30, {"ipv4": 30})
    nf.evidence["unexplained_drops"] = 4
    out = triage.correlate([pm, nf])
    assert ids(out) == ["mtu.pmtu_frag_needed"] and out[0].evidence["frag_needed_filtered"] == 4


def test_netfilter_drops_that_cannot_be_the_frag_needed():
    # Of another family: nothing to do with each other.
    pm, failed, nf = _pmtu_story({"ipv4_sent": 20}, 20, {"ipv6": 20})
    out = triage.correlate([pm, nf])
    assert ids(out) == ["mtu.pmtu_frag_needed", "drops.netfilter"]
    assert pm.severity == "warning" and "black hole" not in pm.title and "netfilter_drops" not in pm.evidence
    # Far more drops than messages: a policy drops other traffic too; each finding names the other.
    pm, failed, nf = _pmtu_story({"ipv4_sent": 3, "ipv6_sent": 2}, 500, {"ipv4": 400, "ipv6": 100})
    out = triage.correlate([pm, nf])
    assert ids(out) == ["mtu.pmtu_frag_needed", "drops.netfilter"]
    assert pm.severity == "warning" and pm.evidence["netfilter_drops"] == {"ipv4": 400, "ipv6": 100}
    assert "if a rule drops ICMP type 3 code 4" in pm.summary
    assert "Up to 5 of them can be the ICMP frag-needed" in nf.summary
    # Next to an MTU mismatch, the black hole is one of its symptoms, still named as such.
    pm, failed, nf = _pmtu_story({"ipv6_sent": 7}, 7, {"ipv6": 7})
    out = triage.correlate([pm, nf, failed, F("mtu.mismatch", "critical", 1.0, mismatches=[{}])])
    assert ids(out) == ["mtu.mismatch"]
    assert out[0].evidence["related"]["mtu.pmtu_frag_needed"]["title"].startswith("PMTU black hole")


def test_udp_send_errors_next_to_a_bigger_node_veth_end_are_the_mismatch():
    """The node's own datagrams over the pod end's MTU are dropped there, and their senders'
    ENOBUFS count as SndbufErrors: not small buffers. No sysctl advice joins the mismatch."""
    veth = {"kind": "veth_mismatch", "devices": [], "safe_mtu": 1400, "node_end_bigger": True}
    bufs = F("node.socket_buffers_small", "warning", 4.0, buffer_errors_in_window=4)
    mm = F("mtu.mismatch", "critical", 1.0, mismatches=[veth], safe_mtu=1400)
    mm.remediation = ["ip link set dev veth1 mtu 1400"]
    out = triage.correlate([bufs, mm])
    assert ids(out) == ["mtu.mismatch"]
    assert out[0].evidence["related"]["node.socket_buffers_small"]["buffer_errors_in_window"] == 4
    assert "4 UDP buffer errors" in out[0].summary and out[0].remediation == ["ip link set dev veth1 mtu 1400"]
    # The pod's end the bigger one: the node's sends fit, the buffer errors are their own story.
    veth = dict(veth, node_end_bigger=False)
    bufs = F("node.socket_buffers_small", "warning", 4.0, buffer_errors_in_window=4)
    out = triage.correlate([bufs, F("mtu.mismatch", "critical", 1.0, mismatches=[veth])])
    assert sorted(ids(out)) == ["mtu.mismatch", "node.socket_buffers_small"]


def _top_reasons(drops, rate, impact, reasons, locations):
    return F("drops.top_reasons", "warning", impact, drops=drops, drops_per_second=rate,
             threshold_per_second=50.0,
             top_reasons=[{"reason": r, "drops": n} for r, n in reasons],
             top_locations=[{"location": loc, "reason": r, "count": n} for loc, r, n in locations])


def test_drops_of_refused_fragments_are_the_reassembly_failure():
    """Fragments refused while reassembly memory is full are freed without a reason in ip_defrag:
    the catch-all drop finding is these packets (and a few others), so it folds into the
    reassembly finding, whose fix lines stay its own."""
    ra = F("frag.reassembly_failures", "warning", 207.0, reassembly_failed={"ipv4": 685})
    ra.remediation = ["sysctl -w net.ipv4.ipfrag_high_thresh=8388608"]
    top = _top_reasons(709, 217.0, 217.0, [("NOT_SPECIFIED", 698), ("NO_SOCKET", 10)],
                       [("ip_defrag+0x795", "NOT_SPECIFIED", 672), ("ip6_mc_input+0xd4", "NOT_SPECIFIED", 13)])
    out = ranked([top, ra])
    assert ids(out) == ["frag.reassembly_failures"]
    assert out[0].evidence["related"]["drops.top_reasons"]["explained_drops"] == 672
    assert "672 of the 709 drops" in out[0].summary and out[0].impact == 217.0
    assert out[0].remediation == ["sysctl -w net.ipv4.ipfrag_high_thresh=8388608"]


def test_drops_too_big_to_forward_join_the_path_mtu_story():
    """PKT_TOO_BIG drops are the packets frag.fragmentation_failed counts; that folded into
    mtu.pmtu_frag_needed, so the drops go there. Other drops beyond the threshold stay."""
    pm = F("mtu.pmtu_frag_needed", "warning", 100.0, frag_needed={"ipv4_sent": 1000})
    ff = F("frag.fragmentation_failed", "warning", 100.0, fragmentation_failed={"ipv4": 1000, "ipv6": 0})
    top = _top_reasons(1000, 100.0, 100.0, [("PKT_TOO_BIG", 1000)], [("ip_forward+0x2c0", "PKT_TOO_BIG", 1000)])
    out = ranked([top, ff, pm])
    assert ids(out) == ["mtu.pmtu_frag_needed"]
    assert set(out[0].evidence["related"]) == {"frag.fragmentation_failed", "drops.top_reasons"}
    # 1000 PKT_TOO_BIG and 2000 OTHERHOST in 10 s: the other 200/s are a story of their own.
    pm = F("mtu.pmtu_frag_needed", "warning", 100.0, frag_needed={"ipv4_sent": 1000})
    ff = F("frag.fragmentation_failed", "warning", 100.0, fragmentation_failed={"ipv4": 1000, "ipv6": 0})
    top = _top_reasons(3000, 300.0, 300.0, [("OTHERHOST", 2000), ("PKT_TOO_BIG", 1000)], [])
    out = ranked([top, ff, pm])
    assert ids(out) == ["drops.top_reasons", "mtu.pmtu_frag_needed"]
    assert top.evidence["explained_by_fragmentation"] == 1000 and top.impact == pytest.approx(200.0)
    # No frag finding: nothing to explain them.
    top = _top_reasons(1000, 100.0, 100.0, [("PKT_TOO_BIG", 1000)], [])
    assert ids(triage.correlate([top])) == ["drops.top_reasons"] and "explained_by_fragmentation" not in top.evidence


def test_audit_folds_into_the_live_finding_without_duplicate_sysctls():
    live = Finding(id="drops.socket_receive_buffer", probe="drops", severity="warning", title="t",
                   summary="s", evidence={"drops": 9}, remediation=["sysctl -w net.core.rmem_max=16777216"],
                   impact=0.9)
    audit = Finding(id="node.socket_buffers_small", probe="node", severity="info", title="a", summary="s",
                    evidence={"net.core.rmem_max": 212992, "recommended": 33554432},
                    remediation=["sysctl -w net.core.rmem_max=33554432", "sysctl -w net.core.wmem_max=33554432"])
    out = triage.correlate([audit, live])
    assert ids(out) == ["drops.socket_receive_buffer"]
    assert live.remediation == ["sysctl -w net.core.rmem_max=16777216", "sysctl -w net.core.wmem_max=33554432"]
    assert live.evidence["related"]["node.socket_buffers_small"]["recommended"] == 33554432
    # An audit finding with no live counterpart stays.
    assert ids(triage.correlate([audit])) == ["node.socket_buffers_small"]


def test_nxdomain_explained_by_search_path_amplification():
    amp = F("dns.search_path_amplification", "warning", 9.0, wasted_queries=90)
    nx = F("dns.nxdomain_rate", "warning", 10.0, nxdomain=100)
    assert ids(triage.correlate([nx, amp])) == ["dns.search_path_amplification"]
    assert ids(triage.correlate([F("dns.nxdomain_rate", "warning", 10.0, nxdomain=1000),
                                 F("dns.search_path_amplification", "warning", 9.0, wasted_queries=90)])) == \
        ["dns.nxdomain_rate", "dns.search_path_amplification"]


def test_dns_timeouts_next_to_netfilter_drops_say_so():
    t = F("dns.timeouts", "critical", 1.2, timeouts=12)
    nf = F("drops.netfilter", "warning", 1.2, drops=12)
    out = ranked([nf, t])
    assert ids(out) == ["dns.timeouts", "drops.netfilter"]
    assert t.evidence["netfilter_drops_in_window"] == 12 and "NetworkPolicy blocks DNS" in t.summary
    assert t.remediation[0].startswith("nft list ruleset")
    few = F("dns.timeouts", "critical", 1.2, timeouts=12)
    triage.correlate([F("drops.netfilter", "warning", 0.5, drops=5), few])
    assert "netfilter_drops_in_window" not in few.evidence


def test_dns_failures_rank_above_nxdomain_findings():
    """A storm of NXDOMAINs (16/s) next to a few timeouts (0.8/s, a warning): the timeouts
    first; the same for errors next to search-path amplification. Without a failure the
    NXDOMAIN findings keep their impact."""
    t = F("dns.timeouts", "warning", 0.8, timeouts=12)
    nx = F("dns.nxdomain_rate", "warning", 16.0, nxdomain=200)
    assert ids(ranked([nx, t])) == ["dns.timeouts", "dns.nxdomain_rate"]
    assert nx.evidence["ranked_below"] == "dns.timeouts" and 0 < nx.impact < 0.8
    e = F("dns.errors", "warning", 1.0, errors=16)
    amp = F("dns.search_path_amplification", "warning", 12.0, wasted_queries=180)
    assert ids(ranked([amp, F("dns.nxdomain_rate", "warning", 12.0, nxdomain=180), e])) == \
        ["dns.errors", "dns.search_path_amplification"]
    # far more NXDOMAINs than a critical failure's rate would allow by score
    crit = F("dns.timeouts", "critical", 0.1, timeouts=3)
    huge = F("dns.nxdomain_rate", "warning", 5000.0, nxdomain=300000)
    assert ids(ranked([huge, crit])) == ["dns.timeouts", "dns.nxdomain_rate"]
    alone = F("dns.nxdomain_rate", "warning", 16.0, nxdomain=200)
    triage.correlate([alone, F("dns.latency_high", "warning", 1.0, answers_over_threshold=5)])
    assert alone.impact == 16.0 and "ranked_below" not in alone.evidence


def test_ranking_by_impact_across_severities():
    crit_idle = F("a.crit", "critical", 0.0)
    warn_busy = F("b.warn", "warning", 5000.0)
    warn_low = F("c.warn", "warning", 1.0)
    info_huge = F("d.info", "info", 1e9)
    out = sorted([info_huge, warn_low, crit_idle, warn_busy], key=lambda f: -triage.score(f))
    assert [f.id for f in out] == ["b.warn", "a.crit", "c.warn", "d.info"]
    assert triage.score(info_huge) < triage.score(F("e.warn", "warning", 0.0))


class OddProbe(Probe):
    name = "odd"
    finding_ids = ("odd.declared",)
    chart_series = (ChartSeries("odd_c", "odd events", "/s", "c"),)

    def diagnose(self, window):
        n = sum(window.delta("c").values())
        return [Finding(id="odd.declared", probe="odd", severity="warning", title="d", summary="d",
                        impact=window.rate(n)),
                Finding(id="odd.surprise", probe="odd", severity="info", title="s", summary="s")]


def test_build_report_flags_undeclared_ids_and_builds_series(caplog):
    ring = SnapshotRing(10)
    now = time.monotonic()
    for i, value in enumerate((0, 10, 40)):  # at now-30, now-20, now-10
        ring.append({"odd": {"counters": {"c": {("k",): value}}, "gauges": {}}}, mono=now - 30 + 10 * i)
    fresh = {"counters": {"c": {("k",): 100}}, "gauges": {}}
    manager = FakeManager({"odd": OddProbe(Config())}, {"odd": fresh}, modes={"odd": "m"},
                          reasons={"odd": "r"})
    report = triage.build_report(manager, ring, 30.0, FakeFeatures(kernel_release="k"))
    assert report["probes"][0]["undeclared_finding_ids"] == ["odd.surprise"]
    assert "undeclared finding ids odd.surprise" in caplog.text
    assert [f["id"] for f in report["findings"]] == ["odd.declared", "odd.surprise"]
    assert report["findings"][0]["impact"] == pytest.approx(100 / 30, rel=0.01)
    (s,) = report["series"]
    assert s["id"] == "odd_c" and len(s["v"]) == 3
    assert s["v"][0] == pytest.approx(1.0, rel=0.01) and s["v"][1] == pytest.approx(3.0, rel=0.01)
    assert s["v"][2] == pytest.approx(6.0, rel=0.05)  # 60 events in the last ~10 s
    assert s["t"][-1] == 0.0
    text = triage.render_text(report)
    assert "undeclared finding ids: odd.surprise" in text
    json.dumps(report)  # the report is JSON as it is


def Config():
    from dpwatch.daemon.config import Config as C
    return C()


def report_of(findings, status, series=()):
    return {"node": "node-a", "kernel": "6.18", "generated_at": "2026-01-01T00:00:00+00:00",
            "window_seconds": 60.0, "window_requested_seconds": 60.0, "status": status,
            "findings": [f.as_dict() for f in findings], "series": list(series),
            "probes": [{"name": "node", "state": "attached", "mode": "audit", "reason": ""}]}


def test_text_all_clear_with_info_notes():
    info = F("node.congestion_control", "info", 0.0, **{"net.ipv4.tcp_congestion_control": "cubic"})
    lines = triage.render_text(report_of([info], "ok")).splitlines()
    assert lines[2] == "STATUS: OK  (all clear: nothing above info; 1 info)"
    assert lines[4] == "Nothing abnormal seen in this window."
    assert "1. [INFO] node congestion_control  (node.congestion_control)" in lines


def test_text_shows_related_once():
    full = F("conntrack.table_full", "critical", 3.6, drops=36)
    nf = F("drops.netfilter", "warning", 3.6, drops=36)
    out = triage.correlate([full, nf])
    text = triage.render_text(report_of(out, "critical"))
    assert text.count("(drops.netfilter)") == 0  # not a finding of its own
    assert "   also explains (folded in, not reported again):" in text
    assert "     - drops.netfilter: drops netfilter  (drops=36, explained_by_conntrack=36)" in text


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_holds_the_findings():
    bad = F("drops.netfilter", "critical", 9.0, drops=90)
    bad.summary = "<script>alert(1)</script> & friends"
    info = F("node.overlay_in_use", "info", 0.0, overlay_devices=[{"name": "vxlan0", "kind": "vxlan"}])
    series = [{"id": "drops", "title": "packet drops", "unit": "/s", "probe": "drops",
               "t": [-20.0, -10.0, 0.0], "v": [0.0, 9.0, 3.0]}]
    page = render_html(report_of([bad, info], "critical", series))
    p = _Collect()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert not [v for k, v in p.attrs if k in ("src", "href") and v]
    assert "<script>alert(1)</script>" in "".join(p.text)  # shown as text, escaped in the page
    assert "&lt;script&gt;" in page
    assert p.tags.count("svg") == 1 and "polyline" in p.tags
    assert 'id="drops-netfilter"' in page and 'id="node-overlay_in_use"' in page
    assert "Likeliest cause:" in page
    ok = render_html(report_of([], "ok"))
    assert "All clear:" in ok and "<svg" not in ok


def test_sparkline_scales_to_the_peak():
    svg = sparkline([0.0, 5.0, 10.0], width=100, height=50)
    assert 'points="2.0,47.0 50.0,26.0 98.0,5.0"' in svg
    assert "no data" in sparkline([])


@pytest.mark.parametrize("fmt,accept,want", [
    (None, "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "html"),
    (None, "application/json", "json"),
    (None, "application/json, text/html", "json"),
    (None, "*/*", "text"),
    (None, "", "text"),
    ("html", "application/json", "html"),
    ("text", "text/html", "text"),
])
def test_report_format_negotiation(fmt, accept, want):
    assert report_format(fmt, accept) == want


def test_report_format_rejects_unknown():
    with pytest.raises(BadRequest, match="use text, json or html"):
        report_format("xml", "")


class _Handler(http.server.BaseHTTPRequestHandler):
    report: dict = {}
    seen: list = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Accept"), self.headers.get("Authorization")))
        if "window=7200s" in self.path:
            body, code = json.dumps({"error": "window: '2h' is longer than the 3600s"}).encode(), 400
        elif self.path.startswith("/notdpwatch"):
            body, code = b"<html>hello</html>", 200
        else:
            body, code = json.dumps(self.report).encode(), 200
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_diagnose_url_renders_a_daemons_report(server, capsys):
    full = F("conntrack.table_full", "critical", 3.0, drops=30)
    _Handler.report = report_of([full], "critical")
    _Handler.seen = []
    assert cli.main(["diagnose", "--url", server]) == 2
    out = capsys.readouterr().out
    assert out.startswith("dpwatch diagnose  node=node-a") and "(conntrack.table_full)" in out
    assert _Handler.seen[0][:2] == ("/diagnose?format=json", "application/json")
    assert cli.main(["diagnose", "--url", server.replace("http://", "http://u:p%40ss@") + "/diagnose",
                     "--window", "30s", "--format", "json"]) == 2
    assert json.loads(capsys.readouterr().out)["status"] == "critical"
    path, _, auth = _Handler.seen[1]
    assert path == "/diagnose?format=json&window=30s" and auth == "Basic dTpwQHNz"  # u:p@ss
    assert cli.main(["diagnose", "--url", server, "--format", "html"]) == 2
    assert capsys.readouterr().out.startswith("<!DOCTYPE html>")
    _Handler.report = report_of([], "ok")
    assert cli.main(["diagnose", "--url", server]) == 0
    assert "Nothing abnormal seen in this window." in capsys.readouterr().out


def test_diagnose_url_errors(server, capsys):
    assert cli.main(["diagnose", "--url", server, "--window", "2h"]) == cli.EX_USAGE
    assert "answered 400: window: '2h' is longer" in capsys.readouterr().err
    assert cli.main(["diagnose", "--url", server + "/notdpwatch"]) == cli.EX_UNREACHABLE
    assert "did not answer with a dpwatch report" in capsys.readouterr().err
    port = int(server.rsplit(":", 1)[1])
    closed = f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}"
    assert cli.main(["diagnose", "--url", closed]) == cli.EX_UNREACHABLE
    assert "cannot reach the daemon at" in capsys.readouterr().err
    assert cli.main(["diagnose", "--url", "node:9400"]) == cli.EX_USAGE
    assert "is not an http:// or https:// URL" in capsys.readouterr().err


def test_node_name_prefers_the_downward_api(monkeypatch):
    import socket
    from dpwatch.daemon.triage import node_name
    monkeypatch.setenv("NODE_NAME", "worker-7")
    assert node_name() == "worker-7"
    monkeypatch.setenv("NODE_NAME", "  ")
    assert node_name() == socket.gethostname()
    monkeypatch.delenv("NODE_NAME")
    assert node_name() == socket.gethostname()


def test_listen_overflow_counted_twice_is_one_finding_with_the_names():
    """node.listen_queue_overflow (sock_diag: the listener, its backlog) and drops.listen_overflow
    (the drop reason) are the same events: one finding, the named one, without the drops
    probe's somaxconn advice; its severity the higher of the two, impact the larger."""
    node = F("node.listen_queue_overflow", "warning", 50.0, listen_overflows_in_window=400)
    node.remediation = ["raise the listen() backlog of 0.0.0.0:8080 to 128"]
    drops = F("drops.listen_overflow", "critical", 80.0, drops=400)
    drops.remediation = ["sysctl -w net.core.somaxconn=8192"]
    low = F("node.somaxconn_low", "info", 0.0)
    out = triage.correlate([drops, low, node])
    assert ids(out) == ["node.listen_queue_overflow"]
    f = out[0]
    assert set(f.evidence["related"]) == {"drops.listen_overflow", "node.somaxconn_low"}
    assert f.remediation == ["raise the listen() backlog of 0.0.0.0:8080 to 128"]
    assert (f.severity, f.impact) == ("critical", 80.0)
    # Without the node probe, the drops probe's finding still takes the audit's.
    out = triage.correlate([F("drops.listen_overflow", "warning", 1.0, drops=3), F("node.somaxconn_low", "info")])
    assert ids(out) == ["drops.listen_overflow"]
