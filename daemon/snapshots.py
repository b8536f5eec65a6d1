"""A bounded ring of map snapshots, so /diagnose can take deltas over any window without
ever sampling inside a request."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Snapshot:
    mono: float        # time.monotonic() when taken
    wall: float        # time.time() when taken
    readings: dict[str, Any]


class SnapshotRing:
    def __init__(self, maxlen: int):
        if maxlen < 2:
            raise ValueError("the ring needs room for at least two snapshots")
        self._ring: deque[Snapshot] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def maxlen(self) -> int:
        return self._ring.maxlen or 0

    def append(self, readings: dict[str, Any], mono: float | None = None,
               wall: float | None = None) -> Snapshot:
        snap = Snapshot(time.monotonic() if mono is None else mono,
                        time.time() if wall is None else wall, readings)
        with self._lock:
            self._ring.append(snap)
        return snap

    def oldest(self) -> Snapshot | None:
        with self._lock:
            return self._ring[0] if self._ring else None

    def at(self, target_mono: float) -> Snapshot | None:
        """The snapshot taken closest to ``target_mono``; the oldest one if all are later."""
        with self._lock:
            snaps = list(self._ring)
        if not snaps:
            return None
        return min(snaps, key=lambda s: abs(s.mono - target_mono))
