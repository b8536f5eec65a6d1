"""The triage report behind /diagnose and `dpwatch diagnose`.

Each active probe contributes findings computed over a window: deltas between a snapshot
from the ring (taken by the sampler, never in a request) and a fresh reading taken now.
The cross-probe rules (rules.py) then fold and rank them, and the report is a JSON-ready
dict: findings best first, probe statuses, and the window's rates for the charts (series.py).
Rendering it is text.py's and html.py's business.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from typing import Any

from dpwatch.daemon.host.node import node_name
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.daemon.triage.board import score
from dpwatch.daemon.triage.rules import correlate
from dpwatch.daemon.triage.series import build_series, declared
from dpwatch.probes.base import SEVERITY_RANK, ContradictionError, Finding, Window

log = logging.getLogger("dpwatch.triage")

EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2}


class _Diagnosis:
    """Every active probe's findings over one window, and what went wrong on the way."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.errors: dict[str, str] = {}
        self.undeclared: dict[str, list[str]] = {}

    def run(self, active: dict[str, Any], fresh: dict[str, Any], old, span: float) -> None:
        for name, probe in active.items():
            if name not in fresh:
                continue
            win = Window(span, old.readings.get(name) if old else None, fresh[name])
            try:
                found = probe.diagnose(win)
            except ContradictionError:  # only raised under the test suite's check: fail loudly
                raise
            except Exception as exc:  # a probe bug must not take the report down
                log.exception("probe %s diagnose failed", name)
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            declared_ids = set(getattr(type(probe), "finding_ids", ()))
            bad = sorted({f.id for f in found if f.id not in declared_ids})
            if bad:
                log.warning("probe %s emitted undeclared finding ids %s (add them to finding_ids "
                            "and docs/findings.md)", name, ", ".join(bad))
                self.undeclared[name] = bad
            self.findings.extend(found)

    def correlate(self) -> None:
        try:
            self.findings = correlate(self.findings)
        except Exception as exc:  # the probes' own findings still make a report
            log.exception("cross-probe reasoning failed")
            self.errors["triage"] = f"{type(exc).__name__}: {exc}"
        self.findings.sort(key=lambda f: (-score(f), -SEVERITY_RANK[f.severity], -f.impact, f.id))

    def statuses(self, manager) -> list[dict[str, Any]]:
        probes = manager.statuses()
        for entry in probes:
            if entry["name"] in self.errors:
                entry["diagnose_error"] = self.errors[entry["name"]]
            if entry["name"] in self.undeclared:
                entry["undeclared_finding_ids"] = self.undeclared[entry["name"]]
        return probes


def build_report(manager, ring: SnapshotRing, window_seconds: float, features) -> dict[str, Any]:
    now_mono, now_wall = time.monotonic(), time.time()
    fresh = manager.collect()
    old = ring.at(now_mono - window_seconds)
    span = (now_mono - old.mono) if old is not None else 0.0
    active = manager.active()
    diag = _Diagnosis()
    diag.run(active, fresh, old, span)
    diag.correlate()
    worst = max((SEVERITY_RANK[f.severity] for f in diag.findings), default=0)
    probes = diag.statuses(manager)
    try:
        series = build_series(ring, now_mono - span if old else now_mono, now_mono, fresh, declared(active))
    except Exception as exc:  # charts are a nicety: never fail the report for them
        log.warning("series failed: %s", exc)
        series = []
    report = {
        "node": node_name(),
        "kernel": features.kernel_release,
        "generated_at": _dt.datetime.fromtimestamp(now_wall, _dt.timezone.utc).isoformat(timespec="seconds"),
        "window_seconds": round(span, 3),
        "window_requested_seconds": window_seconds,
        "status": {0: "ok", 1: "warning", 2: "critical"}[worst],
        "findings": [dict(f.as_dict(), score=round(score(f), 3)) for f in diag.findings],
        "probes": probes,
        "series": series,
    }
    if "triage" in diag.errors:
        report["triage_error"] = diag.errors["triage"]
    return report
