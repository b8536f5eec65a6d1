"""The `dpwatch` command: run, check, diagnose."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from dpwatch import __version__
from dpwatch.probes.registry import PROBES, probe_names
from dpwatch.daemon.config import Config, ConfigError, parse_duration

EX_USAGE = 64      # a bad flag, variable or config value
EX_NOT_LOADED = 3  # probes could not be loaded (or a required probe is down)
EX_SERVE = 4       # the HTTP listener could not start (e.g. the port is taken)
EX_FAULT = 5       # --strict: a probe lost events while running (a full map, a failed read)

log = logging.getLogger("dpwatch")

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


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    common = argparse.ArgumentParser(add_help=False)
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
    add_probe_flags(common)
    o = common.add_argument_group("output")
    o.add_argument("--log-level", default=_env("log-level", d.log_level),
                   help="debug, info, warning or error (default: %(default)s)")

    parser = _Parser(prog="dpwatch", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dpwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="start the daemon",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
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

    sub.add_parser("check", parents=[common], help="preflight: which probes load here, and why not",
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)

    diag = sub.add_parser("diagnose", parents=[common], help="one-shot triage report",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
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
    return parser


def add_probe_flags(common: argparse.ArgumentParser) -> None:
    """One --help group per probe, one flag per declared param (probes/<name>/params.py),
    each defaulting to its DPWATCH_* twin when that is set. A variable that is not a number
    raises ConfigError naming it (main exits 64); text values (durations, choices) are parsed
    with the flag's own name in config_from_args."""
    for probe in PROBES:
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


def probe_values(args) -> dict[str, Any]:
    """Config values of every probe param: the flag, else its DPWATCH_* twin, else the default."""
    out: dict[str, Any] = {}
    for probe in PROBES:
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


def config_from_args(args) -> Config:
    cfg = Config(
        probes=args.probes, disable=args.disable, require=args.require,
        strict=bool(args.strict) if args.strict is not None else _env_bool("strict"),
        log_level=args.log_level, **probe_values(args))
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


def _load_failures(daemon, cfg) -> list:
    return daemon.manager.failures(required_only=not cfg.strict)


