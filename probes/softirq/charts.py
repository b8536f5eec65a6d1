"""The softirq probe's chart series."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries, key_is

# counters["softnet"]: (cpu, softnet_stat column) -> count
SERIES = (
    ChartSeries("softnet_dropped", "softnet backlog drops", "/s", "softnet", keys=key_is(1, "dropped")),
    ChartSeries("softnet_squeezed", "softnet time squeezes", "/s", "softnet", keys=key_is(1, "time_squeeze")),
)
