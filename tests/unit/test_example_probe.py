"""docs/architecture.md's walk-through, end to end: a probe added from its own folder
(tests/fixtures/example_probe: params.py, findings.py, probe.py) gets its flag and variable,
its Config field, a place in the manager, its metric on /metrics and its finding in the report,
with nothing central edited. It reads /proc/net/sockstat from a fixture tree (user space only,
no BPF), so the whole path runs in the unit tier."""

from __future__ import annotations

import os
import sys

from prometheus_client import generate_latest

from dpwatch.daemon.collector import make_registry
from dpwatch.daemon.config import ConfigError, config_class
from dpwatch.daemon.flags import build_parser, config_from_args
from dpwatch.daemon.host import paths
from dpwatch.daemon.manager import ProbeManager
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.daemon.triage import build_report
from dpwatch.probes.base import State
from dpwatch.probes.registry import PROBES

import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)
from example_probe.probe import ExampleProbe  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from fakes import FakeFeatures  # noqa: E402

ALL = PROBES + (ExampleProbe,)


def config(argv, monkeypatch):
    for k in [k for k in os.environ if k.startswith("DPWATCH_")]:
        monkeypatch.delenv(k)
    args = build_parser(ALL).parse_args(["run", "--probes", "example", *argv])
    return config_from_args(args, config_class(ALL)).validate()


def test_its_flag_variable_and_config_field_are_generated(monkeypatch):
    assert "--example-sockets-warning" in build_parser(ALL).format_help() + \
        build_parser(ALL)._subparsers._group_actions[0].choices["run"].format_help()
    assert config([], monkeypatch).example_sockets_warning == 1000
    assert config(["--example-sockets-warning", "50"], monkeypatch).example_sockets_warning == 50
    monkeypatch.setenv("DPWATCH_EXAMPLE_SOCKETS_WARNING", "70")
    args = build_parser(ALL).parse_args(["run", "--probes", "example"])
    assert config_from_args(args, config_class(ALL)).validate().example_sockets_warning == 70
    with pytest.raises(ConfigError, match="--example-sockets-warning: 0 is outside 1..10000000"):
        config(["--example-sockets-warning", "0"], monkeypatch)


def test_its_metric_and_finding_reach_metrics_and_the_report(monkeypatch):
    cfg = config(["--example-sockets-warning", "1000"], monkeypatch)
    features = FakeFeatures()
    with paths.roots(proc_root=os.path.join(FIXTURES, "example_probe_proc")):
        mgr = ProbeManager(cfg, features, probe_classes=(ExampleProbe,))
        mgr.plan()
        mgr.load()
        assert mgr.status["example"].state == State.ATTACHED, mgr.status["example"].reason
        text = generate_latest(make_registry(mgr, features)).decode()
        assert "dpwatch_example_sockets_used 1234.0" in text
        assert 'dpwatch_probe_collect_success{probe="example"} 1.0' in text
        ring = SnapshotRing(maxlen=8)
        ring.append(mgr.collect())
        report = build_report(mgr, ring, 60.0, features)
    (f,) = [f for f in report["findings"] if f["id"] == "example.sockets_high"]
    assert f["evidence"] == {"sockets_used": 1234, "warning": 1000}
    assert "raise --example-sockets-warning above 1234" in f["remediation"][0]
    mgr.close()
