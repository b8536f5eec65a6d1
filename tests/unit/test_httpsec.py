"""Unit tests for daemon/httpsec.py: the web config file (exporter-toolkit format) and its
errors (exit 64 through the CLI), and the security middleware on a real ASGI app driven in
process by httpx: basic auth, the /diagnose token, loopback-only, the concurrency limit and
headers. Real TLS handshakes and clients are in tests/e2e/test_security_e2e.py."""

from __future__ import annotations

import ast
import asyncio
import base64
import os
import pathlib

import bcrypt
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dpwatch.daemon import cli
from dpwatch.daemon.config import ConfigError
from dpwatch.daemon.httpsec import SecurityMiddleware, WebConfig, is_loopback, load_web_config, read_token
from tlsca import TestCA

REPO = pathlib.Path(__file__).resolve().parents[2]
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
TOKEN = "t0ken-0123456789abcdef"


@pytest.fixture
def tls_files(tmp_path):
    ca = TestCA(str(tmp_path))
    cert, key = ca.issue("server", "localhost")
    return ca, cert, key


def write(tmp_path, text: str) -> str:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


# ---- the file --------------------------------------------------------------------------------

def test_full_config_parses(tmp_path, tls_files):
    ca, cert, key = tls_files
    path = write(tmp_path, f"""
tls_server_config:
  cert_file: {cert}
  key_file: server.key          # relative to the file, as exporter-toolkit does
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {ca.ca_file}
  min_version: TLS13
http_server_config:
  headers:
    strict-transport-security: max-age=63072000
basic_auth_users:
  prometheus: {HASH}
""")
    web = load_web_config(path)
    assert web.tls.key_file == key and web.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert web.tls.context().minimum_version.name == "TLSv1_3"
    assert web.users == {"prometheus": HASH.encode()}
    assert web.headers == {"Strict-Transport-Security": "max-age=63072000"}


def test_empty_file_means_nothing_configured(tmp_path):
    web = load_web_config(write(tmp_path, ""))
    assert web.tls is None and web.users == {} and web.headers == {}


@pytest.mark.parametrize("body, needle", [
    ("tls_server_config: [a, b", "not valid YAML at line"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("tls_config: {}\n", "unknown or unsupported key(s) tls_config"),
    ("tls_server_config:\n  key_file: KEY\n", "tls_server_config.cert_file is required"),
    ("tls_server_config:\n  cert_file: /nonexistent/x.crt\n  key_file: KEY\n", "/nonexistent/x.crt does not exist"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: CERT\n", "cannot be loaded"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "unsupported key(s) cipher_suites"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  client_auth_type: RequestClientCert\n",
     "RequestClientCert (a client certificate without verification) is not supported"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  client_auth_type: Sometimes\n",
     "'Sometimes' is not one of"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  client_auth_type: RequireAndVerifyClientCert\n",
     "client_ca_file is required"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  min_version: SSL3\n", "min_version 'SSL3'"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  min_version: TLS13\n  max_version: TLS12\n",
     "max_version is below min_version"),
    ("basic_auth_users:\n  alice: plaintext-password\n", "basic_auth_users.alice: not a bcrypt hash"),
    ("basic_auth_users:\n  alice: $1$abc$def\n", "not a bcrypt hash"),
    ("basic_auth_users: [alice]\n", "basic_auth_users must be a mapping"),
    ("http_server_config:\n  http2: true\n", "HTTP/1.1 only"),
    ("http_server_config:\n  headers: {Set-Cookie: a=b}\n", "Set-Cookie cannot be set"),
    ("http_server_config:\n  headers: {X-Frame-Options: [a]}\n", "must be a one-line string"),
])
def test_bad_files_name_the_problem(tmp_path, tls_files, body, needle):
    _ca, cert, key = tls_files
    path = write(tmp_path, body.replace("CERT", cert).replace("KEY", key))
    with pytest.raises(ConfigError) as err:
        load_web_config(path)
    assert needle in str(err.value)
    assert str(err.value).startswith(f"--web-config-file {path}: ")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_web_config(str(tmp_path / "nope.yml"))


@pytest.mark.parametrize("argv, needle", [
    (["--web-config-file", "/nonexistent/web.yml"], "cannot read it"),
    (["--web-config-file", "BAD"], "not a bcrypt hash"),
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests: 0 is outside"),
    (["--max-series-per-metric", "0"], "--max-series-per-metric: 0 is outside"),
    (["--diagnose-token", "short"], "at least 16 printable"),
    (["--diagnose-token", TOKEN, "--diagnose-token-file", "/etc/hostname"], "give one, not both"),
    (["--diagnose-token-file", "/nonexistent/token"], "cannot read it"),
    (["--restrict-diagnose", "lan"], "invalid choice: 'lan'"),
    (["--drops-other-entries", "0"], "--drops-other-entries: 0 is outside 1..65536"),
])
def test_cli_exits_64_naming_the_problem(tmp_path, capsys, argv, needle):
    bad = write(tmp_path, "basic_auth_users:\n  bob: hunter2\n")
    argv = [bad if a == "BAD" else a for a in argv]
    assert cli.main(["run", "--listen", "127.0.0.1:0", *argv]) == 64
    assert needle in capsys.readouterr().err


def test_env_twin_is_validated(monkeypatch, capsys):
    monkeypatch.setenv("DPWATCH_RESTRICT_DIAGNOSE", "everyone")
    assert cli.main(["run", "--listen", "127.0.0.1:0"]) == 64
    assert "--restrict-diagnose: 'everyone'" in capsys.readouterr().err


def test_token_from_file(tmp_path):
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    assert read_token("", str(p)) == TOKEN
    assert read_token("", "") == ""


@pytest.mark.parametrize("host, want", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                        ("::ffff:127.0.0.1", True), ("198.18.0.2", False),
                                        ("fd00:d9::2", False), ("localhost", False), (None, False)])
