"""How many events a finding needs: a rule that accounts for the sample size.

A rule such as "p99 DNS latency at or above 200 ms" or "1% of queries time out" compares a
share of n observations with a limit. With many observations the measured share is the
answer; with few it is noise, and the old answer was a minimum count (10 answers) below
which nothing was said, so 8 answers that all took 800 ms said nothing.

Here a rule fires when the observations rule out the healthy case: if the true share were
at or below the limit p0, seeing k or more of n would have a probability below ALPHA (a
one-sided binomial test). With p0 = 1% (a p99 rule) that is 2 of 2, 2 of 3, 3 of 10, 5 of
50 or about 2% of a thousand; with p0 = 20% it is 5 of 5 or 7 of 10. A single event is
never enough for a 1% rule (its probability under the healthy case is 1%). Findings state
n and k, so the reader sees the sample the conclusion stands on.
"""

from __future__ import annotations

import math

ALPHA = 1e-3  # the chance of calling a healthy node unhealthy that one rule accepts per window


def binom_sf(k: float, n: float, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p). Non-integer n and k (weighted samples) are floored."""
    n, k = int(n), int(math.floor(k))
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # Sum the upper tail in log space: exact for the small n that matter, stable for large n.
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k, n + 1):
        term = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        total += math.exp(term)
        if i > k + 50 and term < -50:  # the tail beyond is negligible
            break
    return min(1.0, total)


def share_exceeds(k: float, n: float, p0: float, alpha: float = ALPHA) -> bool:
    """True when k events in n observations show the true share is above p0 (p0 in 0..1)."""
    if n <= 0 or k <= 0:
        return False
    if p0 <= 0.0:
        return True
    if p0 >= 1.0:
        return False
    return binom_sf(k, n, p0) < alpha


def p_value(k: float, n: float, p0: float) -> float:
    """The evidence a finding states: P(k or more of n | share p0), rounded for JSON."""
    v = binom_sf(k, n, p0)
    return float(f"{v:.3g}")
