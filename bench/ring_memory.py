"""What the snapshot ring costs in memory as the node's CPU count grows (no kernel needed).

Per-CPU groups (softirq time and runs per vector, softnet fields, steal, the NET_RX/NET_TX
latency histograms per CPU) make a snapshot grow with the CPU count. This builds readings of
the softirq probe's shape for N CPUs, with values moving as on a busy node (hot keys change
every snapshot, histogram tails rarely), fills a ring for the defaults (5 s snapshots, 1 h
window) and measures the Python heap it holds (tracemalloc), for:

- "flat": every snapshot for the whole window, each with its own objects (dpwatch before the
  tiers: 722 snapshots);
- "tiered": daemon/snapshots.SnapshotRing.for_window (5 minutes of every snapshot, then one a
  minute, keys and unchanged values shared with the previous snapshot).

    .venv/bin/python bench/ring_memory.py [--cpus 2,32,128]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

VECTORS = ["HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU"]
ACTIVE = ["TIMER", "NET_TX", "NET_RX", "TASKLET", "SCHED", "RCU"]
SOFTNET = ["processed", "dropped", "time_squeeze", "received_rps", "flow_limit_count"]


def reading(cpus: int, t: int) -> dict:
    """The softirq probe's reading at snapshot number t, fresh objects (as collect() makes)."""
    ns, entries, softnet, ticks = {}, {}, {}, {}
    hist, net_hist = {}, {}
    for cpu in range(cpus):
        for v in ACTIVE:
            entries[(cpu, v)] = 1000 + t * (50 + cpu % 7)
            ns[(cpu, v)] = 10 ** 7 + t * (40_000 + cpu)
        for i, f in enumerate(SOFTNET):
            softnet[(cpu, f)] = 10 ** 6 + (t * 300 if i == 0 else t // 97)
        ticks[(cpu, "steal")] = 500 + t // 13
        ticks[(cpu, "total")] = 10 ** 6 + t * 500
        for v in ("NET_RX", "NET_TX"):
            for slot in range(8, 18):  # tail slots move rarely
                net_hist[(cpu, v, slot)] = 100 + (t * (18 - slot)) // (1 + (slot - 8) * 9)
    for v in ACTIVE:
        for slot in range(8, 20):
            hist[(v, slot)] = 1000 + (t * cpus * (20 - slot)) // (1 + (slot - 8) * 9)
    return {"softirq": {"counters": {"softirq_ns": ns, "softirq_entries": entries, "softnet": softnet,
                                     "cpu_ticks": ticks, "latency": hist, "net_latency": net_hist},
                        "gauges": {}}}


def measure(cpus: int, kind: str, window: float = 3600.0, interval: float = 5.0) -> tuple[int, int, int]:
    """(bytes held by the ring, snapshots held, keys per snapshot)."""
    from dpwatch.daemon.snapshots import SnapshotRing
    n = int(window / interval) + 2
    total = n + 40  # fill, then wrap
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    if kind == "flat":
        ring: object = collections.deque(maxlen=n)
        for t in range(total):
            ring.append(reading(cpus, t))
        held = len(ring)
    else:
        ring = SnapshotRing.for_window(window, interval)
        for t in range(total):
            ring.append(reading(cpus, t), mono=t * interval)
        held = len(ring)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    keys = sum(len(g) for g in reading(cpus, 0)["softirq"]["counters"].values())
    del ring
    return used, held, keys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", default="2,32,128")
    a = ap.parse_args(argv)
    print("| CPUs | keys per snapshot | flat: snapshots, MiB | tiered + shared: snapshots, MiB | ratio |")
    print("|---|---|---|---|---|")
    for cpus in [int(x) for x in a.cpus.split(",")]:
        f_used, f_held, keys = measure(cpus, "flat")
        t_used, t_held, _ = measure(cpus, "tiered")
        print(f"| {cpus} | {keys:,} | {f_held}, {f_used / 2**20:.1f} | {t_held}, {t_used / 2**20:.1f} | "
              f"{t_used / f_used:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
