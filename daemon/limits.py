"""Bounds on what user space keeps: the series cap per metric.

A probe's metric family can grow with what the node does (drop reasons, interfaces, netns).
``SeriesLimiter`` caps each family at ``max_series`` label sets. The first ones seen (the
largest values first, on the scrape that first sees more than fit) keep their own series for
as long as they keep appearing; every later one is folded into one series whose labels are all
"other" (its value is the sum of the folded values), and each label set folded for the first
time adds 1 to ``dpwatch_series_overflow_total{metric}``.

Everything here is bounded: per metric at most ``max_series`` admitted label sets and at most
``4 * max_series`` remembered folded ones; a label set not seen for ``idle_seconds`` frees its
slot, so a churning label (an evicted LRU entry) does not hold a slot forever.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from prometheus_client.core import Metric

OTHER = "other"
_PER_SAMPLE = ("le", "quantile")  # labels of one sample within a series, not of the series
DEFAULT_MAX_SERIES = 2000
DEFAULT_IDLE_SECONDS = 3600.0


class _Family:
    __slots__ = ("admitted", "folded", "overflow")

    def __init__(self):
        self.admitted: OrderedDict[tuple, float] = OrderedDict()  # labels -> last seen (monotonic)
        self.folded: OrderedDict[tuple, None] = OrderedDict()     # labels already counted
        self.overflow = 0


class SeriesLimiter:
    def __init__(self, max_series: int = DEFAULT_MAX_SERIES, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 clock=time.monotonic):
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        self.max_series = max_series
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()  # concurrent scrapes

    def overflow(self) -> dict[str, int]:
        """metric name -> label sets folded into "other" since start (cumulative)."""
        with self._lock:
            return {name: fam.overflow for name, fam in self._families.items()}

    def apply(self, metric: Metric) -> Metric:
        """The family with at most max_series series (folded ones summed into "other")."""
        samples = metric.samples
        if not samples:
            return metric
        # A series is a label set without le/quantile: a histogram's buckets, _sum and _count
        # stay together, and fold together.
        label_names = tuple(n for n in samples[0].labels if n not in _PER_SAMPLE)
        if not label_names:
            return metric  # one series, nothing to cap
        series: dict[tuple, list] = {}
        for s in samples:
            series.setdefault(tuple(s.labels.get(n, "") for n in label_names), []).append(s)
        now = self._clock()
        with self._lock:
            fam = self._families.setdefault(metric.name, _Family())
            self._expire(fam, now)
            keep, fold = [], []
            # Known ones first; then new ones by value, largest first, while room is left.
            new = [k for k in series if k not in fam.admitted]
            for k in series:
                if k in fam.admitted:
                    keep.append(k)
                    fam.admitted[k] = now
                    fam.admitted.move_to_end(k)
            new.sort(key=lambda k: -sum(s.value for s in series[k]))
            other = (OTHER,) * len(label_names)
            for k in new:
                if k == other:  # the probe's own "other" (e.g. DNS servers past --dns-top-servers):
                    fold.append(k)  # it joins the folded series, and nothing overflowed
                elif len(fam.admitted) < self.max_series:
                    fam.admitted[k] = now
                    keep.append(k)
                else:
                    fold.append(k)
                    if k not in fam.folded:
                        fam.overflow += 1
                        fam.folded[k] = None
                        while len(fam.folded) > 4 * self.max_series:
                            fam.folded.popitem(last=False)
                    else:
                        fam.folded.move_to_end(k)
        if not fold:
            return metric
        out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        for k in keep:
            out.samples.extend(series[k])
        sums: dict[tuple, float] = {}  # (sample name, le/quantile labels) -> sum
        for k in fold:
            for s in series[k]:
                extra = tuple((n, v) for n, v in s.labels.items() if n in _PER_SAMPLE)
                sums[(s.name, extra)] = sums.get((s.name, extra), 0.0) + s.value
        for (name, extra), value in sums.items():
            out.add_sample(name, {**dict.fromkeys(label_names, OTHER), **dict(extra)}, value)
        return out

    def _expire(self, fam: _Family, now: float) -> None:
        while fam.admitted:
            k, seen = next(iter(fam.admitted.items()))
            if now - seen < self.idle_seconds:
                break
            del fam.admitted[k]
