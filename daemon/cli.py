"""The `dpwatch` command: run, check, diagnose."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from dpwatch.daemon.config import ConfigError
from dpwatch.daemon.flags import (EX_FAULT, EX_NOT_LOADED, EX_SERVE, EX_USAGE, _env_bool,  # noqa: F401
                                  build_parser, config_from_args)
from dpwatch.daemon.remote import EX_UNREACHABLE, DaemonAbsent, fetch_report  # noqa: F401
from dpwatch.daemon.serve import (_load_failures, _server_class, cmd_run, reachable,  # noqa: F401
                                  strict_watch)

log = logging.getLogger("dpwatch")


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


def print_report(report: dict, fmt: str) -> None:
    from dpwatch.daemon.triage.html import render_html
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
