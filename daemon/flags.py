"""The `dpwatch` command line: exit codes, the parser and the Config it gives.

The daemon's own flags are written here; every probe's flags are generated from its declared
params (probes/<name>/params.py) by add_probe_flags().
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dpwatch import __version__
from dpwatch.daemon.config import Config, ConfigError, parse_duration
from dpwatch.probes.registry import PROBES, probe_names

EX_USAGE = 64      # a bad flag, variable or config value
EX_NOT_LOADED = 3  # probes could not be loaded (or a required probe is down)
EX_SERVE = 4       # the HTTP listener could not start (e.g. the port is taken)
EX_FAULT = 5       # --strict: a probe lost events while running (a full map, a failed read)

DESCRIPTION = """\
dpwatch watches a node's network datapath with eBPF: packet drops by kernel reason (and, in
later probes, conntrack, MTU, softirq and DNS). It counts in kernel maps, serves Prometheus
metrics, and answers "what is wrong with this node's network?" with a ranked report.

commands:
  run        start the daemon: HTTP on --listen with /metrics, /diagnose, /probes, /healthz, /readyz
  check      preflight: detect kernel features, load every probe once, print a table, exit
  diagnose   one-shot: load the probes, watch for --window, print the same report as /diagnose
             (when the daemon's unix socket exists: that daemon's report, asked over it)
"""

EPILOG = f"""\
Every flag can also be set by an environment variable: DPWATCH_ plus the flag name in upper
case with '-' as '_' (e.g. DPWATCH_LISTEN=127.0.0.1:9400, DPWATCH_STRICT=1). Flags win.

examples:
  dpwatch run                                # serve on 0.0.0.0:9400
  curl -s localhost:9400/diagnose?window=5m  # what went wrong in the last 5 minutes
  dpwatch check                              # which probes can load on this kernel, and why not
  dpwatch diagnose --window 30s --format json
  dpwatch diagnose --url http://node:9400     # a running daemon's report, rendered here
  dpwatch diagnose --unix-socket ''          # one-shot here even when a daemon runs

probes: {', '.join(probe_names())}

