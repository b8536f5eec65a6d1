"""PromQL helpers for the dashboard and alert tests: metric names in an expression, Grafana
variables substituted, and the metric families a real /metrics page exports.

metric_names() is a small lexer, not a PromQL parser: it drops strings, label matchers, ranges
and grouping clauses, then keeps the identifiers that are not functions or keywords. The e2e test
runs every expression through a real Prometheus too, which parses them for real.
"""

from __future__ import annotations

import re

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")

# Grafana's built-in interval variables, as the query tests substitute them.
GRAFANA_DEFAULTS = {"__rate_interval": "5s", "__interval": "2s", "__range": "5m"}


def metric_names(expr: str) -> set[str]:
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for m in _IDENT.finditer(text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def substitute(expr: str, **values: str) -> str:
    """Replace $name and ${name} with values (Grafana's interval variables have defaults)."""
    table = {**GRAFANA_DEFAULTS, **values}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in table:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return table[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


class MetricFamilies:
    """What a Prometheus text-format page exports: family names from # TYPE lines and every
    sample name. A histogram's _bucket/_sum/_count match its family by base name, so a family
    that has no samples yet (no labelled child) still counts."""

    SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}

    def __init__(self, text: str):
        self.types: dict[str, str] = {}
        self.samples: set[str] = set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(None, 3)
                self.types[name] = kind.strip()
            elif line and not line.startswith("#"):
                self.samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])

    def has(self, name: str) -> bool:
        if name in self.samples or name in self.types:
            return True
        for kind, suffixes in self.SUFFIXES.items():
            for s in suffixes:
                if name.endswith(s) and self.types.get(name[: -len(s)]) == kind:
                    return True
        return False
