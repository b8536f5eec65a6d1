"""The HTTP API on a unix socket too (default /run/dpwatch/dpwatch.sock, mode 0600).

A unix socket goes through no netfilter hook, so a shell on the node gets the report even
when the firewall or a full conntrack table drops everything (`dpwatch diagnose` uses it when
it exists). Its access control is the file mode: only root (its owner) can connect, so the
HTTP security settings (basic auth, the /diagnose token, --restrict-diagnose) do not apply to
it, and neither does TLS. The concurrency limit does.

Server side: ``UnixListener`` binds the socket (a stale one from a killed daemon is replaced,
a live one is left to its daemon) and ``serve_on`` adds it to the running uvicorn server,
with the same app. Client side: ``UnixHTTPConnection``.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import os
import socket
import stat
from typing import Any

from dpwatch.daemon.config import DEFAULT_UNIX_SOCKET
from dpwatch.daemon.httpsec import UNIX_PEER

log = logging.getLogger("dpwatch.unixsock")

DEFAULT_PATH = DEFAULT_UNIX_SOCKET


def is_socket(path: str, follow: bool = True) -> bool:
    try:
        return stat.S_ISSOCK((os.stat if follow else os.lstat)(path).st_mode)
    except OSError:
        return False


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class UnixListener:
    """The listening socket. open() never raises: a failure is logged and kept for /probes."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None
        self.state = "off" if not path else "not started"
        self.reason = "turned off (--unix-socket '')" if not path else ""
        self._ino: int | None = None

    def open(self) -> socket.socket | None:
        if not self.path:
            return None
        try:
            self.sock = self._bind()
        except OSError as exc:
            self.state, self.reason = "failed", f"{self.path}: {exc.strerror or exc}"
            log.error("unix socket: cannot serve on %s: %s", self.path, exc.strerror or exc)
            return None
        self.state, self.reason = "listening", "mode 0600: root only"
        return self.sock

    def _bind(self) -> socket.socket:
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if os.path.lexists(self.path):
            if not is_socket(self.path, follow=False):
                raise OSError(errno.EEXIST, "exists and is not a socket; not replacing it")
            if _answers(self.path):
                raise OSError(errno.EADDRINUSE, "another process serves on it (another dpwatch?)")
            os.unlink(self.path)  # stale: left by a daemon that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # created 0600: never reachable by others, not even briefly
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
            self._ino = os.stat(self.path).st_ino
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close, and unlink the file if it is still ours (not a later daemon's)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._ino is not None:
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
            self._ino = None
            self.state, self.reason = "off", "removed at exit"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "path": self.path, "reason": self.reason}


class UnixPeerApp:
    """Marks requests that came in over the unix socket (see httpsec.UNIX_PEER)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            scope[UNIX_PEER] = True
        return await self.app(scope, receive, send)


async def serve_on(server, sock: socket.socket, app) -> None:
    """Serve ``app`` on ``sock`` from the running uvicorn ``server`` (after its startup): the
    same server state, so shutdown closes it and waits for its requests; no TLS."""
    import uvicorn
    tcp = server.config
    config = uvicorn.Config(UnixPeerApp(app), log_config=None, log_level=tcp.log_level,
                            access_log=False, lifespan="off", proxy_headers=False, server_header=False,
                            http=tcp.http, limit_concurrency=tcp.limit_concurrency,
                            timeout_keep_alive=tcp.timeout_keep_alive)
    config.load()
    loop = asyncio.get_running_loop()

    def protocol():
        return config.http_protocol_class(config=config, server_state=server.server_state,
                                          app_state=server.lifespan.state, _loop=loop)
    server.servers.append(await loop.create_server(protocol, sock=sock, backlog=config.backlog))


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the Host header says localhost)."""

    def __init__(self, path: str, timeout: float = 30.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
