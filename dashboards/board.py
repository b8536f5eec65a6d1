"""The panel builder behind dashboards/generate.py: a Board lays out rows and panels on
Grafana's 24-column grid; levels(), target() and rate() build thresholds and queries."""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
NODE = 'job=~"$job", instance=~"$instance"'  # the node dashboard's selector
CLUSTER = 'job=~"$job"'
NET_VECTORS = 'vector=~"(?i)net_rx|net_tx"'
RCODE_ERRORS = 'rcode=~"(?i)servfail|refused"'

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


def levels(*steps: tuple[str, float], base: str = GREEN) -> dict:
    """Absolute thresholds: the base colour, then (colour, from value) steps."""
    return {"mode": "absolute",
            "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for c, v in steps]}


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    return {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend,
            "range": not instant, "instant": instant, "format": fmt}


class Board:
    """Lays panels out on Grafana's 24-column grid, row by row."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.next_id = 1
        self.x = self.y = self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self._newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def add(self, kind: str, title: str, description: str, unit: str, thresholds: dict,
            targets: list[dict], options: dict, custom: dict | None = None, w: int = 8, h: int = 8,
            extra_defaults: dict | None = None, transformations: list | None = None) -> None:
        defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds,
                                    "color": {"mode": "thresholds" if kind in ("stat", "table") else "palette-classic"}}
        if custom is not None:
            defaults["custom"] = custom
        defaults.update(extra_defaults or {})
        refs = "ABCDEFGH"
        panel = {"type": kind, "title": title, "description": description, "id": self._id(),
                 "datasource": DS, "gridPos": self._place(w, h),
                 "targets": [dict(t, refId=refs[i]) for i, t in enumerate(targets)],
                 "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options}
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)

    # -- panel kinds ------------------------------------------------------------------------
    def timeseries(self, title: str, description: str, unit: str, thresholds: dict, *targets: dict,
                   stack: bool = False, w: int = 8, h: int = 8) -> None:
        custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 25 if stack else 10,
                  "showPoints": "never", "spanNulls": False,
                  "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                  "thresholdsStyle": {"mode": "line" if len(thresholds["steps"]) > 1 else "off"},
                  "axisPlacement": "auto", "axisSoftMin": 0}
        options = {"legend": {"showLegend": True, "displayMode": "table", "placement": "right",
                              "calcs": ["mean", "max", "lastNotNull"]},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
        self.add("timeseries", title, description, unit, thresholds, list(targets), options, custom, w, h)

    def stat(self, title: str, description: str, unit: str, thresholds: dict, *targets: dict,
             w: int = 4, h: int = 5, mappings: list | None = None, calc: str = "lastNotNull") -> None:
        options = {"reduceOptions": {"calcs": [calc], "fields": "", "values": False},
                   "orientation": "auto", "colorMode": "background", "graphMode": "area",
                   "justifyMode": "auto", "textMode": "auto", "wideLayout": True,
                   "showPercentChange": False, "percentChangeColorMode": "standard"}
        extra = {"mappings": mappings} if mappings else None
        self.add("stat", title, description, unit, thresholds, list(targets), options, None, w, h, extra)

    def heatmap(self, title: str, description: str, unit: str, thresholds: dict, *targets: dict,
                w: int = 12, h: int = 9, scheme: str = "Oranges") -> None:
        options = {"calculate": False, "cellGap": 1,
                   "color": {"mode": "scheme", "scheme": scheme, "scale": "exponential", "exponent": 0.5,
                             "fill": "dark-orange", "reverse": False, "steps": 64},
                   "exemplars": {"color": "rgba(255,0,255,0.7)"},
                   "legend": {"show": True},
                   "rowsFrame": {"layout": "auto"},
                   "showValue": "never",
                   "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
                   "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
                   "cellValues": {"unit": unit}}
        custom = {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                  "scaleDistribution": {"type": "linear"}}
        self.add("heatmap", title, description, unit, thresholds, list(targets), options, custom, w, h)

    def table(self, title: str, description: str, unit: str, thresholds: dict, *targets: dict,
              w: int = 12, h: int = 8, transformations: list | None = None) -> None:
        options = {"showHeader": True, "frameIndex": 0, "cellHeight": "sm",
                   "sortBy": [{"displayName": "Value", "desc": True}]}
        custom = {"align": "auto", "cellOptions": {"type": "color-text"}, "filterable": False,
                  "inspect": False}
        self.add("table", title, description, unit, thresholds, list(targets), options, custom, w, h,
                 transformations=transformations)


UP_DOWN = [{"type": "value", "options": {"0": {"text": "down", "color": RED, "index": 0},
                                         "1": {"text": "up", "color": GREEN, "index": 1}}}]


def variables(instance_multi: bool) -> list[dict]:
    ds = {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
          "refresh": 1, "regex": "", "hide": 0, "options": []}
    job = {"type": "query", "name": "job", "label": "Job", "datasource": DS,
           "query": {"query": "label_values(dpwatch_build_info, job)", "refId": "job"},
           "refresh": 2, "sort": 1,
           "multi": False, "includeAll": False, "hide": 0, "options": [],
           "description": "The Prometheus job that scrapes dpwatch (deploy/servicemonitor.yaml sets it to dpwatch)."}
    q = 'label_values(dpwatch_build_info{job=~"$job"}, instance)'
    inst = {"type": "query", "name": "instance", "label": "Node", "datasource": DS,
            "query": {"query": q, "refId": "instance"}, "refresh": 2, "sort": 1,
            "multi": instance_multi, "includeAll": instance_multi, "hide": 0, "options": [],
            "description": "The node (the instance label: the node name with deploy/servicemonitor.yaml "
                           "or deploy/podmonitor.yaml, host:port otherwise)."}
    if instance_multi:
        inst["allValue"] = ".*"
    return [ds, job, inst]


def dashboard(uid: str, title: str, description: str, board: Board, instance_multi: bool,
              links: list[dict]) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["dpwatch", "network", "ebpf"],
        "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m"]},
        "templating": {"list": variables(instance_multi)},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": links,
        "panels": board.panels,
    }


def link(title: str, uid_tag: str) -> dict:
    return {"title": title, "type": "dashboards", "tags": [uid_tag], "asDropdown": False, "icon": "dashboard",
            "includeVars": True, "keepTime": True, "targetBlank": False, "tooltip": "", "url": ""}


def rate(metric: str, sel: str = NODE, extra: str = "") -> str:
    inner = f"{sel}, {extra}" if extra else sel
    return f"rate({metric}{{{inner}}}[$__rate_interval])"


# ------------------------------------------------------------------------------------------
