"""The MTU probe's chart series."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries

# counters["frag_needed"]: (family, direction) -> messages
SERIES = (
    ChartSeries("frag_needed", "ICMP frag-needed / packet-too-big", "/s", "frag_needed"),
)