exit codes: 0 ok; diagnose: 1 warning, 2 critical; {EX_NOT_LOADED} probes could not load
(or a --require'd probe is down, or --strict and any probe is down); {EX_SERVE} cannot
listen; 69 diagnose --url cannot reach the daemon; {EX_USAGE} bad usage.
"""


def _env(name: str, default=None):
    return os.environ.get("DPWATCH_" + name.upper().replace("-", "_"), default)


def _opt(group, flag: str, kind: type, default, help: str) -> None:
    """A numeric --flag whose default is DPWATCH_FLAG when that is set, else ``default``. A
    variable that is not a number raises ConfigError naming it (main exits 64)."""
    raw = _env(flag)
    if raw is not None:
        try:
            default = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"DPWATCH_{flag.upper().replace('-', '_')}: {raw!r} is not {what}") from None
    group.add_argument(f"--{flag}", type=kind, default=default, help=help)


def _env_bool(name: str, default: bool = False) -> bool:
    value = _env(name)
    if value is None:
        return default
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"DPWATCH_{name.upper().replace('-', '_')}: {value!r} is not a boolean (use 1/0, true/false)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors exit with our usage code
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(probes=PROBES) -> argparse.ArgumentParser:
    d = Config()
    common = argparse.ArgumentParser(add_help=False)
    _probe_selection_flags(common)
    add_probe_flags(common, probes)
    o = common.add_argument_group("output")
    o.add_argument("--log-level", default=_env("log-level", d.log_level),
                   help="debug, info, warning or error (default: %(default)s)")

    parser = _Parser(prog="dpwatch", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dpwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", parents=[common], help="start the daemon",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _run_flags(run, d)
    sub.add_parser("check", parents=[common], help="preflight: which probes load here, and why not",
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    diag = sub.add_parser("diagnose", parents=[common], help="one-shot triage report",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _diagnose_flags(diag, d)
    return parser


def _probe_selection_flags(common: argparse.ArgumentParser) -> None:
    g = common.add_argument_group("probes")
    g.add_argument("--probes", default=_env("probes", "all"),
                   help="comma-separated probes to enable, or 'all' (default: %(default)s)")
    g.add_argument("--disable", default=_env("disable", ""),
                   help="comma-separated probes to turn off")
    g.add_argument("--require", default=_env("require", ""),
                   help="comma-separated probes that must load; `check` and `run` fail without them")
    g.add_argument("--strict", action="store_true", default=None,
                   help="treat any probe that cannot load as fatal (exit 3), and with `run`, any "
                        "event lost while running (a full map, a failed read) too (exit 5)")


def _run_flags(run: argparse.ArgumentParser, d: Config) -> None:
    run.add_argument("--listen", default=_env("listen", d.listen),
                     help="HOST:PORT for HTTP (default: %(default)s)")
    run.add_argument("--snapshot-interval", default=_env("snapshot-interval", "5s"),
                     help="how often the maps are snapshotted for /diagnose windows (default: %(default)s)")
    run.add_argument("--max-window", default=_env("max-window", "1h"),
                     help="longest ?window= served; bounds the snapshot ring (default: %(default)s)")
    run.add_argument("--window", default=_env("window", "60s"),
                     help="default /diagnose window (default: %(default)s)")
    run.add_argument("--bpf-stats", action="store_true", default=None,
                     help="export dpwatch_bpf_program_run_seconds_total and _runs_total per BPF "
                          "program (turns on kernel BPF run-time stats while dpwatch runs; costs "
                          "a few ns per program run)")
    _http_flags(run, d)


def _http_flags(run: argparse.ArgumentParser, d: Config) -> None:
    h = run.add_argument_group("HTTP security and limits")
    h.add_argument("--web-config-file", default=_env("web-config-file", ""),
                   help="exporter-toolkit web config (YAML): tls_server_config (cert_file, key_file, "
                        "client_auth_type, client_ca_file, min_version), basic_auth_users (bcrypt)")
    h.add_argument("--restrict-diagnose", choices=("off", "loopback"),
                   default=_env("restrict-diagnose", "off"),
                   help="loopback: serve /diagnose and /probes to loopback clients only (a token, "
                        "if set, still opens them to others) (default: %(default)s)")
    h.add_argument("--diagnose-token", default=_env("diagnose-token", ""),
                   help="require this token (header X-Dpwatch-Token or Authorization: Bearer) for "
                        "/diagnose and /probes; prefer DPWATCH_DIAGNOSE_TOKEN or --diagnose-token-file")
    h.add_argument("--diagnose-token-file", default=_env("diagnose-token-file", ""),
                   help="read the /diagnose token from this file")
    _opt(h, "max-concurrent-requests", int, d.max_concurrent_requests,
         help="requests served at once; more get 503 (default: %(default)s)")
    _opt(h, "max-series-per-metric", int, d.max_series_per_metric,
         help="series per metric; more fold into label value \"other\" and count in "
              "dpwatch_series_overflow_total (default: %(default)s)")
    r = run.add_argument_group("reachable while the conntrack table is full")
    r.add_argument("--notrack", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the --listen port out of conntrack with an nftables table of its own "
                        "(inet dpwatch: raw-priority prerouting and output chains, removed at exit), "
                        "so the daemon answers while the table is full (default: on)")
    r.add_argument("--unix-socket", default=_env("unix-socket", d.unix_socket), metavar="PATH",
                   help="serve the same API on this unix socket too (mode 0600; no netfilter on "
                        "the way; `dpwatch diagnose` asks it); '' turns it off (default: %(default)s)")
    _opt(run, "synthetic-series", int, 0, help=argparse.SUPPRESS)  # benchmark: N extra series to load the collector


def _diagnose_flags(diag: argparse.ArgumentParser, d: Config) -> None:
    diag.add_argument("--window", default=_env("window"),
                      help="how long to watch before reporting (default: 10s); with --url, the "
                           "window the daemon reports on (default: the daemon's --window)")
    diag.add_argument("--format", choices=("text", "json", "html"), default=_env("format", "text"),
                      help="report format (default: %(default)s)")
    diag.add_argument("--url", default=_env("url", ""),
                      help="ask a running daemon instead of loading probes here, e.g. "
                           "http://node:9400 (its /diagnose?format=json, rendered locally; "
                           "user:password@ in the URL for basic auth, DPWATCH_DIAGNOSE_TOKEN for "
                           "the /diagnose token)")
    diag.add_argument("--unix-socket", "--socket", dest="unix_socket", metavar="PATH",
                      default=_env("unix-socket", d.unix_socket),
                      help="without --url: when this socket exists, print the report of the daemon "
                           "serving on it; else (or with '') load the probes here, one-shot "
                           "(default: %(default)s)")


def add_probe_flags(common: argparse.ArgumentParser, probes=PROBES) -> None:
    """One --help group per probe, one flag per declared param (probes/<name>/params.py),
    each defaulting to its DPWATCH_* twin when that is set. A variable that is not a number
    raises ConfigError naming it (main exits 64); text values (durations, choices) are parsed
    with the flag's own name in config_from_args."""
    for probe in probes:
        shown = [p for p in probe.params if p.cli]
        if not shown:
            continue
        group = common.add_argument_group(probe.param_group or f"{probe.name} probe")
        for param in shown:
            text = param.help.replace("%", "%%")
            if param.type == "bool":
                group.add_argument(param.option, action="store_true", default=None, help=text)
                continue
            text += " (default: %(default)s)"
            if param.type in ("int", "float"):
                env = param.env_value(ConfigError)
                default = param.default if env is None else env
                group.add_argument(param.option, type=int if param.type == "int" else float,
                                   default=default, help=text, metavar=param.metavar)
            else:
                group.add_argument(param.option, default=_env(param.flag, param.shown_default()),
                                   help=text, metavar=param.metavar)


def probe_values(args, probes=PROBES) -> dict[str, Any]:
    """Config values of every probe param: the flag, else its DPWATCH_* twin, else the default."""
    out: dict[str, Any] = {}
    for probe in probes:
        for param in probe.params:
            if not param.cli:
                continue
            raw = getattr(args, param.attr)
            if param.type == "bool":
                env = param.env_value(ConfigError)
                out[param.attr] = True if raw else (param.default if env is None else env)
            elif isinstance(raw, str) and param.type != "str":
                out[param.attr] = param.from_text(raw, param.option, ConfigError)
            else:
                out[param.attr] = raw
    return out


def config_from_args(args, config_cls: type = Config) -> Config:
    """``config_cls``: Config, or config.config_class(probes) for another probe list."""
    cfg = config_cls(
        probes=args.probes, disable=args.disable, require=args.require,
        strict=bool(args.strict) if args.strict is not None else _env_bool("strict"),
        log_level=args.log_level, **probe_values(args, config_cls.probe_classes))
    if args.command == "run":
        cfg.listen = args.listen
        cfg.snapshot_interval = parse_duration(args.snapshot_interval, "--snapshot-interval")
        cfg.max_window = parse_duration(args.max_window, "--max-window")
        cfg.default_window = parse_duration(args.window, "--window")
        cfg.bpf_stats = bool(args.bpf_stats) if args.bpf_stats is not None else _env_bool("bpf-stats")
        cfg.synthetic_series = args.synthetic_series
        from dpwatch.daemon.httpsec import read_token
        cfg.web_config_file = args.web_config_file
        cfg.restrict_diagnose = args.restrict_diagnose
        cfg.diagnose_token = read_token(args.diagnose_token, args.diagnose_token_file)
        cfg.max_concurrent_requests = args.max_concurrent_requests
        cfg.max_series_per_metric = args.max_series_per_metric
        cfg.notrack = bool(args.notrack) if args.notrack is not None else _env_bool("notrack", True)
        cfg.unix_socket = args.unix_socket
    elif args.command == "diagnose":
        cfg.unix_socket = args.unix_socket
        cfg.report_format = args.format
        cfg.report_url = args.url
        cfg.report_window_given = args.window is not None
        seconds = parse_duration(args.window or "10s", "--window")
        cfg.default_window = max(1.0, seconds)
        cfg.max_window = max(cfg.default_window, cfg.snapshot_interval)
    return cfg.validate()
