"""probes/base.py's window arithmetic: counter_delta, Window (deltas, rates, no old reading,
a zero-length window) and Finding.as_dict, over drops readings built by hand."""

from __future__ import annotations

from dpwatch.probes.base import Finding, Window, counter_delta
from test_drops_findings import reading

# -- base: counter_delta and Window ---------------------------------------------------------

def test_counter_delta():
    old = {"a": 5, "b": 10, "c": 3, "gone": 7}
    new = {"a": 8, "b": 4, "c": 3, "d": 2}
    # b went down: evicted from the LRU and re-added, so its new value is the increase.
    # c did not change and "gone" is no longer in the map: neither is reported.
    assert counter_delta(old, new) == {"a": 3, "b": 4, "d": 2}
    assert counter_delta({}, {"x": 0}) == {}
    assert counter_delta({"x": 5}, {"x": 0}) == {}
    assert counter_delta({}, {}) == {}


def test_window_delta_and_rate():
    old = reading({("NO_SOCKET", "ipv4"): 10})
    new = reading({("NO_SOCKET", "ipv4"): 35, ("NO_SOCKET", "ipv6"): 5})
    win = Window(10.0, old, new)
    assert win.seconds == 10.0
    assert win.delta("drops") == {("NO_SOCKET", "ipv4"): 25, ("NO_SOCKET", "ipv6"): 5}
    assert win.delta("locations") == {}
    assert win.delta("no_such_group") == {}
    assert win.rate(25) == 2.5
    assert win.rate(0) == 0.0


def test_window_without_old_reading():
    new = reading({("NO_SOCKET", "ipv4"): 35})
    win = Window(4.0, None, new)
    assert win.delta("drops") == {("NO_SOCKET", "ipv4"): 35}
    assert win.rate(35) == 8.75


def test_window_zero_seconds_does_not_divide_by_zero():
    win = Window(0.0, None, reading())
    assert win.seconds == 1e-9
    assert win.rate(0) == 0.0
    assert Window(-3.0, None, reading()).seconds == 1e-9


def test_finding_as_dict_rounds_impact():
    f = Finding(id="x.y", probe="x", severity="warning", title="t", summary="s", impact=1 / 3)
    assert f.as_dict() == {"id": "x.y", "probe": "x", "severity": "warning", "title": "t",
                           "summary": "s", "evidence": {}, "remediation": [], "impact": 0.333}
