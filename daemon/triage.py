"""The triage report behind /diagnose and `dpwatch diagnose`.

Each active probe contributes findings computed over a window: deltas between a snapshot
from the ring (taken by the sampler, never in a request) and a fresh reading taken now.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import textwrap
import time
from typing import Any

from ..probes.base import SEVERITY_RANK, Finding, Window
from .snapshots import SnapshotRing

log = logging.getLogger("dpwatch.triage")


def build_report(manager, ring: SnapshotRing, window_seconds: float, features) -> dict[str, Any]:
    now_mono, now_wall = time.monotonic(), time.time()
    fresh = manager.collect()
    old = ring.at(now_mono - window_seconds)
    span = (now_mono - old.mono) if old is not None else 0.0
    findings: list[Finding] = []
    errors: dict[str, str] = {}
    for name, probe in manager.active().items():
        if name not in fresh:
            continue
        win = Window(span, old.readings.get(name) if old else None, fresh[name])
        try:
            findings.extend(probe.diagnose(win))
        except Exception as exc:  # a probe bug must not take the report down
            log.exception("probe %s diagnose failed", name)
            errors[name] = f"{type(exc).__name__}: {exc}"
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], -f.impact, f.id))
    worst = max((SEVERITY_RANK[f.severity] for f in findings), default=0)
    status = {0: "ok", 1: "warning", 2: "critical"}[worst]
    probes = manager.statuses()
    for entry in probes:
        if entry["name"] in errors:
            entry["diagnose_error"] = errors[entry["name"]]
    return {
        "node": socket.gethostname(),
        "kernel": features.kernel_release,
        "generated_at": _dt.datetime.fromtimestamp(now_wall, _dt.timezone.utc).isoformat(timespec="seconds"),
        "window_seconds": round(span, 3),
        "window_requested_seconds": window_seconds,
        "status": status,
        "findings": [f.as_dict() for f in findings],
        "probes": probes,
    }


EXIT_CODES = {"ok": 0, "warning": 1, "critical": 2}
# Remediation lines starting with one of these are shown as shell commands ("$ ...").
SHELL_COMMANDS = frozenset({"sysctl", "nft", "iptables-save", "conntrack", "ss", "ip", "perf",
                            "ethtool", "tc", "kubectl", "echo", "cat", "helm", "nsenter"})


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _render_evidence(evidence: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    scalars = {k: v for k, v in evidence.items() if not isinstance(v, (dict, list))}
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        lines.append(f"{indent}{key.ljust(width)}  {_fmt_value(value)}")
    for key, value in evidence.items():
        if isinstance(value, dict):
            if value:
                inner = ", ".join(f"{k}={_fmt_value(v)}" for k, v in value.items())
                lines.append(f"{indent}{key}: {inner}")
        elif isinstance(value, list) and value:
            lines.append(f"{indent}{key}:")
            for row in value:
                if isinstance(row, dict):
                    lines.append(f"{indent}  - " + "  ".join(f"{k}={_fmt_value(v)}" for k, v in row.items()))
                else:
                    lines.append(f"{indent}  - {_fmt_value(row)}")
    return lines


def render_text(report: dict[str, Any], width: int = 100) -> str:
    findings = report["findings"]
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in ("critical", "warning", "info")}
    head = (f"dpwatch diagnose  node={report['node']}  kernel={report['kernel']}  "
            f"window={report['window_seconds']:.0f}s  at {report['generated_at']}")
    out = [head, "=" * min(len(head), width)]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
    out.append(f"STATUS: {report['status'].upper()}  ({summary})")
    if report["window_seconds"] + 1 < report.get("window_requested_seconds", 0):
        out.append(f"note: the daemon has data for {report['window_seconds']:.0f}s only, "
                   f"less than the {report['window_requested_seconds']:.0f}s asked for")
    out.append("")
    for i, f in enumerate(findings, 1):
        out.append(f"{i}. [{f['severity'].upper()}] {f['title']}  ({f['id']})")
        for line in textwrap.wrap(f["summary"], width=width - 3):
            out.append("   " + line)
        if f["evidence"]:
            out.append("   evidence:")
            out.extend(_render_evidence(f["evidence"], "     "))
        if f["remediation"]:
            out.append("   fix:")
            for step in f["remediation"]:
                shell = step.split(" ", 1)[0] in SHELL_COMMANDS
                out.append(f"     $ {step}" if shell else f"     - {step}")
        out.append("")
    if not findings:
        out.append("Nothing abnormal seen in this window.")
        out.append("")
    out.append("probes:")
    for p in report["probes"]:
        mode = f" ({p['mode']})" if p.get("mode") else ""
        reason = "" if p["state"] == "attached" else f": {p['reason']}"
        out.append(f"  {p['name']:<12} {p['state']}{mode}{reason}")
        if p.get("diagnose_error"):
            out.append(f"  {'':<12} diagnose failed: {p['diagnose_error']}")
    return "\n".join(out) + "\n"
