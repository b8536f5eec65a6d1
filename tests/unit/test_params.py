"""Declared probe params (probes/params.py): the flags, DPWATCH_* twins, Config attributes and
validation generated from each probe's probes/<name>/params.py."""

from __future__ import annotations

import os
import re

import pytest

from dpwatch.daemon import cli
from dpwatch.daemon.config import Config, ConfigError, probe_params
from dpwatch.probes.params import Param, ParamError, format_duration
from dpwatch.probes.registry import PROBES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv, monkeypatch, env=None):
    for k in [k for k in os.environ if k.startswith("DPWATCH_")]:
        monkeypatch.delenv(k)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    args = cli.build_parser().parse_args(argv)
    return cli.config_from_args(args).validate()


def test_every_probe_param_is_a_flag_a_variable_and_a_config_field():
    names = {f for f in Config.__dataclass_fields__}
    declared = probe_params()
    assert len(declared) >= 40  # every probe's settings are declared (so this can fail)
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for probe, p in declared:
        assert p.attr in names, p.flag
        assert p.flag.startswith(probe.name) or probe.name == "node", (probe.name, p.flag)
        assert (p.option in help_text) == p.cli, p.flag


def test_flags_and_env_twins_reach_the_config(monkeypatch):
    cfg = parse(["run", "--dns-timeout", "2s", "--softirq-sample", "4", "--mtu-all-netns",
                 "--dns-ports", "53,5353"], monkeypatch,
                env={"DPWATCH_DNS_LATENCY_P99": "50ms", "DPWATCH_CONNTRACK_ALL_NETNS": "1",
                     "DPWATCH_DNS_HOOK": "socket", "DPWATCH_DROPS_RATE_WARNING": "7.5"})
    assert (cfg.dns_timeout, cfg.softirq_sample, cfg.mtu_all_netns, cfg.dns_ports) == (2.0, 4, True, [53, 5353])
    assert (cfg.dns_latency_p99, cfg.conntrack_all_netns, cfg.dns_hook, cfg.drops_rate_warning) == (
        0.05, True, "socket", 7.5)
    # The flag wins over its twin.
    cfg = parse(["run", "--dns-hook", "tc"], monkeypatch, env={"DPWATCH_DNS_HOOK": "socket"})
    assert cfg.dns_hook == "tc"
    # Defaults are the declared ones.
    cfg = parse(["run"], monkeypatch)
    for _probe, p in probe_params():
        assert getattr(cfg, p.attr) == p.default, p.flag


@pytest.mark.parametrize("argv, env, message", [
    (["--dns-timeout", "10ms"], {}, "--dns-timeout: 10ms is outside 100ms..300s"),
    (["--dns-timeout", "soon"], {}, "--dns-timeout: 'soon' is not a duration"),
    ([], {"DPWATCH_DNS_TIMEOUT": "soon"}, "--dns-timeout: 'soon' is not a duration"),
    ([], {"DPWATCH_SOFTIRQ_SAMPLE": "x"}, "DPWATCH_SOFTIRQ_SAMPLE: 'x' is not an integer"),
    ([], {"DPWATCH_MTU_ALL_NETNS": "maybe"}, "DPWATCH_MTU_ALL_NETNS: 'maybe' is not a boolean"),
    (["--dns-names", "some"], {}, "--dns-names: 'some' is not full, suffix, hashed or off"),
    (["--softirq-sample", "6"], {}, "--softirq-sample: 6 must be a power of two within 1..1024"),
    (["--dns-cluster-domain", "a..b"], {}, "--dns-cluster-domain: 'a..b' is not a domain name"),
    (["--dns-ports", "70000"], {}, "--dns-ports: port 70000 is outside 1..65535"),
    (["--conntrack-pressure-percent", "99"], {}, "conntrack thresholds: need 0 < --conntrack-pressure-percent"),
    (["--drops-rate-critical", "10"], {}, "--drops-rate-warning must be > 0 and <= --drops-rate-critical"),
])
def test_bad_values_name_the_flag_or_variable(monkeypatch, argv, env, message):
    with pytest.raises(ConfigError) as err:
        parse(["run", *argv], monkeypatch, env=env)
    assert str(err.value).startswith(message), str(err.value)


def test_config_values_are_checked_from_the_declarations_too():
    with pytest.raises(ConfigError, match=r"--mtu-max-netns: 0 is outside 1..4096"):
        Config(mtu_max_netns=0).validate()  # a param with no flag is still validated
    assert Config(dns_ports="53, 853").validate().dns_ports == [53, 853]
    with pytest.raises(TypeError):
        Config(no_such_setting=1)


def test_a_declaration_is_checked_when_it_is_made():
    with pytest.raises(TypeError, match="unknown type"):
        Param("x-y", "number", 1, "help")
    with pytest.raises(TypeError, match="not one of its choices"):
        Param("x-y", "choice", "c", "help", choices=("a", "b"))
    with pytest.raises(TypeError, match="lower-case words"):
        Param("X_Y", "int", 1, "help")
    with pytest.raises(ParamError, match=r"--x-y: 0 must be > 1"):
        Param("x-y", "float", 2.0, "help", min=1, min_exclusive=True).check(0)


@pytest.mark.parametrize("seconds, text", [(5.0, "5s"), (0.2, "200ms"), (0.001, "1ms"), (1e-6, "1us"),
                                           (60.0, "60s"), (3600.0, "1h"), (0.0, "0s")])
def test_durations_show_as_typed(seconds, text):
    assert format_duration(seconds) == text


def test_no_probe_flag_is_kept_by_hand_in_daemon():
    """The flags of probe params appear in daemon/ only through the generator."""
    flags = {p.option for probe in PROBES for p in probe.params}
    for name in ("cli.py", "config.py"):
        with open(os.path.join(REPO, "daemon", name), encoding="utf-8") as fh:
            text = fh.read()
        hand = sorted(f for f in flags if re.search(re.escape(f) + r"\b", text))
        assert not hand, f"daemon/{name} names probe flags by hand: {hand}"
