"""The window's rates for the report's HTML charts, from the series the active probes declare
(``chart_series``, see probes/charts.py) over the snapshot ring, every tier of it."""

from __future__ import annotations

import math
from typing import Any, Iterable

from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.probes.base import counter_delta
from dpwatch.probes.charts import ChartSeries

MAX_POINTS = 60


def declared(active: dict[str, Any]) -> list[tuple[str, ChartSeries]]:
    """(probe name, series) of every active probe, in the probes' order."""
    return [(name, s) for name, probe in active.items() for s in getattr(probe, "chart_series", ())]


def build_series(ring: SnapshotRing, start_mono: float, now_mono: float, fresh: dict[str, Any],
                 series: Iterable[tuple[str, ChartSeries]]) -> list[dict[str, Any]]:
    """Per-second rates between consecutive snapshots of the window (the fresh reading last),
    at most MAX_POINTS points per series (neighbouring intervals merged)."""
    snaps = [(s.mono, s.readings) for s in ring.snapshots() if s.mono >= start_mono - 1e-6]
    snaps.append((now_mono, fresh))
    if len(snaps) < 2:
        return []
    step = max(1, math.ceil((len(snaps) - 1) / MAX_POINTS))
    picks = snaps[::step]
    if picks[-1] is not snaps[-1]:
        picks.append(snaps[-1])
    out = []
    for probe, s in series:
        t, v = [], []
        seen = False
        for (m0, r0), (m1, r1) in zip(picks, picks[1:]):
            new = (r1.get(probe) or {}).get("counters", {}).get(s.group)
            if new is None:
                continue
            seen = True
            old = (r0.get(probe) or {}).get("counters", {}).get(s.group, {})
            dt = max(m1 - m0, 1e-6)
            t.append(round(m1 - now_mono, 1))
            v.append(round(s.read(counter_delta(old, new)) / dt, 3))
        if seen:
            out.append({"id": s.id, "title": s.title, "unit": s.unit, "probe": probe, "t": t, "v": v})
    return out
