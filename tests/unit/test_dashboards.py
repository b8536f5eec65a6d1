"""The Grafana dashboards (dashboards/*.json): schema, content, and metric names.

- Schema: each dashboard is written into a TypeScript file as a typed literal and checked with
  `tsc --strict --noEmit` against @grafana/schema (installed under dashboards/node_modules by
  deploy/setup.sh --test). The whole dashboard is checked as `Dashboard`, each panel as `Panel`,
  and each panel's options and custom field config as its plugin's own types (timeseries, stat,
  heatmap, table panelcfg). Enum-typed fields (e.g. ThresholdsMode) take their JSON string values.
  @grafana/schema has no Prometheus query type, so targets are checked against a small local
  interface built on its DataQuery: the fields Grafana's Prometheus datasource reads.
- Content: rows, variables, unit/thresholds/description on every panel, unique ids, layout.
- Metric names against a real daemon's /metrics, and every query in a real Prometheus: in
  tests/e2e/test_prometheus_e2e.py (it needs root and BCC for the daemon).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DASH = REPO / "dashboards"
sys.path.insert(0, str(DASH))
sys.path.insert(0, str(REPO / "tests"))

import generate  # noqa: E402  dashboards/generate.py
from promql import metric_names, substitute  # noqa: E402  tests/promql.py

FILES = sorted(DASH.glob("dpwatch-*.json"))
SCHEMA_DIR = DASH / "node_modules" / "@grafana" / "schema"
TSC = DASH / "node_modules" / "typescript" / "bin" / "tsc"
PANELCFG = "@grafana/schema/dist/esm/raw/composable/{0}/panelcfg/x/{1}PanelCfg_types.gen"
PLUGIN_TYPES = {"timeseries": "TimeSeries", "stat": "Stat", "heatmap": "Heatmap", "table": "Table"}
CUSTOM_TYPES = {"timeseries": "TimeSeries.FieldConfig", "heatmap": "Heatmap.FieldConfig",
                "table": "Table.FieldConfig"}


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


# -- schema (tsc) -----------------------------------------------------------------------------
TS_HEADER = """\
import type { Dashboard, Panel, DataQuery, DataSourceRef } from '@grafana/schema';
""" + "".join(f"import type * as {ts} from '{PANELCFG.format(kind, ts)}';\n" for kind, ts in PLUGIN_TYPES.items()) + """
// JSON spelling of a schema type: string enums take their string values, numeric enums their
// numbers; everything else is the type itself, checked field by field (excess fields are errors).
type Json<T> =
  T extends string ? `${T}` :
  T extends number | boolean | null | undefined ? T :
  T extends ReadonlyArray<infer U> ? Array<Json<U>> :
  T extends object ? { [K in keyof T]: Json<T[K]> } :
  T;

