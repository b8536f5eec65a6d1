"""Chart series a probe declares for the triage report's HTML page.

A probe lists its series as ``chart_series = (ChartSeries(...), ...)`` (in its own
``probes/<name>/charts.py``): each is one counter group of its readings, summed over the
keys it picks, turned into a per-second rate between snapshots by the report. Only the
probe knows its reading's key layout; the report knows none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ChartSeries:
    id: str                                       # unique across probes: the chart's id in the report
    title: str
    unit: str                                     # of the rate, e.g. "/s"
    group: str                                    # the counter group in the probe's reading
    keys: Callable[[Any], bool] | None = None     # which keys of the group count (None: all)
    value: Callable[[dict], float] | None = None  # or: the value of a delta of the group

    def read(self, delta: dict) -> float:
        """The series' value over one delta of its counter group (key -> increase)."""
        if self.value is not None:
            return float(self.value(delta))
        return float(sum(v for k, v in delta.items() if self.keys is None or self.keys(k)))


def key_is(position: int, *names: Any) -> Callable[[Any], bool]:
    """A key filter: the key tuple's element at ``position`` is one of ``names``."""
    return lambda k: k[position] in names
