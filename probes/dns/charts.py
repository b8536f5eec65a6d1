"""The DNS probe's chart series."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries

SERIES = (
    ChartSeries("dns_queries", "DNS queries", "/s", "queries"),
    ChartSeries("dns_timeouts", "DNS timeouts", "/s", "timeouts"),
)
