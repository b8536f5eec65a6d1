"""Unit tests for dpwatch.daemon.snapshots.SnapshotRing."""

from __future__ import annotations

import time

import pytest

from dpwatch.daemon.snapshots import SnapshotRing


def filled(maxlen: int, monos: list[float]) -> SnapshotRing:
    ring = SnapshotRing(maxlen)
    for m in monos:
        ring.append({"n": m}, mono=m, wall=1000.0 + m)
    return ring


@pytest.mark.parametrize("maxlen", [1, 0, -3])
def test_too_small(maxlen):
    with pytest.raises(ValueError):
        SnapshotRing(maxlen)


def test_bound():
    ring = filled(3, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert ring.maxlen == 3
    assert len(ring) == 3
    assert ring.oldest().mono == 3.0
    assert ring.oldest().wall == 1003.0
    assert ring.oldest().readings == {"n": 3.0}
    assert [ring.at(m).mono for m in (3.0, 4.0, 5.0)] == [3.0, 4.0, 5.0]


def test_smallest_ring():
    ring = filled(2, [1.0, 2.0, 3.0])
    assert len(ring) == 2
    assert ring.oldest().mono == 2.0


def test_empty():
    ring = SnapshotRing(2)
    assert len(ring) == 0
    assert ring.oldest() is None
    assert ring.at(10.0) is None


@pytest.mark.parametrize("target, mono", [
    (10.0, 10.0),
    (14.9, 10.0),
    (15.1, 20.0),
    (22.0, 20.0),
    (28.0, 30.0),
    (1000.0, 40.0),   # all snapshots earlier: the newest
    (3.0, 10.0),      # all snapshots later: the oldest
    (-5.0, 10.0),
])
def test_at_picks_closest(target, mono):
    ring = filled(8, [10.0, 20.0, 30.0, 40.0])
    snap = ring.at(target)
    assert snap.mono == mono
    assert snap.readings == {"n": mono}


def test_at_after_wrap_uses_oldest_kept():
    ring = filled(3, [10.0, 20.0, 30.0, 40.0, 50.0])
    assert ring.at(0.0).mono == 30.0
    assert ring.at(36.0).mono == 40.0


def test_append_defaults_to_now():
    ring = SnapshotRing(4)
    before_mono, before_wall = time.monotonic(), time.time()
    snap = ring.append({"x": 1})
    assert before_mono <= snap.mono <= time.monotonic()
    assert before_wall <= snap.wall <= time.time()
    assert ring.oldest() is snap
