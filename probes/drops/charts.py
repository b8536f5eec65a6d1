"""The drops probe's chart series: every drop, whatever its reason."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries
from dpwatch.probes.drops.findings import NOT_DROPS

# counters["drops"]: (reason name, protocol class) -> drops
SERIES = (
    ChartSeries("drops", "packet drops", "/s", "drops", keys=lambda k: k[0] not in NOT_DROPS),
)
