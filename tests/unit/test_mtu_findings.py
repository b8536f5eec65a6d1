"""Unit tests for the mtu probe: decode_recent, the findings (probes/mtu/findings.py, through
MtuProbe.diagnose), metrics(), and the constants bpf/mtu.h shares with Python, with readings
built by hand in the shape MtuProbe.collect() returns. No root, no BPF, no netlink."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpwatch.daemon.config import Config
from dpwatch.probes import cdefs
from dpwatch.probes.base import Window
from dpwatch.probes.mtu import findings
from dpwatch.probes.mtu.model import Issue
from dpwatch.probes.mtu.probe import DIRS, MtuProbe, decode_recent
from dpwatch.probes.mtu.remediation import cni_remediation
from test_frag_findings import exposition


# -- probes/mtu/probe.py: decode_recent -----------------------------------------------------------------

NOW = 10_000_000_000


def test_decode_recent_sent():
    key = SimpleNamespace(daddr=bytes([10, 0, 0, 9]), dir=0, mtu=0)
    value = SimpleNamespace(count=3, last_ns=NOW - 1_260_000_000)
    assert decode_recent(key, value, NOW) == {"direction": "sent", "dst": "10.0.0.9", "mtu": None,
                                              "count": 3, "seconds_ago": 1.3}


def test_decode_recent_received():
    key = SimpleNamespace(daddr=bytes([192, 0, 2, 7]), dir=1, mtu=1380)
    value = SimpleNamespace(count=1, last_ns=NOW)
    assert decode_recent(key, value, NOW) == {"direction": "received", "dst": "192.0.2.7", "mtu": 1380,
                                              "count": 1, "seconds_ago": 0.0}


def test_decode_recent_unknown_dir_and_future_timestamp():
    key = SimpleNamespace(daddr=[198, 18, 0, 1], dir=7, mtu=1400)  # a ctypes array works like a list
    value = SimpleNamespace(count=2, last_ns=NOW + 5_000_000)  # another CPU's clock, just ahead
    assert decode_recent(key, value, NOW) == {"direction": "7", "dst": "198.18.0.1", "mtu": 1400,
                                              "count": 2, "seconds_ago": 0.0}


# -- probes/mtu/probe.py: diagnose ---------------------------------------------------------------------------

def mtu_mode(name: str):
    (m,) = [m for m in MtuProbe.modes if m.name == name]
    return m


@pytest.fixture
def mtu_probe(monkeypatch):
    p = MtuProbe(Config())
    p.mode = mtu_mode("tracepoint")
    calls: list[str] = []

    def route_mtu(dst):
        calls.append(dst)
        return 1400
    monkeypatch.setattr(p, "route_mtu", route_mtu)
    p.route_calls = calls
    return p


def mtu_reading(frag_needed=None, issues=(), recent=(), pmtu=(), interface_mtu=None) -> dict:
    return {"counters": {"frag_needed": dict(frag_needed or {})},
            "gauges": {"interface_mtu": dict(interface_mtu or {}), "mismatches": {(): len(issues)}},
            "info": {"issues": list(issues), "recent": list(recent), "pmtu": list(pmtu)}}


def dev(name, kind, mtu, netns=4026531840):
    return {"netns": netns, "name": name, "kind": kind, "mtu": mtu}


VETH = Issue("veth_mismatch", [dev("veth1", "veth", 1500), dev("eth0", "veth", 1450, 4026532500)],
             None, 1450, "veth1 (1500) and its peer eth0 (1450) differ.",
             ["ip link set dev veth1 mtu 1450", "recreate the pods"])
OVERLAY = Issue("overlay_too_big", [dev("vxlan.calico", "vxlan", 1500), dev("eth0", "device", 1500)],
                50, 1450, "vxlan.calico (1500) + 50 bytes does not fit eth0 (1500).",
                ["ip link set dev vxlan.calico mtu 1450", "recreate the pods"])
BRIDGE = Issue("bridge_ports_differ", [dev("br0", "bridge", 1500), dev("veth9", "veth", 1480)],
               None, 1480, "bridge br0 ports differ (1500, 1480).",
               ["ip link set dev br0 mtu 1480"])


def test_mtu_healthy(mtu_probe):
    r = mtu_reading({("ipv4", "sent"): 5, ("ipv6", "received"): 2},
                    recent=[{"direction": "sent", "dst": "10.0.0.9", "mtu": None, "count": 5,
                             "seconds_ago": 1.0}],
                    interface_mtu={("eth0", "device"): 1500})
    assert mtu_probe.diagnose(Window(10, r, r)) == []
    assert mtu_probe.diagnose(Window(10, None, mtu_reading())) == []
    assert mtu_probe.route_calls == []


def test_mtu_mismatch_exact(mtu_probe):
    mtu_probe.own_ino = 4026531840  # the daemon's netns: veth1's, the bigger end
    r = mtu_reading(issues=[VETH, OVERLAY, BRIDGE])
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert (f.id, f.probe, f.severity) == ("mtu.mismatch", "mtu", "critical")
    assert f.summary == (
        "The MTU audit found 3 problem(s): veth1 (1500) and its peer eth0 (1450) differ. "
        "vxlan.calico (1500) + 50 bytes does not fit eth0 (1500). bridge br0 ports differ (1500, 1480). "
        "Packets bigger than the smallest MTU on the path are dropped silently or fragmented: "
        "connections hang on large transfers while small ones work.")
    assert f.evidence == {
        "mismatches": [
            {"kind": "veth_mismatch", "devices": VETH.devices, "overhead": None, "safe_mtu": 1450,
             "node_end_bigger": True},
            {"kind": "overlay_too_big", "devices": OVERLAY.devices, "overhead": 50, "safe_mtu": 1450},
            {"kind": "bridge_ports_differ", "devices": BRIDGE.devices, "overhead": None, "safe_mtu": 1480},
        ],
        "safe_mtu": 1450}
    # de-duplicated, in first-seen order, then the CNI settings for the safe MTU with the overhead
    # of the issue that set it (Cilium wants the underlay MTU: 1450 + 50)
    assert f.remediation == ["ip link set dev veth1 mtu 1450", "recreate the pods",
                             "ip link set dev vxlan.calico mtu 1450",
                             "ip link set dev br0 mtu 1480"] + cni_remediation(1450, 50)
    assert "--set MTU=1500" in f.remediation[4]
    assert f.impact == 3.0
    # The pod's end the bigger one (or the daemon's netns unknown): the node's sends fit.
    mtu_probe.own_ino = 4026532500
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.evidence["mismatches"][0]["node_end_bigger"] is False


def test_mtu_mismatch_safe_without_overhead(mtu_probe):
    r = mtu_reading(issues=[BRIDGE, VETH])
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.evidence["safe_mtu"] == 1450
    assert f.remediation == ["ip link set dev br0 mtu 1480", "ip link set dev veth1 mtu 1450",
                             "recreate the pods"] + cni_remediation(1450, None)
    assert "--set MTU=1450" in f.remediation[3]


def test_mtu_mismatch_no_cni_lines_twice(mtu_probe):
    cni = cni_remediation(1450, 50)
    issue = Issue("pod_above_overlay", [dev("eth0", "veth", 1500, 4026532500)], 50, 1450,
                  "pod eth0 (1500) is above the overlay MTU (1450).", ["lower the pod MTU"] + cni)
    r = mtu_reading(issues=[issue, OVERLAY])
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.remediation == ["lower the pod MTU"] + cni + ["ip link set dev vxlan.calico mtu 1450",
                                                           "recreate the pods"]


def test_mtu_mismatch_no_safe_mtu_many_issues(mtu_probe):
    issues = [Issue("veth_mismatch", [], None, None, f"issue {i}.", [f"step {i % 2}"]) for i in range(5)]
    r = mtu_reading(issues=issues)
    (f,) = mtu_probe.diagnose(Window(10, r, r))
    assert f.evidence["safe_mtu"] is None
    assert f.remediation == ["step 0", "step 1"]  # no CNI lines without a safe MTU
    assert f.summary.startswith("The MTU audit found 5 problem(s): issue 0. issue 1. issue 2. ... Packets")
    assert f.impact == 5.0


def test_mtu_pmtu_frag_needed_exact(mtu_probe):
    old = mtu_reading({("ipv4", "sent"): 5, ("ipv6", "received"): 1})
    recent = [
        {"direction": "sent", "dst": "10.0.0.9", "mtu": None, "count": 3, "seconds_ago": 0.5},
        {"direction": "received", "dst": "192.0.2.7", "mtu": 1380, "count": 2, "seconds_ago": 4.0},
        {"direction": "received", "dst": "192.0.2.8", "mtu": 1200, "count": 9, "seconds_ago": 10.5},
        {"direction": "sent", "dst": "10.0.0.10", "mtu": None, "count": 1, "seconds_ago": 30.0},
    ]
    pmtu = [{"netns": 4026531840, "dst": "2001:db8::1", "dev": "eth0", "mtu": 1280, "expires": 590},
            {"netns": 4026531840, "dst": "198.51.100.1", "dev": "eth0", "mtu": None, "expires": 0}]
    new = mtu_reading({("ipv4", "sent"): 8, ("ipv6", "received"): 3}, recent=recent, pmtu=pmtu)
    (f,) = mtu_probe.diagnose(Window(10, old, new))
    assert (f.id, f.probe, f.severity) == ("mtu.pmtu_frag_needed", "mtu", "warning")
    # only the sent row inside the window asks for the route MTU; rows older than 10s are ignored
    assert mtu_probe.route_calls == ["10.0.0.9"]
    assert f.summary == (
        "5 ICMP frag-needed/packet-too-big messages in 10s (ipv4 sent: 3, ipv6 received: 2). "
        "A path has a smaller MTU than senders use (announced: 1280, 1380, 1400). "
        "If anything on the path drops ICMP, this becomes a black hole.")
    assert f.evidence == {
        "frag_needed": {"ipv4_sent": 3, "ipv6_received": 2},
        "recent": [{"direction": "sent", "dst": "10.0.0.9", "mtu": 1400, "count": 3},
                   {"direction": "received", "dst": "192.0.2.7", "mtu": 1380, "count": 2}],
        "pmtu_cache": pmtu, "announced_mtus": [1280, 1380, 1400], "window_seconds": 10.0}
    assert f.remediation[0] == ("set the sending side's MTU to the announced MTU (or lower): "
                                "ip link set dev <dev> mtu 1280")
    assert f.impact == 0.5


def test_mtu_pmtu_frag_needed_nothing_announced(mtu_probe):
    new = mtu_reading({("ipv6", "sent"): 4})
    (f,) = mtu_probe.diagnose(Window(2, None, new))
    assert f.id == "mtu.pmtu_frag_needed"
    assert f.summary == ("4 ICMP frag-needed/packet-too-big messages in 2s (ipv6 sent: 4). A path has a "
                         "smaller MTU than senders use. If anything on the path drops ICMP, this becomes "
                         "a black hole.")
    assert f.evidence["announced_mtus"] == []
    assert f.remediation[0].endswith("mtu <announced>")
    assert mtu_probe.route_calls == []


def test_mtu_both_findings(mtu_probe):
    new = mtu_reading({("ipv4", "sent"): 1}, issues=[VETH])
    assert [f.id for f in mtu_probe.diagnose(Window(10, None, new))] == ["mtu.mismatch",
                                                                          "mtu.pmtu_frag_needed"]


# -- probes/mtu/probe.py: metrics ----------------------------------------------------------------------------

def test_mtu_metrics_exact():
    p = MtuProbe(Config(mtu_max_interfaces=2))
    p.mode = mtu_mode("tracepoint")
    r = mtu_reading({("ipv4", "sent"): 8, ("ipv6", "sent"): 2, ("ipv6", "received"): 3},
                    issues=[VETH, OVERLAY, BRIDGE],
                    interface_mtu={("vxlan.calico", "vxlan"): 1450, ("lo", "loopback"): 65536,
                                   ("eth0", "device"): 1500})
    assert exposition(p, r) == [
        "# TYPE dpwatch_icmp_frag_needed_sent_total counter",
        'dpwatch_icmp_frag_needed_sent_total{family="ipv4"} 8.0',
        'dpwatch_icmp_frag_needed_sent_total{family="ipv6"} 2.0',
        "# TYPE dpwatch_icmp_frag_needed_received_total counter",
        'dpwatch_icmp_frag_needed_received_total{family="ipv6"} 3.0',
        "# TYPE dpwatch_interface_mtu_bytes gauge",
        'dpwatch_interface_mtu_bytes{interface="eth0",kind="device"} 1500.0',
        'dpwatch_interface_mtu_bytes{interface="lo",kind="loopback"} 65536.0',
        "# TYPE dpwatch_mtu_mismatches gauge",
        "dpwatch_mtu_mismatches 3.0",
    ]


def test_mtu_metrics_default_cap_and_empty():
    p = MtuProbe(Config())
    assert p.config.mtu_max_interfaces == 512
    r = mtu_reading(interface_mtu={(f"veth{i}", "veth"): 1450 for i in range(3)})
    lines = exposition(p, r)
    assert [ln for ln in lines if ln.startswith("dpwatch_interface_mtu_bytes")] == [
        f'dpwatch_interface_mtu_bytes{{interface="veth{i}",kind="veth"}} 1450.0' for i in range(3)]
    assert "dpwatch_mtu_mismatches 0.0" in lines
    assert not any(ln.startswith("dpwatch_icmp_frag_needed") for ln in lines)


def test_mtu_findings_are_pure_functions_of_the_window():
    """findings.py's functions take the node facts as arguments: the daemon's netns for which
    veth end is the node's, and the route-MTU lookup."""
    r = mtu_reading({("ipv4", "sent"): 2}, issues=[VETH],
                    recent=[{"direction": "sent", "dst": "10.0.0.9", "mtu": None, "count": 2,
                             "seconds_ago": 1.0}])
    w = Window(10, None, r)
    assert findings.mismatch(w, 4026531840).evidence["mismatches"][0]["node_end_bigger"] is True
    assert findings.mismatch(w, None).evidence["mismatches"][0]["node_end_bigger"] is False
    assert findings.pmtu_frag_needed(w, lambda dst: 1380).evidence["announced_mtus"] == [1380]
    quiet = Window(10, r, r)
    assert findings.mismatch(quiet, None) is not None  # the audit's issues stand without traffic
    assert findings.pmtu_frag_needed(quiet, lambda dst: 1 / 0) is None
    assert {"mtu.mismatch", "mtu.pmtu_frag_needed"} == set(MtuProbe.finding_ids)


# -- bpf/mtu.h: the constants both sides share ----------------------------------------------------------------

def test_mtu_header_constants():
    d = cdefs.defines("mtu.h")
    assert DIRS == ("sent", "received")
    assert (d["MTU_EV_SENT"], d["MTU_EV_RECEIVED"], d["MTU_EVENTS"]) == (0, 1, len(DIRS))
    # the header's LRU size is the default the build overrides with --mtu-recent-entries
    assert d["MTU_RECENT_MAX"] == Config().mtu_recent_entries
    assert MtuProbe(Config(mtu_recent_entries=77)).cflags(None)[0] == "-DMTU_RECENT_MAX=77"
    # the C side takes them from the header, not from its own copy
    c = cdefs.header_text("mtu.c")
    assert not any(line.lstrip().startswith(("#define MTU_EV_", "#define MTU_EVENTS", "#define MTU_RECENT_MAX"))
                   for line in c.splitlines())
    assert "MTU_EV_SENT" in c and "MTU_EVENTS" in c
