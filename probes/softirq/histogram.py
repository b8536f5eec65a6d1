"""The raise-to-run latency histogram of bpf/softirq.c: log2 slots, slot s holding latencies
of 2^(s-1) to 2^s - 1 ns (slot 0: 0 ns), the last slot everything longer. The slot count is
bpf/softirq.h's SOFTIRQ_HIST_SLOTS."""

from __future__ import annotations

import math

from dpwatch.probes.cdefs import defines

HIST_SLOTS = defines("softirq.h")["SOFTIRQ_HIST_SLOTS"]
LE_SLOTS = range(8, HIST_SLOTS - 1)  # exported bucket bounds: 2^8 ns (256 ns) .. 2^30 ns (~1.07 s)


def slot_bounds(slot: int) -> tuple[float, float]:
    """Seconds [low, high) of a log2 slot: slot s holds latencies of 2^(s-1) to 2^s - 1 ns."""
    return ((1 << (slot - 1)) / 1e9 if slot > 0 else 0.0), (1 << slot) / 1e9


def p99_slot(hist: dict[int, float]) -> int | None:
    """The slot holding the 99th percentile of a {slot: count} histogram."""
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = math.ceil(0.99 * total)
    seen = 0.0
    for slot in sorted(hist):
        seen += hist[slot]
        if seen >= rank:
            return slot
    return max(hist)


def prometheus_buckets(slots: dict[int, int]) -> list[tuple[str, int]]:
    """Cumulative (le, count) buckets of one vector's {slot: count}: slot k holds values below
    2^k ns, so all of them are <= 2^s ns for every exported bound s >= k."""
    buckets = []
    for s in LE_SLOTS:
        cum = sum(n for k, n in slots.items() if k <= s)
        buckets.append((repr((1 << s) / 1e9), cum))
    buckets.append(("+Inf", sum(slots.values())))
    return buckets