// @grafana/schema has no Prometheus query type: the fields Grafana's Prometheus datasource reads.
interface PrometheusQuery extends DataQuery {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
}
"""


def typescript_for(dash: dict) -> str:
    lines = [TS_HEADER, f"export const dashboard: Json<Dashboard> = {json.dumps(dash, indent=1)};\n"]
    for p in panels(dash):
        if p["type"] == "row":
            continue
        kind, pid = p["type"], p["id"]
        assert kind in PLUGIN_TYPES, f"panel {pid}: no schema type wired up for panel type {kind!r}"
        lines.append(f"export const panel{pid}: Json<Panel> = {json.dumps(p)};")
        lines.append(f"export const options{pid}: Json<{PLUGIN_TYPES[kind]}.Options> = {json.dumps(p['options'])};")
        lines.append(f"export const targets{pid}: Json<PrometheusQuery>[] = {json.dumps(p['targets'])};")
        custom = p["fieldConfig"]["defaults"].get("custom")
        if custom is not None:
            assert kind in CUSTOM_TYPES, f"panel {pid}: custom field config, but no type for {kind!r}"
            lines.append(f"export const custom{pid}: Json<{CUSTOM_TYPES[kind]}> = {json.dumps(custom)};")
    return "\n".join(lines) + "\n"


def run_tsc(sources: dict[str, str]) -> subprocess.CompletedProcess:
    """tsc --strict --noEmit over the given files, in a scratch folder under dashboards/ (so that
    dashboards/node_modules resolves). The folder is removed afterwards."""
    node = shutil.which("node")
    assert node, "node is missing: run deploy/setup.sh --test (it installs nodejs and npm)"
    assert TSC.exists() and SCHEMA_DIR.exists(), \
        "dashboards/node_modules is missing: run deploy/setup.sh --test (npm ci in dashboards/)"
    work = DASH / f".tscheck-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        for name, text in sources.items():
            (work / name).write_text(text)
        (work / "tsconfig.json").write_text(json.dumps({
            "compilerOptions": {"strict": True, "noEmit": True, "module": "esnext",
                                "moduleResolution": "bundler", "target": "es2022", "skipLibCheck": True,
                                "types": []},
            "files": sorted(sources)}))
        return subprocess.run([node, str(TSC), "-p", str(work / "tsconfig.json")],
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_dashboards_typecheck_against_grafana_schema():
    assert FILES, "no dashboards"
    res = run_tsc({f"{f.stem.replace('-', '_')}.ts": typescript_for(load(f)) for f in FILES})
    assert res.returncode == 0, res.stdout + res.stderr


def test_schema_check_rejects_what_grafana_would_not_read():
    """The check bites: a misspelt field, an unknown enum value, a wrong type and a missing
    required option each make tsc fail, naming the field or the type."""
    base = load(DASH / "dpwatch-node.json")
    ts_panel = next(p for p in base["panels"] if p["type"] == "timeseries")
    bad = {
        "unti": lambda d: ts_panel["fieldConfig"]["defaults"].update(unti="s"),
        '"absolutely"': lambda d: ts_panel["fieldConfig"]["defaults"]["thresholds"].update(mode="absolutely"),
        "Type 'string' is not assignable to type 'number'": lambda d: d.update(schemaVersion="39"),
        "tooltip": lambda d: ts_panel["options"].pop("tooltip"),
        '"lines"': lambda d: ts_panel["fieldConfig"]["defaults"]["custom"].update(drawStyle="lines"),
    }
    sources = {}
    for i, mutate in enumerate(bad.values()):
        dash = json.loads(json.dumps(base))
        ts_panel = next(p for p in dash["panels"] if p["type"] == "timeseries")
        mutate(dash)
        sources[f"bad{i}.ts"] = typescript_for(dash)
    res = run_tsc(sources)  # one tsc run; each file must have its own error
    assert res.returncode != 0
    for i, needle in enumerate(bad):
        errors = [ln for ln in res.stdout.splitlines() if f"bad{i}.ts(" in ln]
        assert errors and any(needle in e for e in errors), (needle, errors or res.stdout[-2000:])


# -- the generator and the committed JSON ---------------------------------------------------
def test_committed_json_is_what_the_generator_writes():
    res = subprocess.run([sys.executable, str(DASH / "generate.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert {f.name for f in FILES} == set(generate.DASHBOARDS)


# -- content --------------------------------------------------------------------------------
def test_node_dashboard_rows_and_variables():
    dash = load(DASH / "dpwatch-node.json")
    assert dash["title"] == "dpwatch / Node datapath"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Probe health", "Drops by reason", "Conntrack", "Fragmentation and MTU",
                    "Softirq and softnet", "DNS"]
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert names["instance"]["type"] == "query" and names["job"]["type"] == "query"
    # The softirq row has the per-CPU heatmap, squeeze and steal; the DNS row rate, latency
    # heatmap, rcodes and timeouts.
    by_row, row = {}, None
    for p in dash["panels"]:
        if p["type"] == "row":
            row = p["title"]
            continue
        by_row.setdefault(row, []).append(p)
    soft = by_row["Softirq and softnet"]
    assert any(p["type"] == "heatmap" and "by (cpu)" in p["targets"][0]["expr"] for p in soft)
    assert any("time_squeeze" in t["expr"] for p in soft for t in p["targets"])
    assert any("cpu_steal" in t["expr"] for p in soft for t in p["targets"])
    dns = by_row["DNS"]
    assert any(p["type"] == "heatmap" and "dns_request_duration_seconds_bucket" in p["targets"][0]["expr"]
               and p["targets"][0]["format"] == "heatmap" for p in dns)
    for needle in ("dpwatch_dns_queries_total", "dpwatch_dns_responses_total", "dpwatch_dns_timeouts_total"):
        assert any(needle in t["expr"] for p in dns for t in p["targets"]), needle
    conn = by_row["Conntrack"]
    assert any(p["fieldConfig"]["defaults"]["unit"] == "percentunit" and "max_entries" in p["targets"][0]["expr"]
               for p in conn)


def test_cluster_dashboard_is_across_nodes():
    dash = load(DASH / "dpwatch-cluster.json")
    assert dash["title"] == "dpwatch / Cluster overview"
    inst = next(v for v in dash["templating"]["list"] if v["name"] == "instance")
    assert inst["multi"] and inst["includeAll"]
    per_node = [e for e in queries(dash) if "by (instance" in e]
    assert len(per_node) >= 8


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_panel_has_unit_thresholds_description(path):
    dash = load(path)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        if p["type"] == "row":
            continue
        d = p["fieldConfig"]["defaults"]
        assert d.get("unit"), p["title"]
        assert len(p.get("description", "")) >= 30, p["title"]
        steps = d["thresholds"]["steps"]
        assert steps[0]["value"] is None and len(steps) >= 2, p["title"]
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_node_scoped_queries_use_the_variables(path):
    dash = load(path)
    need = ['job=~"$job"'] + (['instance=~"$instance"'] if dash["uid"] == "dpwatch-node" else [])
    for expr in queries(dash):
        for name in metric_names(expr):
            # every selector of a dpwatch/process series carries the variables
            for sel in re.findall(re.escape(name) + r"\{([^}]*)\}", expr):
                for n in need:
                    assert n in sel, (expr, n)
        sub = substitute(expr, job="dpwatch", instance="127.0.0.1:9400")
        assert "$" not in sub, sub


# That every metric a dashboard uses exists in a real daemon's /metrics is checked in
# tests/e2e/test_prometheus_e2e.py, which runs the daemon (root and BCC).
