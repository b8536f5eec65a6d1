"""HTTP hardening: the web config file (TLS, basic auth, headers), access to /diagnose and
/probes (loopback or a token), and a limit on concurrent requests.

The web config file uses the Prometheus exporter-toolkit format, so one file can serve
node-exporter and dpwatch alike::

    tls_server_config:
      cert_file: /etc/dpwatch/tls.crt
      key_file: /etc/dpwatch/tls.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: /etc/dpwatch/ca.crt            # needed by the two Verify types
      min_version: TLS12                             # optional: TLS10..TLS13 (default TLS12)
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      prometheus: $2b$12$...                          # bcrypt hashes only

A key dpwatch does not implement (cipher_suites, RequestClientCert, http2: true, ...) is an
error that names it, not a silent weakening: ``load_web_config`` raises ConfigError, which the
CLI turns into exit 64 before anything touches the kernel.

Order inside a request (``SecurityMiddleware``, plain ASGI): the concurrency limit (503), basic
auth (401), then the /diagnose and /probes restriction (403/401). /healthz is never limited or
authenticated, and /readyz is never authenticated (a kubelet probe carries no credentials;
both say only "ok"/"ready"). Requests over the unix socket (daemon/unixsock.py) skip basic
auth and the restriction: its file mode (0600, root) guards it. Nothing here runs a command or
writes a file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import re
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from dpwatch.daemon.config import ConfigError

# Paths whose answers describe the node in detail: restricted by --restrict-diagnose / token.
RESTRICTED_PREFIXES = ("/diagnose", "/probes")
NO_AUTH_PATHS = frozenset({"/healthz", "/readyz"})
NO_LIMIT_PATHS = frozenset({"/healthz"})
TOKEN_HEADER = "x-dpwatch-token"
# Set in the scope of requests that came over the unix socket (daemon/unixsock.py). Its file
# mode (0600, root) is its access control: basic auth and the /diagnose restriction, which
# guard the TCP port, do not apply to it. The concurrency limit does.
UNIX_PEER = "dpwatch.unix_peer"

_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_CLIENT_AUTH_UNSUPPORTED = ("RequestClientCert", "RequireAnyClientCert")
# The response headers exporter-toolkit lets a web config set.
_ALLOWED_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
                    "X-XSS-Protection", "Strict-Transport-Security")
_BCRYPT_RE = re.compile(r"^\$2[aby]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")


@dataclass
class TLSConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = _TLS_VERSIONS[self.max_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        return ctx


class CertWatcher:
    """Serve a rotated certificate without a restart, as exporter-toolkit does (it reads the
    files on every handshake). check() re-reads the certificate and key, and the client CA
    file, when any of them changed (inode, mtime or size: a rewritten file, or a Kubernetes
    secret volume swapping its ..data symlink) and loads them into the live context, so the
    next handshake uses them. The new pair is first loaded into a scratch context: one that
    does not load (half-written, a key that does not match) is refused and the old pair stays.
    A client CA is added to the trusted ones; a removed CA stays trusted until a restart."""

    def __init__(self, tls: TLSConfig, ctx: ssl.SSLContext):
        self.tls, self.ctx = tls, ctx
        self.stamp = self._stamp()
        self.reloads = 0
        self.errors = 0

    def _stamp(self) -> tuple:
        out = []
        for path in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file):
            try:
                st = os.stat(path) if path else None
                out.append((st.st_ino, st.st_mtime_ns, st.st_size) if st else None)
            except OSError:
                out.append("missing")
        return tuple(out)

    def check(self) -> str | None:
        """None when nothing changed; else "reloaded" or why the new files were refused."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return None
        self.stamp = stamp  # a refused pair is retried only when the files change again
        try:
            self.tls.context()  # the scratch load: raises without touching the live context
            self.ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            if self.tls.client_ca_file:
                self.ctx.load_verify_locations(cafile=self.tls.client_ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.errors += 1
            return f"kept the previous certificate: {exc}"
        self.reloads += 1
        return "reloaded"


@dataclass
class WebConfig:
    path: str = ""
    tls: TLSConfig | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"--web-config-file {path}: {message}")


def _readable(path: str, where: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"{where} must be a file path")
    full = value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(path)), value)
    if not os.path.isfile(full):
        raise _fail(path, f"{where}: {value} does not exist")
    if not os.access(full, os.R_OK):
        raise _fail(path, f"{where}: {value} is not readable")
    return full


def _check_keys(path: str, value, what: str, prefix: str, allowed) -> None:
    """``value`` must be a mapping with only ``allowed`` keys; else ConfigError naming them."""
    if not isinstance(value, dict):
        raise _fail(path, f"{what} must be a mapping")
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise _fail(path, f"{prefix}unknown or unsupported key(s) {', '.join(unknown)}; "
                          f"supported: {', '.join(allowed)}")


