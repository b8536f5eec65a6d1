"""The sample-size rule (probes/sample.py) and the findings that use it: exact binomial tails,
the small samples a person would call (8 of 8 DNS answers at 800 ms), the ones they would
not (1 of 1), and the headline check."""

from __future__ import annotations

import math

import pytest

from dpwatch.daemon.config import Config
from dpwatch.probes.base import ContradictionError, Finding, Window, contradictions
from dpwatch.probes.dns.probe import DnsProbe
from dpwatch.probes.sample import binom_sf, p_value, share_exceeds
from test_dns_findings import reading


def exact_sf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("k,n,p", [(1, 1, 0.01), (2, 2, 0.01), (3, 10, 0.01), (21, 1000, 0.01),
                                   (5, 5, 0.2), (7, 10, 0.2), (0, 5, 0.5), (6, 5, 0.5)])
def test_binomial_tail_is_exact(k, n, p):
    want = 1.0 if k <= 0 else 0.0 if k > n else exact_sf(k, n, p)
    assert binom_sf(k, n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("k,n,p0,expect", [
    (1, 1, 0.01, False),    # one slow answer: 1% likely even when healthy
    (2, 2, 0.01, True), (2, 3, 0.01, True), (3, 3, 0.01, True), (8, 8, 0.01, True),
    (2, 10, 0.01, False), (3, 10, 0.01, True), (4, 50, 0.01, False), (5, 50, 0.01, True),
    (20, 1000, 0.01, False), (22, 1000, 0.01, True),
    (4, 4, 0.2, False), (5, 5, 0.2, True), (6, 10, 0.2, False), (7, 10, 0.2, True),
    (0, 100, 0.01, False), (5, 0, 0.01, False)])
def test_share_exceeds(k, n, p0, expect):
    assert share_exceeds(k, n, p0) is expect


def test_p_value_is_rounded_for_json():
    assert p_value(2, 2, 0.01) == 0.0001 and p_value(1, 1, 0.5) == 0.5


def dns() -> DnsProbe:
    return DnsProbe(Config().validate())


def test_eight_answers_all_slow_is_slow_dns():
    """The issue's case: every answer of a pod after 800 ms, 8 in the window."""
    new = reading(8, {"NOERROR": 8}, {("NOERROR", 12): 8})  # bucket 12: (512, 1024] ms
    f, = dns().diagnose(Window(60, reading(), new))
    assert f.id == "dns.latency_high" and f.severity == "warning"
    assert f.evidence["answers"] == 8 and f.evidence["answers_over_threshold"] == 8
    assert f.summary.startswith("8 of 8 DNS answers took longer than 200 ms")
    assert f.evidence["p_value_if_p99_were_below"] == float(f"{0.01 ** 8:.3g}")


@pytest.mark.parametrize("buckets,expect", [
    ({("NOERROR", 12): 1}, False),                       # one slow answer
    ({("NOERROR", 12): 3}, True),                        # all of three
    ({("NOERROR", 12): 2, ("NOERROR", 2): 98}, False),   # 2% of 100: could be a healthy p99
    ({("NOERROR", 12): 5, ("NOERROR", 2): 95}, False),  # P = 0.0034
    ({("NOERROR", 12): 6, ("NOERROR", 2): 94}, True),   # P = 0.0005
])
def test_latency_sample_sizes(buckets, expect):
    n = sum(buckets.values())
    found = [f.id for f in dns().diagnose(Window(60, reading(n, {"NOERROR": n}), reading(n, {"NOERROR": n}, buckets)))]
    assert ("dns.latency_high" in found) is expect


def test_the_bucket_holding_the_threshold_counts_by_its_share():
    # 200 ms lies in bucket 10, (128, 256] ms: 56/128 of its answers count as over 200 ms.
    new = reading(16, {"NOERROR": 16}, {("NOERROR", 10): 16})
    f, = dns().diagnose(Window(60, reading(), new))
    assert f.evidence["answers_over_threshold"] == 7  # 16 * 56 / 128 = 7
    below = reading(16, {"NOERROR": 16}, {("NOERROR", 9): 16})  # (64, 128] ms: none over
    assert dns().diagnose(Window(60, reading(), below)) == []


def test_one_timeout_is_not_a_finding_two_are():
    one = reading(1, {}, {}, timeouts={"10.96.0.10:53": 1})
    assert dns().diagnose(Window(60, reading(), one)) == []
    two = reading(2, {}, {}, timeouts={"10.96.0.10:53": 2})
    f, = dns().diagnose(Window(60, reading(), two))
    assert f.id == "dns.timeouts" and f.severity == "critical" and f.evidence["timeouts"] == 2


def test_headline_claims_are_checked(monkeypatch):
    ok = Finding("frag.fragmentation_active", "frag", "warning", "t", "s",
                 evidence={"fragments_created": {"ipv4": 3, "ipv6": 0}}, claims=("fragments_created",))
    assert contradictions(ok) == []
    bad = dict(evidence={"fragments_created": {"ipv4": 0, "ipv6": 0}}, claims=("fragments_created",))
    monkeypatch.delenv("DPWATCH_CHECK_CLAIMS", raising=False)
    f = Finding("frag.fragmentation_active", "frag", "warning", "t", "s", **bad)
    assert contradictions(f) == ["claims 'fragments_created' but its count is {'ipv4': 0, 'ipv6': 0}"]
    monkeypatch.setenv("DPWATCH_CHECK_CLAIMS", "1")
    with pytest.raises(ContradictionError, match="fragments_created"):
        Finding("frag.fragmentation_active", "frag", "warning", "t", "s", **bad)
    with pytest.raises(ContradictionError, match="no such key"):
        Finding("x.y", "x", "warning", "t", "s", evidence={}, claims=("drops",))