def test_is_loopback(host, want):
    assert is_loopback(host) is want


# ---- the middleware, in process ----------------------------------------------------------------

def make_app(gate: asyncio.Event | None = None, **kw) -> tuple[Starlette, list]:
    started: list = []

    async def slow(_request):
        started.append(1)
        if gate is not None:
            await gate.wait()
        return PlainTextResponse("done")

    async def text(_request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(p, text) for p in ("/metrics", "/diagnose", "/probes", "/healthz",
                                                     "/readyz", "/diagnose/x")]
                    + [Route("/slow", slow)])
    return SecurityMiddleware(app, **kw), started


def get(app, path, client=("198.18.0.2", 40000), headers=None):
    async def go():
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://dpwatch") as c:
            return await c.get(path, headers=headers or {})
    return asyncio.run(go())


def basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_basic_auth():
    app, _ = make_app(web=WebConfig(users={"prom": HASH.encode()}))
    r = get(app, "/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="dpwatch"'
    assert r.json()["error"].startswith("authentication required")
    assert get(app, "/metrics", headers=basic("prom", "wrong")).status_code == 401
    assert get(app, "/metrics", headers=basic("nobody", "s3cret")).status_code == 401
    assert get(app, "/metrics", headers={"Authorization": "Basic !!notbase64"}).status_code == 401
    assert get(app, "/metrics", headers=basic("prom", "s3cret")).status_code == 200
    assert get(app, "/metrics", headers=basic("prom", "s3cret")).status_code == 200  # cached
    assert get(app, "/healthz").status_code == 200 and get(app, "/readyz").status_code == 200


def test_loopback_restriction():
    app, _ = make_app(restrict_loopback=True)
    for path in ("/diagnose", "/probes", "/diagnose/x"):
        r = get(app, path)
        assert r.status_code == 403 and "loopback" in r.json()["error"]
        assert get(app, path, client=("127.0.0.1", 1)).status_code == 200
        assert get(app, path, client=("::1", 1)).status_code == 200
    assert get(app, "/metrics").status_code == 200  # /metrics stays open
    # A forwarded-for header never makes a remote client local.
    assert get(app, "/diagnose", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 403


def test_token_restriction():
    app, _ = make_app(token=TOKEN)
    r = get(app, "/diagnose")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert get(app, "/diagnose", headers={"X-Dpwatch-Token": TOKEN}).status_code == 200
    assert get(app, "/probes", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert get(app, "/probes", headers={"X-Dpwatch-Token": TOKEN[:-1]}).status_code == 401
    assert get(app, "/diagnose", client=("127.0.0.1", 1)).status_code == 401  # token wins without loopback
    assert get(app, "/metrics").status_code == 200


def test_loopback_or_token():
    app, _ = make_app(restrict_loopback=True, token=TOKEN)
    assert get(app, "/diagnose", client=("127.0.0.1", 1)).status_code == 200
    assert get(app, "/diagnose", headers={"X-Dpwatch-Token": TOKEN}).status_code == 200
    assert get(app, "/diagnose").status_code == 401


def test_basic_auth_and_token_together():
    app, _ = make_app(web=WebConfig(users={"prom": HASH.encode()}), token=TOKEN)
    assert get(app, "/diagnose", headers={"X-Dpwatch-Token": TOKEN}).status_code == 401  # no basic auth
    assert get(app, "/diagnose", headers=basic("prom", "s3cret")).status_code == 401    # no token
    both = {**basic("prom", "s3cret"), "X-Dpwatch-Token": TOKEN}
    assert get(app, "/diagnose", headers=both).status_code == 200


def test_concurrency_limit_is_exact():
    """Two requests held open inside the app fill a limit of 2: the third gets 503, /healthz
    still answers, and once they finish a new request is served."""
    async def go():
        gate = asyncio.Event()
        app, started = make_app(gate=gate, max_concurrent=2)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://dpwatch") as c:
            held = [asyncio.create_task(c.get("/slow")) for _ in range(2)]
            while len(started) < 2:
                await asyncio.sleep(0.01)
            third = await c.get("/metrics")
            health = await c.get("/healthz")
            gate.set()
            done = await asyncio.gather(*held)
            after = await c.get("/metrics")
        return app, third, health, done, after
    app, third, health, done, after = asyncio.run(go())
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert "limit 2" in third.json()["error"]
    assert health.status_code == 200
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert app.rejected == 1 and app.in_flight == 0


def test_configured_headers_on_every_answer():
    app, _ = make_app(web=WebConfig(users={"prom": HASH.encode()},
                                    headers={"X-Frame-Options": "DENY"}))
    assert get(app, "/metrics").headers["x-frame-options"] == "DENY"  # the 401 too
    assert get(app, "/metrics", headers=basic("prom", "s3cret")).headers["x-frame-options"] == "DENY"


# ---- the real app: read-only routes, no shell ---------------------------------------------------

def test_every_route_is_read_only():
    from dpwatch.daemon.app import create_app
    from fakes import FakeFeatures, FakeManager
    from dpwatch.daemon.config import Config

    class _D:
        config, features, ready = Config(), FakeFeatures(), True
        manager = FakeManager({}, config=config)
    app = create_app(_D())
    paths = {}
    for route in app.routes:
        if getattr(route, "methods", None):
            paths[route.path] = route.methods
    assert set(paths) >= {"/", "/metrics", "/diagnose", "/probes", "/healthz", "/readyz", "/openapi.json"}
    assert all(m <= {"GET", "HEAD"} for m in paths.values()), paths
    assert "/docs" not in paths and "/redoc" not in paths


def test_no_shell_anywhere_in_the_daemon():
    """No request data can reach a shell if nothing in the daemon runs one: no shell=True,
    os.system, os.popen or os.exec* in daemon/ or probes/ (a subprocess with an argv list is
    allowed; none is reached from a request handler)."""
    offenders = []
    for path in list((REPO / "daemon").glob("*.py")) + list((REPO / "probes").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("system", "popen", "execv", "execvp", "execl", "execlp", "spawnl", "getoutput",
                            "getstatusoutput"):
                    offenders.append(f"{path.name}:{node.lineno} {name}")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{path.name}:{node.lineno} shell=")
    assert offenders == []
    # The request path (app, middleware, collector, report) imports no subprocess and opens
    # files for reading only.
    for name in ("app.py", "httpsec.py", "collector.py", "limits.py", "apimodels.py", *(f"triage/{p.name}" for p in (REPO / "daemon" / "triage").glob("*.py"))):
        tree = ast.parse((REPO / "daemon" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "subprocess" not in mods, name
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open":
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                assert mode is None or (isinstance(mode, ast.Constant) and set(mode.value) <= set("rbt")), \
                    f"{name}:{node.lineno} opens a file for writing"


# -- certificate rotation ------------------------------------------------------------------------

def _served_cert(ctx, ca_file: str) -> bytes:
    """One real TLS handshake over a socketpair against ``ctx``: the server's certificate (DER)."""
    import socket
    import ssl
    import threading
    a, b = socket.socketpair()
    err: list = []

    def serve():
        try:
            with ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            err.append(exc)
    t = threading.Thread(target=serve)
    t.start()
    client = ssl.create_default_context(cafile=ca_file)
    with client.wrap_socket(b, server_hostname="localhost") as c:
        der = c.getpeercert(binary_form=True)
        c.sendall(b"x")
    t.join(10)
    assert not err, err
    return der


def _der(cert_file: str) -> bytes:
    import ssl
    return ssl.PEM_cert_to_DER_cert(pathlib.Path(cert_file).read_text())


def test_rotated_certificate_is_served_and_a_bad_pair_is_refused(tmp_path):
    from dpwatch.daemon.httpsec import CertWatcher, TLSConfig
    ca = TestCA(str(tmp_path))
    first, second, third = ca.issue("a", "localhost"), ca.issue("b", "localhost"), ca.issue("c", "localhost")
    live_crt, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(crt: str, key: str) -> None:  # as a secret update does: new files renamed in
        for src, dst in ((crt, live_crt), (key, live_key)):
            tmp = dst.with_suffix(".new")
            tmp.write_bytes(pathlib.Path(src).read_bytes())
            os.replace(tmp, dst)

    install(*first)
    tls = TLSConfig(cert_file=str(live_crt), key_file=str(live_key))
    ctx = tls.context()
    w = CertWatcher(tls, ctx)
    assert w.check() is None and _served_cert(ctx, ca.ca_file) == _der(first[0])
    install(*second)
    assert w.check() == "reloaded" and w.reloads == 1
    assert _served_cert(ctx, ca.ca_file) == _der(second[0])
    assert w.check() is None  # nothing changed since
    install(third[0], second[1])  # the new certificate with the old key: does not match
    what = w.check()
    assert what.startswith("kept the previous certificate") and w.errors == 1, what
    assert _served_cert(ctx, ca.ca_file) == _der(second[0])
    live_key.unlink()  # half-way through a rotation: one file missing
    assert w.check().startswith("kept the previous certificate") and w.errors == 2
    assert _served_cert(ctx, ca.ca_file) == _der(second[0])
    install(*third)  # the rotation completes
    assert w.check() == "reloaded" and _served_cert(ctx, ca.ca_file) == _der(third[0])
