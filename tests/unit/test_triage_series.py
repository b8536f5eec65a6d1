"""The triage report's chart series: declared by the probes (probes/<name>/charts.py), read
over every tier of the snapshot ring (a 1 h report charts the whole hour, not the fine
tier's last 5 minutes)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from dpwatch.daemon import triage
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.daemon.triage.series import MAX_POINTS, build_series, declared
from dpwatch.probes.charts import ChartSeries, key_is
from dpwatch.probes.registry import PROBES
from fakes import FakeFeatures, FakeManager


def test_every_probe_declares_its_series_with_unique_ids():
    ids = [s.id for cls in PROBES for s in cls.chart_series]
    assert len(ids) == len(set(ids)) and len(ids) == 11
    assert all(isinstance(s, ChartSeries) for cls in PROBES for s in cls.chart_series)


# series id -> (a delta of its counter group, what the series reads from it)
SAMPLES = {
    "drops": ({("NOT_SPECIFIED", 0): 3, ("CONSUMED", 0): 100, ("NOT_DROPPED_YET", 1): 50,
               ("NETFILTER_DROP", 1): 4}, 7),
    "conntrack_drops": ({(4026531840, "drop"): 5, (4026531840, "insert_failed"): 2, (1, "drop"): 1}, 6),
    "conntrack_insert_failed": ({(4026531840, "drop"): 5, (4026531840, "insert_failed"): 2}, 2),
    "fragments_created": ({("frag_creates", "ipv4"): 8, ("frag_creates", "ipv6"): 1, ("reasm_fails", "ipv4"): 3}, 9),
    "reassembly_failed": ({("frag_creates", "ipv4"): 8, ("reasm_fails", "ipv4"): 3}, 3),
    "frag_needed": ({("ipv4", "sent"): 2, ("ipv6", "received"): 5}, 7),
    "softnet_dropped": ({(0, "dropped"): 2, (1, "dropped"): 3, (0, "time_squeeze"): 9}, 5),
    "softnet_squeezed": ({(0, "dropped"): 2, (0, "time_squeeze"): 9}, 9),
    "dns_queries": ({("10.96.0.10:53",): 40, ("1.1.1.1:53",): 2}, 42),
    "dns_timeouts": ({("10.96.0.10:53",): 4}, 4),
    "listen_overflows": ({("listen_overflows",): 6, ("backlog_drops",): 1}, 6),
}


@pytest.mark.parametrize("cls", PROBES, ids=lambda c: c.name)
def test_each_series_reads_its_probes_keys(cls):
    for s in cls.chart_series:
        delta, want = SAMPLES[s.id]
        assert s.read(delta) == want, s.id


def test_a_series_may_read_its_value_with_a_function():
    s = ChartSeries("max", "busiest", "/s", "g", value=lambda d: max(d.values(), default=0))
    assert s.read({("a",): 3, ("b",): 7}) == 7.0
    assert ChartSeries("x", "x", "/s", "g", keys=key_is(0, "a", "b")).read({("a",): 1, ("b",): 2, ("c",): 4}) == 3


def test_only_active_probes_series_in_their_order():
    a = SimpleNamespace(chart_series=(ChartSeries("a1", "a", "/s", "g"),))
    b = SimpleNamespace()  # declares none
    c = SimpleNamespace(chart_series=(ChartSeries("c1", "c", "/s", "g"), ChartSeries("c2", "c", "/s", "h")))
    assert [(p, s.id) for p, s in declared({"c": c, "b": b, "a": a})] == [("c", "c1"), ("c", "c2"), ("a", "a1")]


def _hour_ring(now: float) -> SnapshotRing:
    """The daemon's ring for --max-window 1h at 5 s snapshots, filled for an hour: counter c
    of probe odd grows by 5 a snapshot (1/s)."""
    ring = SnapshotRing.for_window(3600.0, 5.0)
    for i in range(721):
        ring.append({"odd": {"counters": {"c": {("k",): 5 * i}}, "gauges": {}}}, mono=now - 3600 + 5 * i)
    return ring


def test_series_cover_every_tier_of_the_ring():
    now = 10_000.0
    ring = _hour_ring(now)
    snaps = ring.snapshots()
    assert snaps[0].mono < now - 3000 and snaps[-1].mono == now
    assert [s.mono for s in snaps] == sorted(s.mono for s in snaps) and len(snaps) == len(ring)
    fresh = {"odd": {"counters": {"c": {("k",): 3605}}, "gauges": {}}}
    (s,) = build_series(ring, now - 3600, now + 5, fresh, [("odd", ChartSeries("odd_c", "odd", "/s", "c"))])
    assert s["t"][0] < -3000 and s["t"][-1] == 0.0  # the whole hour, not its last 5 minutes
    assert len(s["v"]) <= MAX_POINTS + 1 and s["v"] == pytest.approx([1.0] * len(s["v"]))


class _OddProbe:
    finding_ids = ()
    chart_series = (ChartSeries("odd_c", "odd events", "/s", "c"),)

    def diagnose(self, window):
        return []


def test_an_hour_report_charts_the_whole_hour():
    now = time.monotonic()
    ring = _hour_ring(now - 5)  # the last snapshot 5 s ago, the fresh reading now
    fresh = {"counters": {"c": {("k",): 3605}}, "gauges": {}}
    manager = FakeManager({"odd": _OddProbe()}, {"odd": fresh}, modes={"odd": "m"})
    report = triage.build_report(manager, ring, 3600.0, FakeFeatures(kernel_release="k"))
    (s,) = report["series"]
    assert report["window_seconds"] > 3500
    assert s["t"][0] < -3000, s["t"][:3]
    assert s["v"] == pytest.approx([1.0] * len(s["v"]), rel=0.05)
