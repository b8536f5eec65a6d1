"""`dpwatch diagnose --url` and over the unix socket: a running daemon's report."""

from __future__ import annotations

import json
import os

from dpwatch.daemon.config import ConfigError

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