def load_web_config(path: str) -> WebConfig:
    """Parse and check a web config file; every problem raises ConfigError naming it."""
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise _fail(path, f"cannot read it: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _fail(path, f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    _check_keys(path, data, "the top level", "", _TOP_KEYS)
    cfg = WebConfig(path=path)
    if data.get("tls_server_config") is not None:
        cfg.tls = _tls_config(path, data["tls_server_config"])
    if data.get("http_server_config") is not None:
        cfg.headers.update(_http_headers(path, data["http_server_config"]))
    if data.get("basic_auth_users") is not None:
        cfg.users.update(_basic_auth_users(path, data["basic_auth_users"]))
    return cfg


def _tls_config(path: str, tls) -> "TLSConfig":
    _check_keys(path, tls, "tls_server_config", "tls_server_config: ", _TLS_KEYS)
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise _fail(path, f"tls_server_config.{key} is required")
    auth = tls.get("client_auth_type") or "NoClientCert"
    if auth in _CLIENT_AUTH_UNSUPPORTED:
        raise _fail(path, f"tls_server_config.client_auth_type {auth} (a client certificate "
                          "without verification) is not supported; use VerifyClientCertIfGiven "
                          "or RequireAndVerifyClientCert")
    if auth not in _CLIENT_AUTH:
        raise _fail(path, f"tls_server_config.client_auth_type {auth!r} is not one of "
                          f"{', '.join(_CLIENT_AUTH)}")
    ca = tls.get("client_ca_file")
    if auth != "NoClientCert" and not ca:
        raise _fail(path, f"tls_server_config.client_ca_file is required with client_auth_type {auth}")
    versions = {}
    for key in ("min_version", "max_version"):
        v = tls.get(key)
        if v is not None and v not in _TLS_VERSIONS:
            raise _fail(path, f"tls_server_config.{key} {v!r} is not one of {', '.join(_TLS_VERSIONS)}")
        versions[key] = v
    t = TLSConfig(cert_file=_readable(path, "tls_server_config.cert_file", tls["cert_file"]),
                  key_file=_readable(path, "tls_server_config.key_file", tls["key_file"]),
                  client_auth_type=auth,
                  client_ca_file=_readable(path, "tls_server_config.client_ca_file", ca) if ca else None,
                  min_version=versions["min_version"] or "TLS12", max_version=versions["max_version"])
    if t.max_version and _TLS_VERSIONS[t.max_version] < _TLS_VERSIONS[t.min_version]:
        raise _fail(path, "tls_server_config.max_version is below min_version")
    try:
        t.context()  # the certificate, the key, that they match, and the CA file
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _fail(path, f"tls_server_config: the certificate/key/CA cannot be loaded: {exc}") from None
    return t


def _http_headers(path: str, http) -> dict[str, str]:
    if not isinstance(http, dict):
        raise _fail(path, "http_server_config must be a mapping")
    headers: dict[str, str] = {}
    for key, value in http.items():
        if key == "http2":
            if value not in (False, None):
                raise _fail(path, "http_server_config.http2: dpwatch serves HTTP/1.1 only; set it to false")
        elif key == "headers":
            if not isinstance(value, dict):
                raise _fail(path, "http_server_config.headers must be a mapping")
            for name, hv in value.items():
                canon = next((h for h in _ALLOWED_HEADERS if h.lower() == str(name).lower()), None)
                if canon is None:
                    raise _fail(path, f"http_server_config.headers: {name} cannot be set; "
                                      f"allowed: {', '.join(_ALLOWED_HEADERS)}")
                if not isinstance(hv, str) or any(c in hv for c in "\r\n\0"):
                    raise _fail(path, f"http_server_config.headers.{name} must be a one-line string")
                headers[canon] = hv
        else:
            raise _fail(path, f"http_server_config: unsupported key {key}; supported: http2, headers")
    return headers


def _basic_auth_users(path: str, users) -> dict[str, bytes]:
    if not isinstance(users, dict):
        raise _fail(path, "basic_auth_users must be a mapping of user name to bcrypt hash")
    out: dict[str, bytes] = {}
    for user, hashed in users.items():
        user = str(user)
        if not user or ":" in user:
            raise _fail(path, f"basic_auth_users: user name {user!r} is empty or has a ':'")
        if not isinstance(hashed, str) or not _BCRYPT_RE.match(hashed):
            raise _fail(path, f"basic_auth_users.{user}: not a bcrypt hash (want $2a$/$2b$/$2y$, "
                              "cost, 53 characters; make one with `htpasswd -nBC 10 \"\" | tr -d ':'`)")
        out[user] = hashed.encode()
    return out


def read_token(value: str, file: str) -> str:
    """The /diagnose token from --diagnose-token or --diagnose-token-file (not both)."""
    if value and file:
        raise ConfigError("--diagnose-token and --diagnose-token-file: give one, not both")
    if file:
        try:
            with open(file, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"--diagnose-token-file {file}: cannot read it: {exc.strerror or exc}") from None
    if value and (len(value) < 16 or not re.fullmatch(r"[\x21-\x7e]+", value)):
        raise ConfigError("--diagnose-token: want at least 16 printable characters, no spaces")
    return value


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


class BasicAuth:
    """bcrypt checks, with a small bounded cache of recent successes (a bcrypt check costs
    ~50 ms at cost 10; Prometheus sends the same credentials every scrape)."""

    CACHE = 64

    def __init__(self, users: dict[str, bytes]):
        self.users = users
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        # Unknown users are checked against this, so they take as long as known ones.
        import bcrypt
        self._dummy = bcrypt.hashpw(b"dpwatch-dummy", bcrypt.gensalt(4))

    @staticmethod
    def parse(header: str | None) -> tuple[str, str] | None:
        if not header or not header[:6].lower() == "basic ":
            return None
        try:
            raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        user, sep, password = raw.partition(":")
        return (user, password) if sep else None

    def check(self, user: str, password: str) -> bool:
        import bcrypt
        key = hashlib.sha256(user.encode() + b"\0" + password.encode()).digest()
        with self._lock:
            if key in self._ok:
                self._ok.move_to_end(key)
                return True
        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                self._ok[key] = None
                while len(self._ok) > self.CACHE:
                    self._ok.popitem(last=False)
        return ok


def _json_response(status: int, message: str, extra: list[tuple[bytes, bytes]] = ()):
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra]
    return status, headers, body


