"""The node probe's chart series."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries, key_is

# counters["limits"]: (counter name,) -> count
SERIES = (
    ChartSeries("listen_overflows", "TCP listen overflows", "/s", "limits", keys=key_is(0, "listen_overflows")),
)
