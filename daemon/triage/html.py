"""The triage report as one self-contained HTML page (GET /diagnose with Accept: text/html or
?format=html): inline CSS, inline SVG charts of the window's rates, no script, no external
asset of any kind, so it renders the same from a laptop on the node's network or saved to a
file and mailed around."""

from __future__ import annotations

from html import escape
from typing import Any

from dpwatch.daemon.triage.text import SHELL_COMMANDS, fmt_value, inline

COLORS = {"critical": "#b42318", "warning": "#b54708", "info": "#175cd3", "ok": "#067647"}
CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;
 color:#101828;background:#f9fafb}
header{padding:16px 24px;background:#fff;border-bottom:1px solid #eaecf0}
h1{font-size:20px;margin:0 0 4px}
.meta{color:#475467;font-size:13px}
.status{display:inline-block;padding:4px 12px;border-radius:14px;color:#fff;font-weight:700;
 letter-spacing:.04em;margin-right:10px}
.banner{margin:16px 24px;padding:12px 16px;border-radius:8px;background:#fff;border:1px solid #eaecf0;
 font-size:16px}
main{padding:0 24px 24px}
h2{font-size:16px;margin:20px 0 8px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #eaecf0;border-radius:8px;padding:8px 10px;width:292px}
.chart .t{font-size:12px;color:#344054;font-weight:600}
.chart .v{font-size:12px;color:#475467}
.finding{background:#fff;border:1px solid #eaecf0;border-left:6px solid;border-radius:8px;
 padding:12px 16px;margin:0 0 12px}
.finding h3{margin:0 0 6px;font-size:16px}
.sev{font-size:12px;font-weight:700;color:#fff;padding:2px 8px;border-radius:10px;margin-right:8px;
 vertical-align:2px}
.fid{font-family:ui-monospace,"DejaVu Sans Mono",monospace;color:#475467;font-size:12px;margin-left:6px}
table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 10px 2px 0;vertical-align:top;text-align:left}
td.k{color:#475467;white-space:nowrap;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
pre{background:#101828;color:#f2f4f7;padding:8px 10px;border-radius:6px;overflow-x:auto;
 margin:6px 0;font-size:12.5px;white-space:pre-wrap}
.related{color:#344054;font-size:13px}
.probes td{padding-right:16px}
footer{color:#667085;font-size:12px;padding:0 24px 24px}
"""


def sparkline(values: list[float], width: int = 270, height: int = 54) -> str:
    """An inline SVG line chart of ``values`` (left to right, oldest first)."""
    if not values:
        return (f'<svg width="{width}" height="{height}" role="img" aria-label="no data">'
                f'<text x="4" y="{height // 2}" font-size="11" fill="#98a2b3">no data yet</text></svg>')
    top = max(max(values), 1e-9)
    n = len(values)
    xs = [(i * (width - 4) / max(n - 1, 1)) + 2 for i in range(n)]
    ys = [height - 3 - (v / top) * (height - 8) for v in values]
    if n == 1:
        xs, ys = [2, width - 2], ys * 2
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    area = f"2,{height - 2} {pts} {xs[-1]:.1f},{height - 2}"
    color = "#b42318" if any(values) else "#98a2b3"
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="rate over the window">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f9fafb"/>'
            f'<polygon points="{area}" fill="{color}" fill-opacity="0.12"/>'
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/></svg>')


def _chart(s: dict[str, Any]) -> str:
    values = s.get("v", [])
    peak = max(values, default=0.0)
    last = values[-1] if values else 0.0
    span = f"{-s['t'][0]:.0f}s" if s.get("t") else ""
    return (f'<div class="chart" data-series="{escape(s["id"])}"><div class="t">{escape(s["title"])} '
            f'{escape(s.get("unit", ""))}</div>{sparkline(values)}'
            f'<div class="v">now {fmt_value(round(last, 3))} · peak {fmt_value(round(peak, 3))}'
            f'{" · last " + span if span else ""}</div></div>')


def _value_html(v: Any) -> str:
    if isinstance(v, dict):
        return escape(inline(v))
    if isinstance(v, list):
        rows = []
        for row in v[:20]:
            rows.append("<li>" + (escape("  ".join(f"{k}={inline(x) if isinstance(x, dict) else fmt_value(x)}"
                                                  for k, x in row.items()))
                                  if isinstance(row, dict) else escape(fmt_value(row))) + "</li>")
        more = f"<li>… {len(v) - 20} more</li>" if len(v) > 20 else ""
        return f'<ul style="margin:0;padding-left:18px">{"".join(rows)}{more}</ul>'
    return escape(fmt_value(v))


def _finding(i: int, f: dict[str, Any]) -> str:
    color = COLORS.get(f["severity"], "#475467")
    ev = {k: v for k, v in f["evidence"].items() if k != "related" and v not in ({}, [], None)}
    rows = "".join(f'<tr><td class="k">{escape(k)}</td><td>{_value_html(v)}</td></tr>' for k, v in ev.items())
    related = f["evidence"].get("related") or {}
    rel = ""
    if related:
        items = "".join(
            f'<li><b>{escape(rid)}</b>{": " + escape(str(e.get("title"))) if e.get("title") else ""} '
            f'<span class="fid">{escape(inline({k: v for k, v in e.items() if k not in ("title", "severity")}))}'
            f'</span></li>' for rid, e in related.items())
        rel = (f'<div class="related">Also explains (folded in, not reported again):'
               f'<ul>{items}</ul></div>')
    fix = ""
    if f["remediation"]:
        lines = [("$ " if step.split(" ", 1)[0] in SHELL_COMMANDS else "# ") + step for step in f["remediation"]]
        fix = "<div><b>Fix</b><pre>" + escape("\n".join(lines)) + "</pre></div>"
    return (f'<section class="finding" id="{escape(f["id"].replace(".", "-"))}" style="border-left-color:{color}">'
            f'<h3>{i}. <span class="sev" style="background:{color}">{escape(f["severity"].upper())}</span>'
            f'{escape(f["title"])}<span class="fid">{escape(f["id"])}</span></h3>'
            f'<p>{escape(f["summary"])}</p>'
            f'{"<table>" + rows + "</table>" if rows else ""}{rel}{fix}</section>')


def render_html(report: dict[str, Any]) -> str:
    findings = report["findings"]
    status = report["status"]
    problems = [f for f in findings if f["severity"] != "info"]
    if problems:
        top = problems[0]
        banner = (f"<b>Likeliest cause:</b> {escape(top['title'])} "
                  f"<span class=\"fid\">{escape(top['id'])}</span> "
                  f"({len(problems)} problem{'s' if len(problems) != 1 else ''} in this window)")
    else:
        banner = "<b>All clear:</b> nothing above info in this window."
    charts = "".join(_chart(s) for s in sorted(report.get("series", []),
                                                key=lambda s: -max(s.get("v") or [0])))
    body = "".join(_finding(i, f) for i, f in enumerate(findings, 1))
    probes = "".join(
        f"<tr><td><b>{escape(p['name'])}</b></td><td>{escape(p['state'])}</td>"
        f"<td>{escape(p.get('mode') or '-')}</td>"
        f"<td>{escape('' if p['state'] == 'attached' else p.get('reason', ''))}"
        f"{escape(' diagnose failed: ' + p['diagnose_error']) if p.get('diagnose_error') else ''}</td></tr>"
        for p in report.get("probes", []))
    note = ""
    if report["window_seconds"] + 1 < report.get("window_requested_seconds", 0):
        note = (f" · data for {report['window_seconds']:.0f}s only "
                f"(asked for {report['window_requested_seconds']:.0f}s)")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>dpwatch {escape(status.upper())} · {escape(report['node'])}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1><span class=\"status\" style=\"background:{COLORS.get(status, '#475467')}\">"
        f"{escape(status.upper())}</span>dpwatch diagnose · {escape(report['node'])}</h1>"
        f"<div class=\"meta\">kernel {escape(report['kernel'])} · window {report['window_seconds']:.0f}s"
        f"{escape(note)} · {escape(report['generated_at'])}</div></header>"
        f"<div class=\"banner\" id=\"verdict\">{banner}</div><main>"
        + (f"<h2>Rates over the window</h2><div class=\"charts\">{charts}</div>" if charts else "")
        + (f"<h2>Findings, likeliest cause first</h2>{body}" if findings else "")
        + f"<h2>Probes</h2><table class=\"probes\">{probes}</table></main>"
        "<footer>JSON: ?format=json · text: ?format=text · every finding id is documented in "
        "docs/findings.md</footer></body></html>\n")
