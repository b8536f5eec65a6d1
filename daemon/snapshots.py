"""A bounded ring of map snapshots, so /diagnose can take deltas over any window without
ever sampling inside a request.

Two things keep its memory small on big nodes, where per-CPU groups (softirq time, softnet,
latency histograms) make one snapshot hundreds of KB on a 128-CPU machine:

- **Tiers.** Every snapshot of the last ``fine_seconds`` (5 minutes) is kept; older ones are
  thinned to one per ``coarse_step`` (a minute for windows up to 2 hours, then max_window/120).
  A 1-hour window at the default 5 s interval keeps about 120 snapshots instead of 722. A
  window longer than 5 minutes then starts within half a coarse step of what was asked; the
  report's window is always the real span between the two snapshots.
- **Sharing.** A new snapshot's counter and gauge groups reuse the previous snapshot's key
  tuples, and its value objects where the value has not changed, so an entry that did not
  move costs a dict slot, not a new tuple and a new int.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

FINE_SECONDS = 300.0     # every snapshot of the last 5 minutes is kept
COARSE_MAX = 120         # older ones: at most this many, one per coarse step
COARSE_STEP_MIN = 60.0


@dataclass
class Snapshot:
    mono: float        # time.monotonic() when taken
    wall: float        # time.time() when taken
    readings: dict[str, Any]


class SnapshotRing:
    """``maxlen`` recent snapshots; with ``coarse_len`` > 0, snapshots older than
    ``fine_seconds`` are not dropped but thinned to one per ``coarse_step`` seconds, at most
    ``coarse_len`` of them (use for_window())."""

    def __init__(self, maxlen: int, fine_seconds: float = float("inf"), coarse_step: float = 0.0,
                 coarse_len: int = 0):
        if maxlen < 2:
            raise ValueError("the ring needs room for at least two snapshots")
        self._ring: deque[Snapshot] = deque(maxlen=maxlen)
        self._coarse: deque[Snapshot] = deque(maxlen=max(1, coarse_len))
        self._tiered = coarse_len > 0
        self.fine_seconds, self.coarse_step = fine_seconds, coarse_step
        self._lock = threading.Lock()
        # (probe, kind, group) -> {key: the key object the last snapshot holds}
        self._canon: dict[tuple, dict] = {}

    @classmethod
    def for_window(cls, max_window: float, interval: float) -> "SnapshotRing":
        """A ring that serves every window up to ``max_window`` with snapshots taken every
        ``interval`` seconds: all of the last FINE_SECONDS, then one per coarse step."""
        if max_window <= FINE_SECONDS:
            return cls(int(max_window / interval) + 2)
        step = max(COARSE_STEP_MIN, max_window / COARSE_MAX)
        fine = int(FINE_SECONDS / interval) + 2
        coarse = int((max_window - FINE_SECONDS) / step) + 2
        return cls(fine, FINE_SECONDS, step, coarse)

    def __len__(self) -> int:
        return len(self._ring) + (len(self._coarse) if self._tiered else 0)

    @property
    def maxlen(self) -> int:
        return (self._ring.maxlen or 0) + ((self._coarse.maxlen or 0) if self._tiered else 0)

    def append(self, readings: dict[str, Any], mono: float | None = None,
               wall: float | None = None) -> Snapshot:
        snap = Snapshot(time.monotonic() if mono is None else mono,
                        time.time() if wall is None else wall, readings)
        with self._lock:
            snap.readings = self._share(readings)
            if self._tiered and len(self._ring) == self._ring.maxlen:
                self._demote(self._ring[0])  # about to fall out of the fine tier
            self._ring.append(snap)
            while self._tiered and self._ring and self._ring[0].mono < snap.mono - self.fine_seconds:
                self._demote(self._ring.popleft())
        return snap

    def _demote(self, old: Snapshot) -> None:
        if not self._coarse or old.mono - self._coarse[-1].mono >= self.coarse_step:
            self._coarse.append(old)  # the deque drops the oldest coarse one when full

    def _share(self, readings: Any) -> Any:
        """The readings, with each counter/gauge group rebuilt on the previous snapshot's key
        objects, and its value objects where the value is the same."""
        if not isinstance(readings, dict):
            return readings
        prev = self._ring[-1].readings if self._ring else {}
        canon: dict[tuple, dict] = {}
        out: dict[str, Any] = {}
        for probe, reading in readings.items():
            if not isinstance(reading, dict):
                out[probe] = reading
                continue
            new_r: dict[str, Any] = {}
            for kind, groups in reading.items():
                if kind not in ("counters", "gauges") or not isinstance(groups, dict):
                    new_r[kind] = groups
                    continue
                prev_groups = ((prev.get(probe) or {}).get(kind) or {}) if isinstance(prev, dict) else {}
                new_g: dict[str, Any] = {}
                for gname, group in groups.items():
                    if not isinstance(group, dict):
                        new_g[gname] = group
                        continue
                    old_keys = self._canon.get((probe, kind, gname), {})
                    old_vals = prev_groups.get(gname) if isinstance(prev_groups.get(gname), dict) else {}
                    keys: dict = {}
                    rebuilt: dict = {}
                    for k, v in group.items():
                        k = old_keys.get(k, k)
                        keys[k] = k
                        pv = old_vals.get(k, None)
                        rebuilt[k] = pv if pv is not None and type(pv) is type(v) and pv == v else v
                    canon[(probe, kind, gname)] = keys
                    new_g[gname] = rebuilt
                new_r[kind] = new_g
            out[probe] = new_r
        self._canon = canon  # only the keys the newest snapshot has: bounded by it
        return out

    def _all(self) -> list[Snapshot]:
        return (list(self._coarse) if self._tiered else []) + list(self._ring)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot the ring holds, across tiers (the coarse ones first), oldest first."""
        with self._lock:
            return self._all()

    def oldest(self) -> Snapshot | None:
        snaps = self.snapshots()
        return snaps[0] if snaps else None

    def at(self, target_mono: float) -> Snapshot | None:
        """The snapshot taken closest to ``target_mono``; the oldest one if all are later."""
        snaps = self.snapshots()
        if not snaps:
            return None
        return min(snaps, key=lambda s: abs(s.mono - target_mono))