class SecurityMiddleware:
    """Plain ASGI middleware (no request body is ever read here)."""

    def __init__(self, app, web: WebConfig | None = None, max_concurrent: int = 0,
                 restrict_loopback: bool = False, token: str = ""):
        self.app = app
        self.web = web or WebConfig()
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        self.max_concurrent = max_concurrent
        self.restrict_loopback = restrict_loopback
        self.token = token.encode()
        self.in_flight = 0
        self.rejected = 0  # requests refused by the concurrency limit (for tests and logs)
        self._extra = [(k.lower().encode(), v.encode()) for k, v in self.web.headers.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limited = self.max_concurrent > 0 and path not in NO_LIMIT_PATHS
        if limited and self.in_flight >= self.max_concurrent:
            self.rejected += 1
            return await self._reply(send, *_json_response(
                503, f"too many concurrent requests (limit {self.max_concurrent}); retry",
                [(b"retry-after", b"1")]))
        if limited:
            self.in_flight += 1
        try:
            denied = await self._deny(scope, path)
            if denied is not None:
                return await self._reply(send, *denied)
            await self.app(scope, receive, self._with_headers(send))
        finally:
            if limited:
                self.in_flight -= 1

    def _with_headers(self, send):
        if not self._extra:
            return send

        async def wrapped(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + self._extra
            await send(message)
        return wrapped

    async def _reply(self, send, status, headers, body):
        await send({"type": "http.response.start", "status": status, "headers": headers + self._extra})
        await send({"type": "http.response.body", "body": body})

    async def _deny(self, scope, path: str):
        if scope.get(UNIX_PEER):
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.auth is not None and path not in NO_AUTH_PATHS:
            creds = BasicAuth.parse(headers.get("authorization"))
            ok = False
            if creds is not None:
                from anyio import to_thread
                ok = await to_thread.run_sync(self.auth.check, *creds)
            if not ok:
                return _json_response(401, "authentication required (basic auth)",
                                      [(b"www-authenticate", b'Basic realm="dpwatch"')])
        if path.startswith(RESTRICTED_PREFIXES) and (self.restrict_loopback or self.token):
            client = scope.get("client") or (None, None)
            if self.restrict_loopback and is_loopback(client[0]):
                return None
            if self.token:
                given = headers.get(TOKEN_HEADER, "")
                auth = headers.get("authorization", "")
                if not given and auth[:7].lower() == "bearer ":
                    given = auth[7:].strip()
                if given and hmac.compare_digest(given.encode(), self.token):
                    return None
                return _json_response(401, f"{path} needs a token (header X-Dpwatch-Token or "
                                           "Authorization: Bearer)",
                                      [(b"www-authenticate", b'Bearer realm="dpwatch"')])
            return _json_response(403, f"{path} is served to loopback clients only "
                                       "(--restrict-diagnose loopback)")
        return None
