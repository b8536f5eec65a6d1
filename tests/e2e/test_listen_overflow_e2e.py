"""End-to-end tier for node.listen_queue_overflow: the real daemon (default flags) in a Lab
"node" netns, a server there whose accept queue overflows for real, connection attempts from
the "pod" netns, and /diagnose naming the listener.

- listen(1) that never accepts, 200 non-blocking connects: the top finding (past the drops and
  softirq probes' host-wide noise, as other tests may be running) names the port, backlog 1,
  not capped by somaxconn (4096), and this process as the owner; node.somaxconn_low is no
  warning and no somaxconn sysctl is advised. On 6.18 these drops carry no drop reason, so the
  finding stands on TcpExt ListenOverflows and the socket's own drop counter.
- somaxconn 16 in the node netns and listen(1024): the backlog is capped to 16, and the
  somaxconn sysctl is advised for it.

Ports 9640-9659 only: the daemon on 9640, the servers on 9641 and 9642.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time

import pytest

from netlab import Lab, in_netns, sh
from test_daemon_e2e import DaemonProc, metric

PORT = 9640
HOST_WIDE = ("drops", "softirq")  # probes whose findings count the whole host


@pytest.fixture(scope="module")
def env(dpwatch_bin):
    """(lab, daemon): the daemon with default flags in the lab's node netns."""
    with Lab(pods=1) as lab:
        d = DaemonProc(dpwatch_bin, lab.node, PORT)
        try:
            d.wait_ready()
            yield lab, d
        finally:
            d.stop()


def listener(ns: str, addr: str, port: int, backlog: int) -> socket.socket:
    def go():
        srv = socket.socket()
        srv.bind((addr, port))
        srv.listen(backlog)
        return srv
    return in_netns(ns, go)


def burst(ns: str, host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` non-blocking connection attempts (each keeps retrying its SYN until closed)."""
    def go():
        out = []
        for _ in range(n):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((host, port))
            out.append(c)
        return out
    return in_netns(ns, go)


def ours(rep: dict) -> list[dict]:
    return [f for f in rep["findings"] if f["probe"] not in HOST_WIDE]


def named(f: dict, endpoint: str) -> dict | None:
    return next((x for x in f["evidence"].get("listeners", []) if x["listener"] == endpoint), None)


def wait_top(d: DaemonProc, endpoint: str, since: float, timeout: float = 30) -> tuple[dict, float]:
    """The first report whose top finding (past host-wide noise) is node.listen_queue_overflow
    naming ``endpoint``, and the seconds from ``since`` to it."""
    rep: dict = {}
    while time.monotonic() - since < timeout:
        status, _, body = d.get("/diagnose?format=json&window=30s")
        assert status == 200, body
        rep = json.loads(body)
        top = ours(rep)[:1]
        if top and top[0]["id"] == "node.listen_queue_overflow" and named(top[0], endpoint):
            return rep, time.monotonic() - since
        time.sleep(0.2)
    raise AssertionError(f"no node.listen_queue_overflow naming {endpoint} on top after {timeout}s: "
                         f"{[(f['id'], f['severity']) for f in rep.get('findings', [])]}")


@contextlib.contextmanager
def overflowing(lab: Lab, d: DaemonProc, port: int, backlog: int, label: str):
    """A listener on ``port`` that never accepts and 200 connection attempts to it from the
    pod: yields the first report with it named on top, that finding, and its listener entry."""
    ip = lab.pod.node_ip4
    endpoint = f"{ip}:{port}"
    srv = listener(lab.node, ip, port, backlog)
    clients: list[socket.socket] = []
    try:
        fault = time.monotonic()
        clients = burst(lab.pod.ns, ip, port, 200)
        rep, elapsed = wait_top(d, endpoint, fault)
        print(f"\n{label}, 200 connects: fault to finding {elapsed:.2f}s")
        f = ours(rep)[0]
        yield rep, f, named(f, endpoint)
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_backlog_one_listener_is_named_and_somaxconn_is_not_blamed(env):
    lab, daemon = env
    endpoint = f"{lab.pod.node_ip4}:9641"
    with overflowing(lab, daemon, 9641, 1, "listen(1)") as (rep, f, x):
        assert x["effective_backlog"] == 1 and x["capped_by_somaxconn"] is False
        assert x["full_now"] and x["queue_now"] == 2  # listen(1) holds two
        assert x["socket_drops_in_window"] >= 1 and x["attributed_by"] == "socket drops"
        assert x["process"]["pid"] == os.getpid()
        assert f["severity"] == "critical"  # ~200 refused, 2 accepted
        assert f["evidence"]["net.core.somaxconn"] == 4096
        assert "raising somaxconn changes nothing" in f["summary"]
        assert not any(step.startswith("sysctl -w net.core.somaxconn") for step in f["remediation"])
        assert f["remediation"][0].startswith(f"{endpoint} (")
        assert "raise its listen() backlog from 1 to 128" in f["remediation"][0]
        assert all(s["severity"] == "info" for s in rep["findings"] if s["id"] == "node.somaxconn_low")
        text = daemon.get("/diagnose?window=30s")[2]
        assert "node.listen_queue_overflow" in text and endpoint in text
        # The gauge, and the exposition stays clean.
        metrics = daemon.get("/metrics")[2]
        assert metric(metrics, "dpwatch_tcp_listeners_full") >= 1
        assert metric(metrics, "dpwatch_tcp_listeners") >= 2  # the server and the daemon's own
        res = subprocess.run(["promtool", "check", "metrics"], input=metrics.encode(),
                             capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_listener_capped_by_somaxconn_gets_the_sysctl(env):
    lab, daemon = env
    endpoint = f"{lab.pod.node_ip4}:9642"
    sh("sysctl", "-qw", "net.core.somaxconn=16", ns=lab.node)  # per netns
    try:
        with overflowing(lab, daemon, 9642, 1024, "listen(1024) capped at somaxconn 16") as (rep, f, x):
            assert x["effective_backlog"] == 16 and x["capped_by_somaxconn"] is True
            assert x["queue_now"] == 17 and x["full_now"]
            assert f["remediation"][0] == "sysctl -w net.core.somaxconn=4096"
            assert f["remediation"][1].startswith(f"{endpoint} (")
            assert "capped by somaxconn" in f["remediation"][1]
            assert "net.core.somaxconn=16 caps its backlog" in f["summary"]
            # somaxconn_low is the same story: folded into this finding, not listed again.
            assert "node.somaxconn_low" not in [s["id"] for s in rep["findings"]]
            low = f["evidence"]["related"]["node.somaxconn_low"]
            assert low["severity"] == "info" and low["listeners_capped_by_somaxconn"] == 1
    finally:
        sh("sysctl", "-qw", "net.core.somaxconn=4096", ns=lab.node)
