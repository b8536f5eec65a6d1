"""The conntrack probe's chart series."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries, key_is

# counters["stats"]: (netns inode, stat field) -> count
SERIES = (
    ChartSeries("conntrack_drops", "conntrack drops (table full)", "/s", "stats", keys=key_is(1, "drop")),
    ChartSeries("conntrack_insert_failed", "conntrack insert failures", "/s", "stats",
                keys=key_is(1, "insert_failed")),
)
