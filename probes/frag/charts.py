"""The frag probe's chart series."""

from __future__ import annotations

from dpwatch.probes.charts import ChartSeries, key_is

# counters["snmp"]: (counter name, family) -> count
SERIES = (
    ChartSeries("fragments_created", "IP fragments created", "/s", "snmp", keys=key_is(0, "frag_creates")),
    ChartSeries("reassembly_failed", "IP reassembly failures", "/s", "snmp", keys=key_is(0, "reasm_fails")),
)
