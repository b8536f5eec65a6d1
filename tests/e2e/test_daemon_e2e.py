"""End-to-end tier: the real `dpwatch run` process in a "node" netns, real traffic from a
"pod" netns over veth, and HTTP requests to /metrics, /diagnose, /probes, /healthz, /readyz."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from typing import Callable

import pytest

from netlab import Lab, closed_udp_port, drain, http_get, in_netns, sh, socket_in, udp_send

PORT = 9400


class DaemonProc:
    """`dpwatch run` in netns ``ns`` (None: the test's own netns) on 127.0.0.1:``port``, with a
    1 s snapshot interval, its unix socket at ``socket_path`` (its own, not the default one a
    one-shot `dpwatch diagnose` would ask) and ``extra`` flags. ``wrap`` rewrites the command
    before it runs (e.g. under capsh). stop() sends SIGTERM and returns the exit code."""

    def __init__(self, dpwatch_bin: str, ns: str | None, port: int = PORT, *extra: str,
                 wrap: Callable[[list[str]], list[str]] | None = None):
        self.ns, self.port = ns, port
        self.log = open(f"/tmp/dpwatch-e2e-{ns or 'host'}-{port}.log", "w+")
        self.socket_path = f"/tmp/dpwatch-e2e-{ns or 'host'}-{port}.sock"
        cmd = [dpwatch_bin, "run", "--listen", f"127.0.0.1:{port}", "--snapshot-interval", "1s",
               "--unix-socket", self.socket_path, *extra]
        cmd = wrap(cmd) if wrap else cmd
        self.proc = subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, headers: dict | None = None):
        return http_get(self.ns, "127.0.0.1", self.port, path, headers)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """Everything the daemon wrote so far (also after stop())."""
        if not self.log.closed:
            self.log.flush()
        with open(self.log.name, errors="replace") as fh:
            return fh.read()

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start_diagnose(argv: list[str]) -> subprocess.Popen:
    """Start a `dpwatch diagnose` command line and return once its probes are loaded and the
    watch has begun (compile time varies a lot: ~1.5 s here, ~35 s in an emulated guest
    kernel). Its stdout (the report) and the rest of stderr are left to communicate()."""
    # One-shot even while a daemon serves on the default unix socket.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DPWATCH_UNIX_SOCKET": ""})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "watching for" in line:
            return proc
    raise AssertionError("diagnose never started watching:\n" + "".join(seen))


# Loopback is not tracked, so the test's own HTTP to the daemon still works while the table
# is full (a full table refuses every new tracked connection, the daemon's included).
NFT_RULES = """table inet dpwtest {
  chain raw_out {
    type filter hook output priority raw;
    oif lo notrack
  }
  chain raw_pre {
    type filter hook prerouting priority raw;
    iif lo notrack
  }
  chain input {
    type filter hook input priority 0;
    ct state new,established accept
  }
}
"""


@pytest.fixture(scope="module")
def net():
    with Lab(pods=1) as lab:
        sh("nft", "-f", "-", ns=lab.node, input=NFT_RULES)  # conntrack on in the node netns
        yield lab


@pytest.fixture(scope="module")
def daemon(net, dpwatch_bin):
    d = DaemonProc(dpwatch_bin, net.node)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_no_socket_drops_counted_over_http(daemon, net):
    status, headers, text = daemon.get("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    before = metric(text, "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv4")
    port = closed_udp_port(net.node)
    sent = udp_send(net.pod.ns, net.pod.node_ip4, port, 300)
    time.sleep(0.3)
    after = metric(daemon.get("/metrics")[2], "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv4")
    assert sent == 300
    assert 300 <= after - before <= 320


def test_metrics_without_redirect_and_promtool(daemon):
    status, headers, text = daemon.get("/metrics")
    assert status == 200  # served at /metrics itself, not a redirect to /metrics/
    assert 'dpwatch_probe_up{mode="tracepoint",probe="drops"} 1.0' in text
    assert re.search(r'dpwatch_build_info\{kernel="[^"]+",version="[^"]+"\} 1\.0', text)
    # No _created series (a metric may still have "created" in its name, e.g. fragments_created_total).
    assert not re.search(r"^\S+_created[ {]", text, re.M)
    res = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_rcvbuf_finding_in_text_and_json(daemon, net):
    rx = socket_in(net.node, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        in_netns(net.node, lambda: rx.bind((net.pod.node_ip4, 0)))
        sent = udp_send(net.pod.ns, net.pod.node_ip4, rx.getsockname()[1], 3000, payload=b"q" * 512)
        queued = drain(rx)
    finally:
        rx.close()
    expected = sent - queued
    time.sleep(0.2)

    status, headers, body = daemon.get("/diagnose?window=5m")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert "drops.socket_receive_buffer" in body
    assert "STATUS: " in body
    assert "$ sysctl -w net.core.rmem_max=" in body

    status, headers, body = daemon.get("/diagnose?window=5m", {"Accept": "application/json"})
    assert status == 200 and headers["content-type"].startswith("application/json")
    report = json.loads(body)
    assert set(report) >= {"node", "kernel", "generated_at", "window_seconds", "status", "findings", "probes"}
    assert report["status"] in ("warning", "critical")
    ids = [f["id"] for f in report["findings"]]
    assert "drops.socket_receive_buffer" in ids
    f = report["findings"][ids.index("drops.socket_receive_buffer")]
    assert f["severity"] in ("warning", "critical") and f["probe"] == "drops"
    assert f["evidence"]["drops"] >= expected  # earlier tests' drops may be in the window too
    assert f["evidence"]["by_protocol"]["ipv4"] == f["evidence"]["drops"]
    assert any(r.startswith("sysctl -w net.core.rmem_max=") for r in f["remediation"])
    assert f["evidence"]["top_locations"] and f["evidence"]["top_locations"][0]["reason"] == "SOCKET_RCVBUFF"
    # The most specific, most actionable finding is first: ranked by score (severity plus
    # log10 of the events per second it explains), and info never above a warning.
    scores = [x["score"] for x in report["findings"]]
    assert scores == sorted(scores, reverse=True)
    sev = {"info": 0, "warning": 1, "critical": 2}
    infos = [i for i, x in enumerate(report["findings"]) if sev[x["severity"]] == 0]
    assert all(i > j for i in infos for j, x in enumerate(report["findings"]) if sev[x["severity"]] > 0)
    assert report["findings"][0]["id"] == "drops.socket_receive_buffer"

    # Same via ?format=json, and the window is real: at most what the daemon has been up.
    status, _, body = daemon.get("/diagnose?format=json&window=30s")
    assert status == 200
    assert 0 < json.loads(body)["window_seconds"] <= 31


@pytest.mark.parametrize("query", ["window=abc", "window=-5s", "window=10y", "format=xml",
                                   "window=0s", "window=2h", "window=", "window=5m&format=yaml"])
def test_bad_parameters_get_4xx(daemon, query):
    status, headers, body = daemon.get(f"/diagnose?{query}")
    if query == "window=":
        assert status == 200  # empty means the default window
        return
    assert 400 <= status < 500, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]


def test_probes_health_and_ready(daemon):
    status, _, body = daemon.get("/probes")
    assert status == 200
    data = json.loads(body)
    drops = next(p for p in data["probes"] if p["name"] == "drops")
    assert drops["state"] == "attached" and drops["mode"] == "tracepoint"
    assert drops["hooks"] == ["tracepoint:skb:kfree_skb", "tracepoint_field:skb:kfree_skb:reason"]
    assert drops["info"]["reason_name_source"].startswith("tracefs")
    assert data["features"]["kfree_skb_reason"] is True
    assert daemon.get("/healthz")[0] == 200
    assert daemon.get("/readyz")[0] == 200
    assert daemon.get("/nope")[0] == 404


def _dpwatch_prog_count() -> int:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=30)
    progs = json.loads(out.stdout or "[]")
    # BCC names a tracepoint program after its function minus the "tracepoint__" prefix.
    return sum(1 for p in progs if p.get("name") == "skb__kfree_skb" and p.get("type") == "tracepoint")


def test_sigterm_exits_zero_and_detaches(net, dpwatch_bin, daemon):
    before = _dpwatch_prog_count()
    d = DaemonProc(dpwatch_bin, net.node, PORT + 1)
    try:
        d.wait_ready()
        assert _dpwatch_prog_count() == before + 1
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(10)
        took = time.monotonic() - start
    finally:
        d.stop()
    assert rc == 0, d.output() if not d.log.closed else rc
    assert took < 5
    assert _dpwatch_prog_count() == before


def test_cli_check_and_diagnose(net, dpwatch_bin):
    res = subprocess.run(["ip", "netns", "exec", net.node, dpwatch_bin, "check", "--require", "drops"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^drops\s+tracepoint\s+attached\s+yes", res.stdout, re.M), res.stdout

    proc = start_diagnose(["ip", "netns", "exec", net.node, dpwatch_bin, "diagnose", "--window", "4s",
                           "--format", "json", "--drops-rate-warning", "10", "--log-level", "info"])
    port = closed_udp_port(net.node, socket.AF_INET6)
    udp_send(net.pod.ns, net.pod.node_ip6, port, 400, family=socket.AF_INET6)
    out, err = proc.communicate(timeout=120)
    report = json.loads(out)
    assert proc.returncode == {"ok": 0, "warning": 1, "critical": 2}[report["status"]]
    top = next(f for f in report["findings"] if f["id"] == "drops.top_reasons")
    reasons = {r["reason"]: r["drops"] for r in top["evidence"]["top_reasons"]}
    assert reasons.get("NO_SOCKET", 0) >= 400, (reasons, err)


def test_cli_bad_flag_exits_64(dpwatch_bin):
    res = subprocess.run([dpwatch_bin, "run", "--listen", "nowhere"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 64
    assert "--listen" in res.stderr


def test_healthy_conntrack_no_finding(daemon):
    """Before the table is filled: conntrack metrics exist and there is no conntrack finding."""
    text = daemon.get("/metrics")[2]
    assert "dpwatch_conntrack_entries " in text and "dpwatch_conntrack_max_entries " in text
    probes = json.loads(daemon.get("/probes")[2])["probes"]
    ct = next(p for p in probes if p["name"] == "conntrack")
    assert ct["state"] in ("attached", "degraded") and ct["mode"] in ("kprobe", "correlated")
    report = json.loads(daemon.get("/diagnose?format=json&window=5m")[2])
    assert not [f for f in report["findings"] if f["probe"] == "conntrack"]


def test_full_conntrack_table_over_http(daemon, net):
    from test_conntrack_kernel import Holder, open_connections  # the kernel tier's helpers
    ct_max = "/proc/sys/net/netfilter/nf_conntrack_max"
    with open(ct_max) as fh:
        old = fh.read().strip()
    sh("conntrack", "-F", ns=net.node, check=False)  # earlier tests' UDP entries out of the way
    holder = Holder(net.node, net.pod.node_ip4)
    try:
        with open(ct_max, "w") as fh:
            fh.write("64")
        before = metric(daemon.get("/metrics")[2], "dpwatch_conntrack_drops_total")
        conns, refused = open_connections(net.pod.ns, net.pod.node_ip4, holder.port, 100)
        text = daemon.get("/metrics")[2]
        report = json.loads(daemon.get("/diagnose?format=json&window=30s")[2])
        body = daemon.get("/diagnose?window=30s")[2]
    finally:
        with open(ct_max, "w") as fh:
            fh.write(old)
        holder.close()
    assert len(conns) == 64 and refused == 36
    assert metric(text, "dpwatch_conntrack_entries") == 64
    assert metric(text, "dpwatch_conntrack_max_entries") == 64
    assert metric(text, "dpwatch_conntrack_drops_total") - before == refused
    # (Earlier tests' drops are in the same window, so only the conntrack finding is checked.)
    full = next(f for f in report["findings"] if f["id"] == "conntrack.table_full")
    assert full["severity"] == "critical"
    assert full["evidence"]["drops"] == refused and full["evidence"]["fill_percent"] == 100.0
    assert "conntrack.table_full" in body and "$ sysctl -w net.netfilter.nf_conntrack_max=131072" in body
    for c in conns:
        c.close()


def test_vxlan_black_hole_reported_with_safe_mtu(dpwatch_bin):
    """The classic black hole: VXLAN over a 1500 underlay, pods left at 1500. The real daemon,
    in the node netns, reports mtu.mismatch with the safe MTU 1450 and the exact commands."""
    from test_mtuaudit_kernel import overlay_node  # the kernel tier's topology builder
    with Lab(pods=2) as lab:
        overlay_node(lab, vxlan_mtu=1500)
        d = DaemonProc(dpwatch_bin, lab.node, PORT + 2, "--probes", "drops,mtu", "--mtu-all-netns")
        try:
            d.wait_ready()
            text = d.get("/metrics")[2]
            report = json.loads(d.get("/diagnose?format=json")[2])
            body = d.get("/diagnose")[2]
        finally:
            d.stop()
    assert metric(text, "dpwatch_mtu_mismatches") >= 3  # the vxlan and the two pod pairs
    assert 'dpwatch_interface_mtu_bytes{interface="vxlan42",kind="vxlan"} 1500.0' in text
    f = next(f for f in report["findings"] if f["id"] == "mtu.mismatch")
    assert f["severity"] == "critical" and report["findings"][0]["id"] == "mtu.mismatch"
    assert f["evidence"]["safe_mtu"] == 1450
    kinds = {m["kind"] for m in f["evidence"]["mismatches"]}
    assert {"overlay_too_big", "pod_above_overlay"} <= kinds
    assert any(r.startswith("ip link set dev vxlan42 mtu 1450") for r in f["remediation"])
    assert any("ip link set dev" in r and "mtu 1450" in r and "netns exec" in r for r in f["remediation"])
    assert any("Calico" in r or "calico" in r for r in f["remediation"])
    assert "mtu.mismatch" in body and "$ ip link set dev vxlan42 mtu 1450" in body
