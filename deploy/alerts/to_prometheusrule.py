"""Write deploy/prometheusrule.yaml from deploy/alerts/dpwatch.rules.yml (the source of truth).

The rule groups are copied as text (comments kept), indented under the PrometheusRule's spec.
tests/unit/test_deploy.py checks that the two files carry the same groups. Run:
    .venv/bin/python deploy/alerts/to_prometheusrule.py
"""

from __future__ import annotations

import pathlib

HERE = pathlib.Path(__file__).resolve().parent
RULES = HERE / "dpwatch.rules.yml"
OUT = HERE.parent / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/alerts/dpwatch.rules.yml by deploy/alerts/to_prometheusrule.py: edit that file.
# The dpwatch alerts for the Prometheus Operator. The label `release` is not set: add the label your
# Prometheus's ruleSelector wants (kube-prometheus-stack: release: <its release name>).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: dpwatch
  namespace: dpwatch
  labels:
    app.kubernetes.io/name: dpwatch
    app.kubernetes.io/component: alerts
spec:
"""


def render(rules_text: str) -> str:
    lines = rules_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("groups:"))
    return HEADER + "".join(f"  {ln}\n" if ln else "\n" for ln in lines[start:])


def main() -> None:
    OUT.write_text(render(RULES.read_text()))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
