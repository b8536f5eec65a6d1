"""Unit tests for the `dpwatch` command line: argument and environment errors only.

Each case returns before anything is loaded. As a guard, the command functions are replaced
by stubs that fail the test, so a regression that lets a bad argument through cannot start
loading BPF from the unit tier.
"""

from __future__ import annotations

import os

import pytest

from dpwatch.daemon import cli


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DPWATCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "100")

    def _must_not_run(cfg):
        raise AssertionError("the unit tier must not reach a command (it would load probes)")

    for fn in ("cmd_run", "cmd_check", "cmd_diagnose"):
        monkeypatch.setattr(cli, fn, _must_not_run)


def test_bad_listen(capsys):
    assert cli.main(["run", "--listen", "nonsense"]) == cli.EX_USAGE == 64
    err = capsys.readouterr().err
    assert "--listen" in err
    assert "'nonsense'" in err
    assert err.startswith("dpwatch: error: ")


def test_bad_listen_port(capsys):
    assert cli.main(["run", "--listen", "1.2.3.4:99999"]) == 64
    assert "--listen: port 99999 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "check", "diagnose"])
def test_unknown_probe(capsys, command):
    assert cli.main([command, "--probes", "bogus"]) == 64
    err = capsys.readouterr().err
    assert "--probes: unknown probe(s) bogus; known: drops" in err


def test_unknown_disabled_probe(capsys):
    assert cli.main(["check", "--disable", "drops,nope"]) == 64
    assert "--disable: unknown probe(s) nope" in capsys.readouterr().err


def test_require_disabled_probe(capsys):
    assert cli.main(["check", "--disable", "drops", "--require", "drops"]) == 64
    assert "--require: probe(s) drops are required but not enabled" in capsys.readouterr().err


def test_bad_diagnose_window(capsys):
    assert cli.main(["diagnose", "--window", "abc"]) == 64
    err = capsys.readouterr().err
    assert "--window: 'abc' is not a duration" in err


@pytest.mark.parametrize("argv, flag", [
    (["run", "--window", "0.5s"], "--window"),
    (["run", "--snapshot-interval", "10ms"], "--snapshot-interval"),
    (["run", "--max-window", "30d"], "--max-window"),
    (["run", "--max-window", "forever"], "--max-window"),
    (["diagnose", "--drops-rate-warning", "10", "--drops-rate-critical", "5"], "--drops-rate-warning"),
    (["check", "--log-level", "chatty"], "--log-level"),
])
def test_bad_values(capsys, argv, flag):
    assert cli.main(argv) == 64
    assert f"dpwatch: error: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--bogus"],
    ["run", "--bogus"],
    ["check", "--listen", "1.2.3.4:1"],       # --listen belongs to `run` only
    ["diagnose", "--format", "yaml"],
    ["frobnicate"],
    ["run", "--drops-rate-warning", "lots"],
])
def test_argparse_errors(capsys, argv):
    assert cli.main(argv) == 64
    err = capsys.readouterr().err
    assert "usage: dpwatch" in err
    assert "error:" in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 64
    out = capsys.readouterr().out
    assert out.startswith("usage: dpwatch")
    assert "commands:" in out


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("run", "check", "diagnose", "DPWATCH_", "exit codes"):
        assert word in out
    assert "  run        start the daemon" in out
    assert "  check      preflight" in out
    assert "  diagnose   one-shot" in out
    assert "probes: drops" in out


@pytest.mark.parametrize("command, flag", [("run", "--listen"), ("check", "--require"),
                                           ("diagnose", "--format")])
def test_subcommand_help(capsys, command, flag):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dpwatch {command}")
    assert flag in out
    assert "DPWATCH_" in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "dpwatch 0.1.0"


def test_bad_number_in_environment(capsys, monkeypatch):
    monkeypatch.setenv("DPWATCH_DROPS_RATE_WARNING", "abc")
    assert cli.main(["check"]) == 64
    err = capsys.readouterr().err
    assert "bad DPWATCH_* environment value" in err
    assert "'abc'" in err


def test_bad_int_in_environment(capsys, monkeypatch):
    monkeypatch.setenv("DPWATCH_DROPS_LOCATION_ENTRIES", "1.5")
    assert cli.main(["check"]) == 64
    assert "bad DPWATCH_* environment value" in capsys.readouterr().err


def test_bad_boolean_in_environment(capsys, monkeypatch):
    monkeypatch.setenv("DPWATCH_STRICT", "maybe")
    assert cli.main(["check"]) == 64
    assert "DPWATCH_STRICT: 'maybe' is not a boolean" in capsys.readouterr().err


def test_bad_listen_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("DPWATCH_LISTEN", "nonsense")
    assert cli.main(["run"]) == 64
    assert "--listen: 'nonsense'" in capsys.readouterr().err


def test_bad_probes_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("DPWATCH_PROBES", "drops,bogus")
    assert cli.main(["diagnose"]) == 64
    assert "--probes: unknown probe(s) bogus" in capsys.readouterr().err


def test_flag_wins_over_environment(capsys, monkeypatch):
    # The variable is bad but the flag replaces it, so the error is about the flag's value.
    monkeypatch.setenv("DPWATCH_WINDOW", "abc")
    assert cli.main(["diagnose", "--window", "xyz"]) == 64
    err = capsys.readouterr().err
    assert "'xyz'" in err
    assert "'abc'" not in err


@pytest.mark.parametrize("value, strict", [("1", True), ("true", True), ("YES", True), ("on", True),
                                           ("0", False), ("false", False), ("off", False), ("", False)])
def test_env_bool(monkeypatch, value, strict):
    monkeypatch.setenv("DPWATCH_STRICT", value)
    assert cli._env_bool("strict") is strict


def test_config_from_args_run(monkeypatch):
    args = cli.build_parser().parse_args(["run", "--listen", "127.0.0.1:0", "--window", "30s",
                                          "--snapshot-interval", "500ms", "--max-window", "10m",
                                          "--strict"])
    cfg = cli.config_from_args(args)
    assert cfg.listen == "127.0.0.1:0"
    assert cfg.default_window == 30.0
    assert cfg.snapshot_interval == 0.5
    assert cfg.max_window == 600.0
    assert cfg.strict is True
    assert cfg.max_window / cfg.snapshot_interval == 1200


def test_config_from_args_diagnose(monkeypatch):
    monkeypatch.setenv("DPWATCH_STRICT", "1")
    args = cli.build_parser().parse_args(["diagnose", "--window", "2m", "--format", "json"])
    cfg = cli.config_from_args(args)
    assert cfg.default_window == 120.0
    assert cfg.max_window == 120.0
    assert cfg.report_format == "json"
    assert cfg.strict is True
    # A window under a second is raised to one second.
    args = cli.build_parser().parse_args(["diagnose", "--window", "100ms"])
    assert cli.config_from_args(args).default_window == 1.0
