"""End-to-end: the daemon's lifecycle under load, in a netns the test makes.

- SIGTERM while a pod floods the node and a scrape is running: HTTP stops (the port refuses),
  every BPF program and map the daemon held is gone (bpftool), exit 0, within 5 s.
- kill -9: nothing of the daemon's is left in the kernel: the program and map ids it held
  (read from /proc/PID/fdinfo while it ran) are absent from `bpftool prog/map show`, and no
  kprobe/uprobe event named after its pid is left in tracefs.
- A restart under load (kill -9, then a new daemon on the same port) serves again at once,
  with counters that start from zero (see README: counters reset on restart), counting exactly
  the traffic sent after it started.
- Every map the daemon creates is bounded (max_entries read from fdinfo).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from netlab import Lab, closed_udp_port, in_netns, udp_send
from test_daemon_e2e import DaemonProc, metric

PORT = 9431
MAX_MAP_ENTRIES = 65536            # the largest size any -D map-size flag accepts
MAX_MAP_MEMLOCK = 64 << 20         # all maps together


@pytest.fixture(scope="module")
def net():
    with Lab(pods=1) as lab:
        yield lab


class Flood:
    """A pod sending IPv4 UDP to a closed node port until stopped (NO_SOCKET drops)."""

    def __init__(self, lab: Lab):
        self.lab, self.stop, self.sent = lab, threading.Event(), 0
        port = closed_udp_port(lab.node)

        def loop():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            while not self.stop.is_set():
                for _ in range(100):
                    try:
                        s.sendto(b"load", (lab.pod.node_ip4, port))
                        self.sent += 1
                    except OSError:
                        pass
                time.sleep(0.002)
            s.close()
        self.thread = threading.Thread(target=lambda: in_netns(lab.pod.ns, loop), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(10)


def bpf_objects(pid: int) -> tuple[set[int], dict[int, int]]:
    """(program ids, {map id: max_entries}) the process holds, from /proc/PID/fdinfo."""
    progs, maps = set(), {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                info = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
        except OSError:
            continue
        if "prog_id" in info:
            progs.add(int(info["prog_id"]))
        if "map_id" in info:
            maps[int(info["map_id"])] = (int(info["max_entries"]), int(info.get("memlock", 0)))
    return progs, maps


def kernel_ids() -> tuple[set[int], set[int]]:
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      timeout=30, check=True).stdout or "[]")
    maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True,
                                     timeout=30, check=True).stdout or "[]")
    return {p["id"] for p in progs}, {m["id"] for m in maps}


def wait_gone(progs: set[int], maps: set[int], timeout: float = 10) -> tuple[set[int], set[int]]:
    """Ids still present after waiting (the kernel frees them shortly after the last fd)."""
    deadline = time.monotonic() + timeout
    while True:
        live_p, live_m = kernel_ids()
        left = (progs & live_p, set(maps) & live_m)
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def describe(progs: set[int], ns: str) -> str:
    """What holds left-over programs: bpftool's view of them and of the netns' attachments."""
    out = [subprocess.run(["bpftool", "prog", "show", "id", str(p)], capture_output=True, text=True).stdout
           for p in sorted(progs)]
    out.append(subprocess.run(["ip", "netns", "exec", ns, "bpftool", "net", "show"], capture_output=True,
                              text=True).stdout)
    return "left in the kernel after kill -9:\n" + "\n".join(out)


def refused(ns: str, port: int) -> bool:
    def go():
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            return False
        except ConnectionRefusedError:
            return True
        finally:
            s.close()
    return in_netns(ns, go)


def test_sigterm_under_load_stops_http_detaches_and_exits_zero(net, dpwatch_bin):
    flood = Flood(net)
    d = DaemonProc(dpwatch_bin, net.node, PORT)
    try:
        d.wait_ready()
        progs, maps = bpf_objects(d.proc.pid)
        assert progs and maps
        # Every map is bounded.
        assert all(0 < entries <= MAX_MAP_ENTRIES for entries, _ in maps.values()), maps
        assert sum(mem for _, mem in maps.values()) <= MAX_MAP_MEMLOCK
        assert metric(d.get("/metrics")[2], "dpwatch_skb_drops_total", reason="NO_SOCKET") > 0
        scrape = threading.Thread(target=lambda: [d.get("/metrics") for _ in range(3)], daemon=True)
        scrape.start()
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(10)
        took = time.monotonic() - start
        scrape.join(10)
        assert rc == 0, d.output()
        assert took < 5, took
        assert refused(net.node, PORT)
        assert wait_gone(progs, set(maps), timeout=2) == (set(), set())
        assert "stopped: probes detached" in d.output()
    finally:
        flood.close()
        d.stop()


def test_kill9_leaves_no_program_or_map(net, dpwatch_bin):
    d = DaemonProc(dpwatch_bin, net.node, PORT + 1)
    try:
        d.wait_ready()
        pid = d.proc.pid
        progs, maps = bpf_objects(pid)
        live_p, live_m = kernel_ids()
        assert progs <= live_p and set(maps) <= live_m  # bpftool sees them while it runs
        d.proc.kill()
        assert d.proc.wait(10) == -signal.SIGKILL
        left = wait_gone(progs, set(maps))
        assert left == (set(), set()), describe(left[0], net.node)
        for name in ("kprobe_events", "uprobe_events"):
            path = f"/sys/kernel/tracing/{name}"
            if os.path.exists(path):
                with open(path) as fh:
                    assert f"bcc_{pid}" not in fh.read()
    finally:
        d.stop()


@pytest.mark.host_only  # a restart is process behaviour; the guest runs the detach tests above (CI time)
def test_restart_under_load_resumes_serving_with_reset_counters(net, dpwatch_bin):
    port = PORT + 2
    flood = Flood(net)
    a = DaemonProc(dpwatch_bin, net.node, port)
    b = None
    try:
        a.wait_ready()
        closed6 = closed_udp_port(net.node, socket.AF_INET6)
        assert udp_send(net.pod.ns, net.pod.node_ip6, closed6, 100, family=socket.AF_INET6) == 100
        time.sleep(0.3)
        a_text = a.get("/metrics")[2]
        assert metric(a_text, "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv6") >= 100
        a.proc.kill()  # the harsh case: no clean shutdown
        a.proc.wait(10)
        b = DaemonProc(dpwatch_bin, net.node, port)
        b.wait_ready()  # the same port is free again at once
        first = metric(b.get("/metrics")[2], "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv6")
        assert first == 0  # counters start again from zero in a new process
        assert udp_send(net.pod.ns, net.pod.node_ip6, closed6, 50, family=socket.AF_INET6) == 50
        time.sleep(0.3)
        text = b.get("/metrics")[2]
        assert metric(text, "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv6") == 50
        assert metric(text, "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv4") > 0  # the load
        assert b.get("/diagnose?format=json")[0] == 200
    finally:
        flood.close()
        a.stop()
        if b is not None:
            assert b.stop() == 0
