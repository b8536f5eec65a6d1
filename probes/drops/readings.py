"""The drops probe's reading, as other probes that declare ``needs = ("drops",)`` read it.

``reading["counters"]["drops"]`` maps (reason name, protocol class) to cumulative drops.
"""

from __future__ import annotations

from typing import Any, Iterable


def reason_total(reading: dict[str, Any] | None, reason: str) -> int:
    """Cumulative drops of one reason, all protocol classes."""
    if not reading:
        return 0
    drops = reading.get("counters", {}).get("drops", {})
    return int(sum(v for (name, _proto), v in drops.items() if name == reason))


def reason_totals(reading: dict[str, Any] | None, reasons: Iterable[str]) -> dict[tuple[str], int]:
    """{(reason,): cumulative drops} for each of ``reasons`` (0 when none were seen)."""
    return {(r,): reason_total(reading, r) for r in reasons}
