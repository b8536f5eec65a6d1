"""The findings the cross-probe rules work on, folding one into another, and the score that
ranks them.

A rule reads the board (``all`` and ``live`` findings of an id), changes findings in place,
folds one into another (``fold``: the other goes under the first's related evidence and is
taken off the board with ``remove``) and may add a finding of its own (``add``). Nothing is
reported twice: ``reported()`` leaves out what was folded away and repeats.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from dpwatch.daemon.triage import evidence as E
from dpwatch.probes.base import Finding

SEVERITY_BASE = {"info": 0.0, "warning": 1.0, "critical": 3.0}


def score(f: Finding) -> float:
    """Severity plus the order of magnitude of the impact. Info stays below every warning."""
    s = SEVERITY_BASE[f.severity] + math.log10(1.0 + max(0.0, f.impact))
    return min(s, 0.99) if f.severity == "info" else s


class Board:
    def __init__(self, findings: Iterable[Finding]):
        self.out = list(findings)
        self._gone: set[int] = set()  # id() of findings folded away

    def all(self, fid: str) -> list[Finding]:
        """Every finding of this id, folded away or not."""
        return [f for f in self.out if f.id == fid]

    def live(self, fid: str) -> list[Finding]:
        """The findings of this id still to be reported."""
        return [f for f in self.out if f.id == fid and id(f) not in self._gone]

    def live_of(self, fids: Iterable[str]) -> list[Finding]:
        """The findings of any of these ids still to be reported, in board order."""
        want = set(fids)
        return [f for f in self.out if f.id in want and id(f) not in self._gone]

    def gone(self, f: Finding) -> bool:
        return id(f) in self._gone

    def remove(self, *findings: Finding) -> None:
        self._gone.update(id(f) for f in findings)

    def add(self, f: Finding) -> None:
        self.out.append(f)

    def home(self, fid: str) -> Finding | None:
        """The reported finding that tells ``fid``'s story: ``fid`` itself, or the one it folded into."""
        for f in self.out:
            if id(f) not in self._gone and (f.id == fid or fid in E.related_ids(f)):
                return f
        return None

    def reported(self) -> list[Finding]:
        """The board without what was folded away; the same id with the same summary once."""
        seen: set[tuple[str, str]] = set()
        result = []
        for f in self.out:
            key = (f.id, f.summary)
            if id(f) in self._gone or key in seen:
                continue
            seen.add(key)
            result.append(f)
        return result


def _scalars(ev: dict[str, Any], limit: int = 8) -> dict[str, Any]:
    out = {}
    for k, v in ev.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "window_seconds":
            out[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = v
        if len(out) >= limit:
            break
    return out


def fold(into: Finding, other: Finding, note: dict[str, Any] | None = None,
         merge_remediation: bool = True) -> None:
    """Put ``other`` under ``into``'s related evidence, with its fix lines unless they repeat
    (a sysctl already set by ``into`` stays ``into``'s). The caller takes ``other`` off the board."""
    related = into.evidence.setdefault(E.RELATED, {})
    entry = {"title": other.title, "severity": other.severity, **_scalars(other.evidence)}
    if note:
        entry.update(note)
    related[other.id] = entry
    if not merge_remediation:
        return
    keys = {_sysctl_key(r) for r in into.remediation}
    for step in other.remediation:
        key = _sysctl_key(step)
        if step not in into.remediation and (key is None or key not in keys):
            into.remediation.append(step)
            keys.add(key)


def _sysctl_key(step: str) -> str | None:
    if step.startswith("sysctl -w "):
        return step[len("sysctl -w "):].split("=", 1)[0].strip()
    return None