def cmd_check(cfg) -> int:
    from dpwatch.daemon.service import Daemon
    daemon = Daemon(cfg)
    try:
        daemon.load()
        f = daemon.features
        print(f"kernel {f.kernel_release} ({f.machine})  tracefs={f.tracefs or 'missing'}  "
              f"btf={'yes' if f.btf else 'no'}  kprobes={'yes' if f.kprobes else 'no'}  "
              f"fentry={'yes' if f.fentry else 'no'}  kfree_skb.reason={'yes' if f.kfree_skb_reason else 'no'}")
        if not f.kprobes:
            print(f"  kprobes: {f.kprobes_reason}")
        if not f.fentry:
            print(f"  fentry: {f.fentry_reason}")
        print(f"  {f.headers_note}")
        print(f"  compile: {daemon.manager.compile_seconds:.2f}s in {daemon.manager.compiles} compile(s)")
        print()
        rows = [("PROBE", "MODE", "STATE", "REQUIRED", "REASON")]
        for st in daemon.manager.status.values():
            rows.append((st.name, st.mode or "-", st.state.value, "yes" if st.required else "no", st.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
        bad = _load_failures(daemon, cfg)
        if bad:
            print(f"\nFAILED: {', '.join(s.name for s in bad)} cannot load", file=sys.stderr)
            return EX_NOT_LOADED
        return 0
    finally:
        daemon.stop()


EX_UNREACHABLE = 69  # diagnose --url: the daemon could not be reached or gave no report


class DaemonAbsent(OSError):
    """Nothing listens on the unix socket (a file left by a daemon that was killed)."""


def _url_get(full: str, headers: dict, timeout: float) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(full, headers=headers), timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _unix_get(path: str, target: str, headers: dict, timeout: float) -> tuple[int, bytes]:
    from dpwatch.daemon.unixsock import UnixHTTPConnection
    conn = UnixHTTPConnection(path, timeout=timeout)
    try:
        try:
            conn.connect()
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise DaemonAbsent(exc.errno, f"no daemon listens on {path}") from None
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fetch_report(url: str, window: float | None, timeout: float = 30.0, unix_socket: str = "") -> dict:
    """GET <url>/diagnose?format=json from a running daemon, or /diagnose on its unix socket
    when ``unix_socket`` is given. Raises ConfigError for answers that say the request was
    wrong (4xx), DaemonAbsent when nothing listens on the unix socket, OSError when the
    daemon cannot be reached or gives no report."""
    import base64
    import http.client
    import urllib.error
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/diagnose"):
        path += "/diagnose"
    query = {"format": "json"}
    if window is not None:
        query["window"] = f"{window:g}s"
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    full = urllib.parse.urlunsplit((parts.scheme, netloc, path, urllib.parse.urlencode(query), ""))
    headers = {"Accept": "application/json"}
    if parts.username:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    token = os.environ.get("DPWATCH_DIAGNOSE_TOKEN")
    if token:
        headers["X-Dpwatch-Token"] = token
    try:
        if unix_socket:
            target = f"{path}?{urllib.parse.urlencode(query)}"
            full = f"unix socket {unix_socket}"
            code, body = _unix_get(unix_socket, target, headers, timeout)
        else:
            code, body = _url_get(full, headers, timeout)
    except DaemonAbsent:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OSError(f"cannot reach the daemon at {full}: {reason}") from None
    if code >= 400:
        detail = body.decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        msg = f"{full} answered {code}: {str(detail).strip()[:300]}"
        if 400 <= code < 500 and code not in (401, 403):
            raise ConfigError(msg) from None
        raise OSError(msg) from None
    try:
        report = json.loads(body)
        report["status"], report["findings"]  # noqa: B018  the shape a report has
    except (ValueError, KeyError, TypeError):
        raise OSError(f"{full} did not answer with a dpwatch report (is it a dpwatch daemon?)") from None
    return report


def print_report(report: dict, fmt: str) -> None:
    from dpwatch.daemon.render_html import render_html
    from dpwatch.daemon.triage import render_text
    if fmt == "json":
        print(json.dumps(report, indent=2))
    elif fmt == "html":
        sys.stdout.write(render_html(report))
    else:
        sys.stdout.write(render_text(report))


def cmd_diagnose_url(cfg, unix_socket: str = "") -> int:
    """The report of a running daemon: at --url, or on its unix socket. Over the socket, a
    file that nothing listens on raises DaemonAbsent (the caller runs a one-shot instead)."""
    from dpwatch.daemon.triage import EXIT_CODES
    if not unix_socket and not cfg.report_url.startswith(("http://", "https://")):
        print(f"dpwatch: error: --url: {cfg.report_url!r} is not an http:// or https:// URL", file=sys.stderr)
        return EX_USAGE
    try:
        report = fetch_report(cfg.report_url or "http://localhost", cfg.default_window if cfg.report_window_given
                              else None, unix_socket=unix_socket)
    except DaemonAbsent:
        raise
    except ConfigError as exc:
        print(f"dpwatch: error: {exc}", file=sys.stderr)
        return EX_USAGE
    except OSError as exc:
        print(f"dpwatch: error: {exc}", file=sys.stderr)
        return EX_UNREACHABLE
    print_report(report, cfg.report_format)
    return EXIT_CODES.get(report["status"], EX_UNREACHABLE)


def cmd_diagnose(cfg) -> int:
    from dpwatch.daemon.service import Daemon
    from dpwatch.daemon.triage import EXIT_CODES, build_report
    daemon = Daemon(cfg)
    stop = {"now": False}

    def _sig(*_):
        stop["now"] = True
    signal.signal(signal.SIGTERM, _sig)
    try:
        daemon.load()
        if _load_failures(daemon, cfg) or not daemon.ready:
            for st in daemon.manager.failures():
                print(f"dpwatch: probe {st.name} {st.state.value}: {st.reason}", file=sys.stderr)
            if not daemon.ready or _load_failures(daemon, cfg):
                return EX_NOT_LOADED
        log.info("watching for %gs", cfg.default_window)
        deadline = time.monotonic() + cfg.default_window
        try:
            while not stop["now"] and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            pass
        report = build_report(daemon.manager, daemon.ring, cfg.default_window, daemon.features)
        print_report(report, cfg.report_format)
        return EXIT_CODES[report["status"]]
    finally:
        daemon.stop()


def _server_class():
    import contextlib

    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, which would kill the process
        before the probes are detached and make it exit 143. Handle the signals here instead:
        stop serving, then return so the caller detaches the probes and exits 0.
        ``after_startup`` (an async callable given the server) runs once the TCP port is bound."""

        after_startup = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.after_startup is not None:
                await self.after_startup(self)

        async def main_loop(self) -> None:
            """uvicorn wakes 10 times a second for housekeeping (the Date header, the exit
            flag); once a second is enough, and it is most of an idle daemon's CPU."""
            import asyncio
            should_exit = await self.on_tick(0)
            while not should_exit:
                await asyncio.sleep(1.0)
                should_exit = await self.on_tick(0)  # 0: refresh the Date header every tick

        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return _Server


def cmd_run(cfg) -> int:
    import uvicorn
    from dpwatch.daemon.app import create_app
    from dpwatch.daemon.config import parse_listen
    from dpwatch.daemon.service import Daemon

    daemon = Daemon(cfg)
    daemon.load()
    bad = _load_failures(daemon, cfg)
    if bad:
        for st in bad:
            log.error("probe %s %s: %s", st.name, st.state.value, st.reason)
        log.error("exiting: %s", "--strict and a probe is down" if cfg.strict else "a required probe is down")
        daemon.stop()
        return EX_NOT_LOADED
    daemon.start_sampler()
    _Server = _server_class()
    host, port = parse_listen(cfg.listen)
    from dpwatch.daemon.httpsec import load_web_config
    try:
        web = load_web_config(cfg.web_config_file) if cfg.web_config_file else None
    except ConfigError as exc:  # checked at start-up too; the file may have changed since
        print(f"dpwatch: error: {exc}", file=sys.stderr)
        daemon.stop()
        return EX_USAGE
    from dpwatch.daemon.notrack import NotrackTable
    from dpwatch.daemon.unixsock import UnixListener
    notrack = NotrackTable(port, enabled=cfg.notrack)
    unix = UnixListener(cfg.unix_socket)
    app = create_app(daemon, web, status=lambda: {"notrack": notrack.status(), "unix_socket": unix.status()})
    # Start-up objects (imports, the app) live for the whole run: keep the garbage collector
    # from walking them again on every full collection (shorter pauses in scrapes).
    gc.collect()
    gc.freeze()
    tls = web.tls if web is not None else None

    live: dict = {}

    class _Config(uvicorn.Config):
        def load(self) -> None:
            super().load()
            if tls is not None:  # our context: min/max version and client certificates
                from dpwatch.daemon.httpsec import CertWatcher
                self.ssl = tls.context()
                live["watcher"] = CertWatcher(tls, self.ssl)  # files as they were when loaded

    # proxy_headers off: the peer address (the loopback check) is never taken from a header.
    server = _Server(_Config(app, host=host, port=port, log_level="warning", access_log=False,
                             lifespan="off", proxy_headers=False, server_header=False,
                             ssl_certfile=tls.cert_file if tls else None,
                             ssl_keyfile=tls.key_file if tls else None))
    log.info("serving on %s://%s:%d (/metrics /diagnose /probes /healthz /readyz)",
             "https" if tls else "http", host, port)
    server.after_startup = lambda srv: reachable(srv, app, notrack, unix)
    strict = {"rc": 0, "stop": threading.Event()}
    if cfg.strict:
        threading.Thread(target=strict_watch, args=(daemon, server, strict), name="dpwatch-strict",
                         daemon=True).start()
    if tls is not None:
        threading.Thread(target=tls_watch, args=(tls, live, strict["stop"]), name="dpwatch-tls",
                         daemon=True).start()
    try:
        server.run()  # handles SIGTERM and SIGINT: stops accepting, finishes requests
    except SystemExit:
        pass  # uvicorn exits this way when it cannot bind; reported below
    finally:
        strict["stop"].set()
        notrack.stop()
        unix.close()
        daemon.stop()
        log.info("stopped: probes detached")
    if not server.started:
        log.error("could not serve HTTP on %s (see the error above)", cfg.listen)
        return EX_SERVE
    return strict["rc"]


async def reachable(server, app, notrack, unix) -> None:
    """Once the TCP port is bound (its real number, also for --listen HOST:0): keep it out of
    conntrack, and serve the same app on the unix socket. Neither ever stops the daemon."""
    notrack.port = server.servers[0].sockets[0].getsockname()[1]
    notrack.start()
    sock = unix.open()
    if sock is None:
        return
    try:
        from dpwatch.daemon.unixsock import serve_on
        await serve_on(server, sock, app)
        log.info("serving on unix socket %s (mode 0600)", unix.path)
    except Exception as exc:
        log.error("unix socket: cannot serve on %s: %s", unix.path, exc)
        unix.close()
        unix.state, unix.reason = "failed", str(exc)


TLS_RELOAD_INTERVAL = 5.0  # seconds between checks of the certificate files


def tls_watch(tls, live: dict, stop: threading.Event) -> None:
    """Reload the served certificate when its files change (httpsec.CertWatcher)."""
    while not stop.wait(TLS_RELOAD_INTERVAL):
        watcher = live.get("watcher")  # None until uvicorn has built the context
        what = watcher.check() if watcher is not None else None
        if what == "reloaded":
            log.info("TLS: %s changed; serving the new certificate", tls.cert_file)
        elif what:
            log.error("TLS: %s or %s changed but does not load; %s", tls.cert_file, tls.key_file, what)


def strict_watch(daemon, server, box: dict) -> None:
    """--strict while running: the first lost event (a full map, a failed read) stops the
    server the same way SIGTERM does (stop serving, detach, exit) with EX_FAULT."""
    while not box["stop"].wait(daemon.config.snapshot_interval):
        faults = daemon.manager.runtime_faults()
        if faults:
            what = ", ".join(f"{p}/{stage}={n}" for (p, stage), n in sorted(faults.items()))
            log.error("--strict: events lost (%s); stopping", what)
            box["rc"] = EX_FAULT
            server.should_exit = True
            return


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ValueError as exc:  # a DPWATCH_* variable that is not a number
        print(f"dpwatch: error: bad DPWATCH_* environment value: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return EX_USAGE
    try:
        cfg = config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"dpwatch: error: {exc}", file=sys.stderr)
        return EX_USAGE
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "diagnose" and cfg.report_url:
        return cmd_diagnose_url(cfg)  # no probes here: neither root nor BPF needed
    if args.command == "diagnose" and cfg.unix_socket:
        from dpwatch.daemon.unixsock import is_socket
        if is_socket(cfg.unix_socket):  # the daemon on this node: its report, over no netfilter
            log.info("asking the daemon on %s", cfg.unix_socket)
            try:
                return cmd_diagnose_url(cfg, cfg.unix_socket)
            except DaemonAbsent:
                print(f"dpwatch: no daemon listens on {cfg.unix_socket} (left by a daemon that was "
                      "killed?); running a one-shot report here", file=sys.stderr)
    if os.geteuid() != 0:
        print("dpwatch: warning: not root; loading BPF needs CAP_BPF, CAP_PERFMON and "
              "CAP_SYS_ADMIN (or root)", file=sys.stderr)
    if args.command == "check":
        return cmd_check(cfg)
    if args.command == "diagnose":
        return cmd_diagnose(cfg)
    return cmd_run(cfg)


if __name__ == "__main__":
    sys.exit(main())
