"""The triage report as plain text (GET /diagnose?format=text, `dpwatch diagnose`).

The text and HTML renderings (html.py) share the value formatting here (fmt_value, inline) and
SHELL_COMMANDS; both render the report dict build_report() makes, never the findings themselves.
"""

from __future__ import annotations

import textwrap
from typing import Any

# Remediation lines starting with one of these are shown as shell commands ("$ ...").
SHELL_COMMANDS = frozenset({"sysctl", "nft", "iptables-save", "conntrack", "ss", "ip", "perf", "nstat",
                            "ethtool", "tc", "kubectl", "echo", "cat", "helm", "nsenter", "modprobe"})
LIST_ROWS = 8  # rows of an evidence list shown in text (JSON has them all)


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def inline(value: dict) -> str:
    return ", ".join(f"{k}={fmt_value(v) if not isinstance(v, dict) else '{' + inline(v) + '}'}"
                     for k, v in value.items())


def _render_evidence(evidence: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    scalars = {k: v for k, v in evidence.items() if not isinstance(v, (dict, list))}
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        lines.append(f"{indent}{key.ljust(width)}  {fmt_value(value)}")
    for key, value in evidence.items():
        if key == "related":
            continue
        if isinstance(value, dict):
            if value:
                lines.append(f"{indent}{key}: {inline(value)}")
        elif isinstance(value, list) and value:
            lines.append(f"{indent}{key}:")
            for row in value[:LIST_ROWS]:
                if isinstance(row, dict):
                    lines.append(f"{indent}  - " + "  ".join(
                        f"{k}={inline(v) if isinstance(v, dict) else fmt_value(v)}" for k, v in row.items()))
                else:
                    lines.append(f"{indent}  - {fmt_value(row)}")
            if len(value) > LIST_ROWS:
                lines.append(f"{indent}  ... {len(value) - LIST_ROWS} more (see ?format=json)")
    return lines


def _render_finding(out: list[str], i: int, f: dict[str, Any], width: int) -> None:
    out.append(f"{i}. [{f['severity'].upper()}] {f['title']}  ({f['id']})")
    for line in textwrap.wrap(f["summary"], width=width - 3):
        out.append("   " + line)
    evidence = f["evidence"]
    if evidence:
        out.append("   evidence:")
        out.extend(_render_evidence(evidence, "     "))
    related = evidence.get("related") if isinstance(evidence, dict) else None
    if related:
        out.append("   also explains (folded in, not reported again):")
        for rid, entry in related.items():
            facts = {k: v for k, v in entry.items() if k not in ("title", "severity")}
            title = entry.get("title")
            out.append(f"     - {rid}" + (f": {title}" if title else "") +
                       (f"  ({inline(facts)})" if facts else ""))
    if f["remediation"]:
        out.append("   fix:")
        for step in f["remediation"]:
            shell = step.split(" ", 1)[0] in SHELL_COMMANDS
            out.append(f"     $ {step}" if shell else f"     - {step}")
    out.append("")


def render_text(report: dict[str, Any], width: int = 100) -> str:
    findings = report["findings"]
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in ("critical", "warning", "info")}
    head = (f"dpwatch diagnose  node={report['node']}  kernel={report['kernel']}  "
            f"window={report['window_seconds']:.0f}s  at {report['generated_at']}")
    out = [head, "=" * min(len(head), width)]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
    if report["status"] == "ok" and findings:
        summary = f"all clear: nothing above info; {summary}"
    out.append(f"STATUS: {report['status'].upper()}  ({summary})")
    if report["window_seconds"] + 1 < report.get("window_requested_seconds", 0):
        out.append(f"note: the daemon has data for {report['window_seconds']:.0f}s only, "
                   f"less than the {report['window_requested_seconds']:.0f}s asked for")
    out.append("")
    problems = [f for f in findings if f["severity"] != "info"]
    if not problems:
        out.append("Nothing abnormal seen in this window.")
        out.append("")
        if findings:
            out.append("Notes on the node's settings (info):")
            out.append("")
    for i, f in enumerate(findings, 1):
        _render_finding(out, i, f, width)
    out.append("probes:")
    for p in report["probes"]:
        mode = f" ({p['mode']})" if p.get("mode") else ""
        reason = "" if p["state"] == "attached" else f": {p['reason']}"
        out.append(f"  {p['name']:<12} {p['state']}{mode}{reason}")
        if p.get("diagnose_error"):
            out.append(f"  {'':<12} diagnose failed: {p['diagnose_error']}")
        if p.get("undeclared_finding_ids"):
            out.append(f"  {'':<12} undeclared finding ids: {', '.join(p['undeclared_finding_ids'])}")
    return "\n".join(out) + "\n"
