"""End-to-end: HTTP hardening of the real daemon, with real TLS handshakes and real clients
(curl and httpx/ssl) in a netns the test makes. A throw-away CA is made with `cryptography`.

- TLS + basic auth from a web config file (exporter-toolkit format): curl with the CA and the
  right password gets metrics; no password, a wrong one, the wrong CA, plain HTTP and a TLS 1.2
  client against min_version TLS13 are all refused; /healthz needs no password.
- Client certificates (RequireAndVerifyClientCert): only a certificate from the CA gets in.
- /diagnose and /probes behind loopback-or-token, reached from a pod netns (a remote client).
- The concurrency limit: a response held open by a client that does not read fills the limit;
  the next request gets 503 until that one is read.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time

import bcrypt
import httpx
import pytest

from netlab import Lab, in_netns
from test_daemon_e2e import DaemonProc
from tlsca import TestCA

# TLS, auth and limits are HTTP behaviour only: not rerun in the 6.1 guest (make test-kernels).
pytestmark = pytest.mark.host_only

PASSWORD = "correct horse battery"
TOKEN = "e2e-token-6f1d2c9a8b7e"


class TLSDaemon(DaemonProc):
    """DaemonProc whose readiness is checked over HTTPS with the test CA."""

    def __init__(self, dpwatch_bin, ns, port, ca_file, *extra, client=None):
        self.ca_file, self.client = ca_file, client
        super().__init__(dpwatch_bin, ns, port, *extra)

    def get(self, path, headers=None):
        def go():
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.client:
                ctx.load_cert_chain(*self.client)
            try:
                with httpx.Client(verify=ctx, timeout=30) as c:
                    r = c.get(f"https://127.0.0.1:{self.port}{path}", headers=headers or {})
                    return r.status_code, dict(r.headers), r.text
            except httpx.TransportError as exc:  # not up yet: wait_ready retries on OSError
                raise OSError(str(exc)) from exc
        return in_netns(self.ns, go)


def curl(ns: str, *args: str) -> tuple[int, int, str]:
    """(curl exit code, HTTP status or 0, body)."""
    res = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "20",
                          "-o", "/dev/stdout", "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=60)
    body, _, code = res.stdout.rpartition("\n")
    return res.returncode, int(code or 0), body


@pytest.fixture(scope="module")
def net():
    with Lab(pods=1) as lab:
        yield lab


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA(str(d))
    server = ca.issue("server", "localhost")
    client = ca.issue("client", "prometheus", server=False)
    rogue_dir = d / "rogue"
    rogue_dir.mkdir()
    rogue = TestCA(str(rogue_dir), name="rogue CA")
    rogue_client = rogue.issue("client", "prometheus", server=False)
    return {"dir": d, "ca": ca, "server": server, "client": client, "rogue": rogue,
            "rogue_client": rogue_client}


def web_config(pki, body: str) -> str:
    path = pki["dir"] / f"web-{abs(hash(body))}.yml"
    path.write_text(body)
    return str(path)


def test_tls_and_basic_auth_with_curl_and_httpx(net, pki, dpwatch_bin):
    cert, key = pki["server"]
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    cfg = web_config(pki, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                          f"  min_version: TLS13\n"
                          f"http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
                          f"basic_auth_users:\n  prometheus: {hashed}\n")
    port = 9411
    d = TLSDaemon(dpwatch_bin, net.node, port, pki["ca"].ca_file, "--probes", "drops",
                  "--web-config-file", cfg)
    try:
        # /readyz and /healthz need no password (kubelet probes carry none).
        d.wait_ready()
        url = f"https://127.0.0.1:{port}"
        ca = ["--cacert", pki["ca"].ca_file]
        rc, status, body = curl(net.node, *ca, "-u", f"prometheus:{PASSWORD}", f"{url}/metrics")
        assert (rc, status) == (0, 200) and 'dpwatch_probe_up{mode="tracepoint",probe="drops"} 1.0' in body
        rc, status, body = curl(net.node, *ca, f"{url}/metrics")
        assert status == 401 and "authentication required" in json.loads(body)["error"]
        assert curl(net.node, *ca, "-u", "prometheus:wrong", f"{url}/metrics")[1] == 401
        assert curl(net.node, *ca, "-u", f"nobody:{PASSWORD}", f"{url}/diagnose")[1] == 401
        assert curl(net.node, *ca, f"{url}/healthz")[1] == 200
        # The security header from the web config is on every answer.
        res = subprocess.run(["ip", "netns", "exec", net.node, "curl", "-sS", "-D", "-", "-o", "/dev/null",
                              *ca, f"{url}/healthz"], capture_output=True, text=True, timeout=60)
        assert "x-content-type-options: nosniff" in res.stdout.lower()
        # Without the CA, curl refuses the certificate (exit 60); plain HTTP gets no answer.
        rc, status, _ = curl(net.node, "-u", f"prometheus:{PASSWORD}", f"{url}/metrics")
        assert rc == 60 and status == 0
        rc, status, _ = curl(net.node, f"http://127.0.0.1:{port}/healthz")
        assert status == 0 and rc != 0

        # httpx with the CA: TLS 1.3 negotiated; a client capped at TLS 1.2 fails the handshake.
        def hx():
            ctx = ssl.create_default_context(cafile=pki["ca"].ca_file)
            with httpx.Client(verify=ctx, auth=("prometheus", PASSWORD), timeout=30) as c:
                r = c.get(f"{url}/probes")
                version = r.extensions["network_stream"].get_extra_info("ssl_object").version()
            old = ssl.create_default_context(cafile=pki["ca"].ca_file)
            old.maximum_version = ssl.TLSVersion.TLSv1_2
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with old.wrap_socket(raw, server_hostname="localhost"):
                        pass
                refused = None
            except ssl.SSLError as exc:  # an alert, or the server closing the handshake
                refused = type(exc).__name__
            return r.status_code, r.json(), version, refused
        status, probes, version, refused = in_netns(net.node, hx)
        assert status == 200 and probes["probes"][0]["name"] == "drops"
        assert version == "TLSv1.3"
        assert refused is not None  # e.g. SSLZeroReturnError
    finally:
        assert d.stop() == 0


def test_rotated_certificate_is_served_without_a_restart(net, pki, dpwatch_bin, tmp_path):
    """cert-manager style rotation: new files renamed over the served ones. The running daemon
    serves the new certificate within its 5 s check; a new certificate with a key that does not
    match is refused (the previous one stays, an error is logged) and the daemon keeps serving."""
    ca = pki["ca"]
    first, second, third = (ca.issue(f"rot{i}", "localhost") for i in range(3))
    live_crt, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(crt: str, key: str) -> None:
        for src, dst in ((crt, live_crt), (key, live_key)):
            new = dst.with_suffix(".new")
            new.write_bytes(open(src, "rb").read())
            os.replace(new, dst)

    def served() -> bytes:
        def go():
            ctx = ssl.create_default_context(cafile=ca.ca_file)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    return s.getpeercert(binary_form=True)
        return in_netns(net.node, go)

    def der(cert_file: str) -> bytes:
        return ssl.PEM_cert_to_DER_cert(open(cert_file).read())

    def wait_for(cert_file: str) -> float:
        t0 = time.monotonic()
        while served() != der(cert_file):
            assert time.monotonic() - t0 < 30, "the rotated certificate is not served"
            time.sleep(0.5)
        return time.monotonic() - t0

    install(*first)
    cfg = web_config(pki, f"tls_server_config:\n  cert_file: {live_crt}\n  key_file: {live_key}\n")
    port = 9415
    d = TLSDaemon(dpwatch_bin, net.node, port, ca.ca_file, "--probes", "drops", "--web-config-file", cfg)
    try:
        d.wait_ready()
        assert served() == der(first[0])
        install(*second)
        wait_for(second[0])
        install(third[0], second[1])  # a certificate whose key is not there yet
        deadline = time.monotonic() + 30
        while "does not load" not in d.output():
            assert time.monotonic() < deadline, d.output()[-2000:]
            time.sleep(0.5)
        assert served() == der(second[0])
        assert d.get("/metrics")[0] == 200
        install(*third)  # the key arrives
        wait_for(third[0])
    finally:
        assert d.stop() == 0


def test_client_certificates_required(net, pki, dpwatch_bin):
    cert, key = pki["server"]
    cfg = web_config(pki, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                          f"  client_auth_type: RequireAndVerifyClientCert\n"
                          f"  client_ca_file: {pki['ca'].ca_file}\n")
    port = 9412
    d = TLSDaemon(dpwatch_bin, net.node, port, pki["ca"].ca_file, "--probes", "drops",
                  "--web-config-file", cfg, client=pki["client"])
    try:
        d.wait_ready()
        url = f"https://127.0.0.1:{port}/metrics"
        ca = ["--cacert", pki["ca"].ca_file]
        ccert, ckey = pki["client"]
        rc, status, body = curl(net.node, *ca, "--cert", ccert, "--key", ckey, url)
        assert (rc, status) == (0, 200) and "dpwatch_build_info" in body
        rc, status, _ = curl(net.node, *ca, url)  # no client certificate
        assert status == 0 and rc != 0
        rcert, rkey = pki["rogue_client"]
        rc, status, _ = curl(net.node, *ca, "--cert", rcert, "--key", rkey, url)  # wrong CA
        assert status == 0 and rc != 0
    finally:
        assert d.stop() == 0


def test_diagnose_loopback_or_token_from_a_pod(net, dpwatch_bin):
    port = 9413
    d = DaemonProc(dpwatch_bin, net.node, port, "--probes", "drops", "--listen", f"0.0.0.0:{port}",
                   "--restrict-diagnose", "loopback", "--diagnose-token", TOKEN)
    try:
        d.wait_ready()
        pod, node = net.pod.ns, f"http://{net.pod.node_ip4}:{port}"
        rc, status, body = curl(pod, f"{node}/diagnose")
        assert status == 401 and "needs a token" in json.loads(body)["error"]
        assert curl(pod, f"{node}/probes")[1] == 401
        assert curl(pod, "-H", "X-Dpwatch-Token: wrong-token-000000", f"{node}/probes")[1] == 401
        rc, status, body = curl(pod, "-H", f"X-Dpwatch-Token: {TOKEN}", f"{node}/diagnose?format=json")
        assert status == 200 and json.loads(body)["status"] in ("ok", "warning", "critical")
        assert curl(pod, "-H", f"Authorization: Bearer {TOKEN}", f"{node}/probes")[1] == 200
        assert curl(pod, f"{node}/metrics")[1] == 200  # metrics stay open to the scraper
        # Spoofed forwarding headers do not make a pod local.
        assert curl(pod, "-H", "X-Forwarded-For: 127.0.0.1", f"{node}/diagnose")[1] == 401
        # From the node's loopback: no token needed.
        assert curl(net.node, f"http://127.0.0.1:{port}/diagnose")[1] == 200
    finally:
        assert d.stop() == 0


def test_loopback_only_refuses_a_pod(net, dpwatch_bin):
    port = 9414
    d = DaemonProc(dpwatch_bin, net.node, port, "--probes", "drops", "--listen", f"0.0.0.0:{port}",
                   "--restrict-diagnose", "loopback")
    try:
        d.wait_ready()
        rc, status, body = curl(net.pod.ns, f"http://{net.pod.node_ip4}:{port}/diagnose")
        assert status == 403 and "loopback" in json.loads(body)["error"]
        assert curl(net.node, f"http://127.0.0.1:{port}/probes")[1] == 200
    finally:
        assert d.stop() == 0


def test_concurrency_limit_with_a_client_that_does_not_read(net, dpwatch_bin):
    """--max-concurrent-requests 1 and a /metrics of ~300k series (~15 MB). Client A asks and
    does not read: its response cannot be written out, so it stays in flight. Client B gets
    503 with Retry-After until A reads its whole answer; then B is served."""
    port = 9415
    d = DaemonProc(dpwatch_bin, net.node, port, "--probes", "drops", "--max-concurrent-requests", "1",
                   "--synthetic-series", "300000")
    try:
        d.wait_ready()

        def go():
            a = socket.socket()
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            a.connect(("127.0.0.1", port))
            a.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            seen, deadline = [], time.monotonic() + 120
            while time.monotonic() < deadline:
                with httpx.Client(timeout=30) as c:
                    r = c.get(f"http://127.0.0.1:{port}/readyz")
                seen.append(r.status_code)
                if r.status_code == 503 and "too many concurrent requests" in r.text:
                    retry = r.headers.get("retry-after")
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"never limited: {seen[-5:]}")
            with httpx.Client(timeout=30) as c:
                health = c.get(f"http://127.0.0.1:{port}/healthz").status_code
            data = bytearray()
            while True:
                chunk = a.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            a.close()
            with httpx.Client(timeout=60) as c:
                after = c.get(f"http://127.0.0.1:{port}/readyz").status_code
            return retry, health, bytes(data), after
        retry, health, data, after = in_netns(net.node, go)
        assert retry == "1"
        assert health == 200  # /healthz is never limited
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert sum(1 for ln in body.split(b"\n") if ln.startswith(b"dpwatch_synthetic_series{")) == 300000
        assert after == 200
    finally:
        assert d.stop() == 0
