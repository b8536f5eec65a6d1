"""`dpwatch run`: load the probes, serve HTTP (and the unix socket), stop cleanly."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading

from dpwatch.daemon.config import ConfigError
from dpwatch.daemon.flags import EX_FAULT, EX_NOT_LOADED, EX_SERVE, EX_USAGE

log = logging.getLogger("dpwatch")


def _load_failures(daemon, cfg) -> list:
    return daemon.manager.failures(required_only=not cfg.strict)


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
    from dpwatch.daemon.httpsec import load_web_config
    try:
        web = load_web_config(cfg.web_config_file) if cfg.web_config_file else None
    except ConfigError as exc:  # checked at start-up too; the file may have changed since
        print(f"dpwatch: error: {exc}", file=sys.stderr)
        daemon.stop()
        return EX_USAGE
    return _serve(cfg, daemon, web)


def _serve(cfg, daemon, web) -> int:
    """Serve until SIGTERM/SIGINT (or --strict's first lost event); then detach everything."""
    from dpwatch.daemon.app import create_app
    from dpwatch.daemon.config import parse_listen
    from dpwatch.daemon.notrack import NotrackTable
    from dpwatch.daemon.unixsock import UnixListener
    host, port = parse_listen(cfg.listen)
    notrack = NotrackTable(port, enabled=cfg.notrack)
    unix = UnixListener(cfg.unix_socket)
    app = create_app(daemon, web, status=lambda: {"notrack": notrack.status(), "unix_socket": unix.status()})
    # Start-up objects (imports, the app) live for the whole run: keep the garbage collector
    # from walking them again on every full collection (shorter pauses in scrapes).
    gc.collect()
    gc.freeze()
    tls = web.tls if web is not None else None
    live: dict = {}
    server = _make_server(app, host, port, tls, live)
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


def _make_server(app, host: str, port: int, tls, live: dict):
    """The uvicorn server, with our TLS context (min/max version, client certificates) when
    the web config has one; ``live["watcher"]`` gets the certificate watcher once it loads."""
    import uvicorn

    class _Config(uvicorn.Config):
        def load(self) -> None:
            super().load()
            if tls is not None:
                from dpwatch.daemon.httpsec import CertWatcher
                self.ssl = tls.context()
                live["watcher"] = CertWatcher(tls, self.ssl)  # files as they were when loaded

    # proxy_headers off: the peer address (the loopback check) is never taken from a header.
    return _server_class()(_Config(app, host=host, port=port, log_level="warning", access_log=False,
                                   lifespan="off", proxy_headers=False, server_header=False,
                                   ssl_certfile=tls.cert_file if tls else None,
                                   ssl_keyfile=tls.key_file if tls else None))


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
