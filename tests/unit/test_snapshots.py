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


# -- tiers: every snapshot of the last 5 minutes, then one a minute -------------------------------

@pytest.mark.parametrize("max_window, interval, size", [
    (60.0, 5.0, 14),       # up to 5 minutes: one tier, every snapshot
    (10.0, 3.0, 5),
    (300.0, 1.0, 302),
    (3600.0, 5.0, 62 + 57),   # 1 h at 5 s: 62 recent + 57 a minute apart, not 722
    (86400.0, 5.0, 62 + 121),  # 24 h: one per 720 s, so never more than ~120 coarse
])
def test_for_window_sizes(max_window, interval, size):
    ring = SnapshotRing.for_window(max_window, interval)
    assert ring.maxlen == size


@pytest.mark.parametrize("max_window, interval", [(3600.0, 5.0), (900.0, 1.0), (7200.0, 10.0), (200.0, 5.0)])
def test_every_window_up_to_max_is_served_within_half_a_step(max_window, interval):
    ring = SnapshotRing.for_window(max_window, interval)
    t = 0.0
    while t <= 3 * max_window:  # long enough to fill and wrap both tiers
        ring.append({"t": t}, mono=t)
        t += interval
    now = t - interval
    assert len(ring) <= ring.maxlen
    assert now - ring.oldest().mono >= max_window  # the longest window is still there
    step = ring.coarse_step or interval
    for window in (interval, 60.0, 299.0, 301.0, 1000.0, max_window):
        if window > max_window:
            continue
        got = now - ring.at(now - window).mono
        tolerance = interval / 2 if window <= 300 - interval else step / 2 + interval
        assert abs(got - window) <= tolerance, (window, got)


def test_coarse_snapshots_are_a_step_apart_and_recent_ones_all_kept():
    ring = SnapshotRing.for_window(3600.0, 5.0)
    for i in range(2000):
        ring.append({}, mono=i * 5.0)
    monos = [s.mono for s in ring._all()]
    assert monos == sorted(monos)
    now = monos[-1]
    recent = [m for m in monos if m >= now - 300]
    assert recent == [now - 5.0 * k for k in range(len(recent))][::-1] and len(recent) == 61
    older = [m for m in monos if m < now - 300]
    assert all(b - a >= 60.0 for a, b in zip(older, older[1:]))
    assert len(older) <= 57


def test_unchanged_keys_and_values_are_shared_between_snapshots():
    ring = SnapshotRing(4)
    def reading(v):  # fresh objects every time, as a probe's collect() makes them
        return {"p": {"counters": {"g": {(int("7"), "cpu" + str(0)): 10 ** 6 + int(v)}},
                      "gauges": {"x": {("a",): 5000 + 0}}, "info": {"keep": "as is"}}}
    a = ring.append(reading("0")).readings
    b = ring.append(reading("0")).readings
    c = ring.append(reading("1")).readings
    ka, kb = next(iter(a["p"]["counters"]["g"])), next(iter(b["p"]["counters"]["g"]))
    assert ka == kb == (7, "cpu0") and ka is kb
    assert a["p"]["counters"]["g"][ka] is b["p"]["counters"]["g"][kb]    # same value: shared
    assert c["p"]["counters"]["g"][ka] == 10 ** 6 + 1                      # changed: its own
    assert next(iter(c["p"]["counters"]["g"])) is ka
    assert c["p"]["info"] == {"keep": "as is"} and b == reading("0") and c == reading("1")
