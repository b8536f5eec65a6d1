"""Unit tests for dpwatch.daemon.config: durations, listen addresses, validation, ring size."""

from __future__ import annotations

import pytest

from dpwatch.daemon.config import Config, ConfigError, parse_duration, parse_listen, parse_probe_list
from dpwatch.probes.registry import probe_names

# The registry, in load order (providers first: conntrack reads the drops probe's counts).
ALL_PROBES = ["drops", "conntrack", "frag", "mtu", "dns", "softirq", "node"]


# -- parse_duration --------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5),
    ("250ms", 0.25),
    ("30s", 30.0),
    ("0.25s", 0.25),
    ("5m", 300.0),
    ("1.5m", 90.0),
    ("1h", 3600.0),
    ("1.5h", 5400.0),
    ("2d", 172800.0),
    ("90", 90.0),
    ("2.5", 2.5),
    ("0", 0.0),
    (" 10s ", 10.0),
    ("10 s", 10.0),
])
def test_parse_duration(text, seconds):
    value = parse_duration(text)
    assert value == seconds
    assert isinstance(value, float)


@pytest.mark.parametrize("text", ["abc", "-5s", "10y", "", "5 minutes", "s", "1.s", "5m30s", "1e3"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError) as err:
        parse_duration(text, "--window")
    assert str(err.value).startswith(f"--window: {text!r} is not a duration")


def test_parse_duration_accepts_non_strings():
    assert parse_duration(7) == 7.0
    assert parse_duration(1.5) == 1.5


# -- parse_listen ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:9400", ("0.0.0.0", 9400)),
    (":9400", ("0.0.0.0", 9400)),
    ("[::]:9400", ("::", 9400)),
    ("[fe80::1]:80", ("fe80::1", 80)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("localhost:65535", ("localhost", 65535)),
    (" 10.0.0.1:8080 ", ("10.0.0.1", 8080)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["nonsense", "host", "1.2.3.4:", "::9400", "1.2.3.4:-1", "[::]", "", "1.2.3.4:80x"])
def test_parse_listen_rejects(text):
    with pytest.raises(ConfigError) as err:
        parse_listen(text)
    assert str(err.value) == (f"--listen: {text!r} is not HOST:PORT "
                              "(e.g. 0.0.0.0:9400 or [::]:9400)")


def test_parse_listen_port_out_of_range():
    with pytest.raises(ConfigError) as err:
        parse_listen("1.2.3.4:99999")
    assert str(err.value) == "--listen: port 99999 is out of range 0-65535"
    with pytest.raises(ConfigError):
        parse_listen("[::1]:65536")


# -- probe lists -----------------------------------------------------------------------------

def test_parse_probe_list():
    assert probe_names() == ALL_PROBES
    assert parse_probe_list("all", "--probes") == ALL_PROBES
    assert parse_probe_list("drops", "--probes") == ["drops"]
    assert parse_probe_list(" drops , ", "--probes") == ["drops"]
    assert parse_probe_list("", "--disable") == []
    assert parse_probe_list(["drops"], "--probes") == ["drops"]


# -- Config.validate -------------------------------------------------------------------------

def test_default_config_is_valid():
    cfg = Config().validate()
    assert cfg.probes == ALL_PROBES
    assert cfg.enabled_probes == ALL_PROBES
    assert cfg.disable == [] and cfg.require == []


def test_config_strings_are_parsed():
    cfg = Config(probes="all", disable="drops", require="").validate()
    assert cfg.probes == ALL_PROBES
    assert cfg.disable == ["drops"]
    assert cfg.enabled_probes == ALL_PROBES[1:]


@pytest.mark.parametrize("field", ["probes", "disable", "require"])
def test_unknown_probe_is_named(field):
    with pytest.raises(ConfigError) as err:
        Config(**{field: "drops,bogus,nosuch"}).validate()
    assert str(err.value) == f"--{field}: unknown probe(s) bogus, nosuch; known: " + ", ".join(ALL_PROBES)


def test_require_of_a_disabled_probe():
    with pytest.raises(ConfigError) as err:
        Config(disable=["drops"], require=["drops"]).validate()
    assert str(err.value) == "--require: probe(s) drops are required but not enabled"


def test_require_of_a_probe_not_in_probes():
    with pytest.raises(ConfigError) as err:
        Config(probes=[], require=["drops"]).validate()
    assert str(err.value) == "--require: probe(s) drops are required but not enabled"


def test_require_of_an_enabled_probe():
    assert Config(require="drops").validate().require == ["drops"]


@pytest.mark.parametrize("kwargs, flag", [
    ({"snapshot_interval": 0.1}, "--snapshot-interval"),
    ({"snapshot_interval": 301}, "--snapshot-interval"),
    ({"snapshot_interval": 10, "max_window": 5, "default_window": 5}, "--max-window"),
    ({"max_window": 7 * 86400 + 1}, "--max-window"),
    ({"default_window": 0.5}, "--window"),
    ({"default_window": 3601}, "--window"),
    ({"max_window": 60, "default_window": 61}, "--window"),
    ({"drops_rate_warning": 0}, "--drops-rate-warning"),
    ({"drops_rate_warning": 100, "drops_rate_critical": 99}, "--drops-rate-warning"),
    ({"drops_location_entries": -1}, "--drops-location-entries"),
    ({"drops_location_entries": 65537}, "--drops-location-entries"),
    ({"drops_other_entries": 0}, "--drops-other-entries"),
    ({"log_level": "loud"}, "--log-level"),
    ({"listen": "nonsense"}, "--listen"),
])
def test_validate_rejects(kwargs, flag):
    with pytest.raises(ConfigError) as err:
        Config(**kwargs).validate()
    assert str(err.value).startswith(flag)


def test_window_error_message():
    with pytest.raises(ConfigError) as err:
        Config(default_window=0.5).validate()
    assert str(err.value) == "--window: 0.5s must be between 1s and --max-window (3600s)"


@pytest.mark.parametrize("kwargs", [
    {"snapshot_interval": 0.2},
    {"snapshot_interval": 300, "max_window": 300, "default_window": 60},
    {"max_window": 7 * 86400},
    {"default_window": 1},
    {"default_window": 3600},
    {"drops_rate_warning": 10, "drops_rate_critical": 10},
    {"drops_location_entries": 0},
    {"log_level": "DEBUG"},
])
def test_validate_accepts_bounds(kwargs):
    Config(**kwargs).validate()


def test_as_dict():
    d = Config().as_dict()
    assert d["listen"] == "0.0.0.0:9400"
    assert d["drops_rate_warning"] == 50.0
    assert d["drops_rate_critical"] == 1000.0
    import dataclasses
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert {"listen", "probes", "disable", "require", "strict", "snapshot_interval", "max_window",
            "default_window", "log_level"} <= set(d)


@pytest.mark.parametrize("sample", [0, 3, 12, 8192])
def test_location_sample_must_be_power_of_two(sample):
    with pytest.raises(ConfigError, match="--drops-location-sample"):
        Config(drops_location_sample=sample).validate()
