"""End-to-end: the pod end of a veth, audited from the node netns with the DaemonSet's
capabilities only (no SYS_ADMIN, so no --mtu-all-netns: the daemon runs with its default
flags). The far end is read by nsid (daemon/host/linkpeer.py), and both directions of the most
common Kubernetes MTU black hole become the top finding, mtu.mismatch, within 15 s:

(a) the pod end bigger (pod 1500 behind a node veth lowered to 1400): seen through the node
    netns' link events;
(b) the node end bigger (the pod's eth0 lowered to 1400 behind a node veth of 1500): announced
    only in the pod's netns, so seen by the daemon's poll of the far ends.

Real traffic crosses the veth each time: a full-size DF datagram from the bigger end is lost
without a word while a small one arrives. The finding's own command then fixes it, and the
finding goes away.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import time

import pytest

from netlab import Lab, in_netns, sh, socket_in
from test_capabilities_e2e import capsh_argv, daemonset_caps
from test_daemon_e2e import DaemonProc

PORT = 9620
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2  # not in Python 3.11's socket module
DEADLINE = 15.0


@pytest.fixture(scope="module")
def env(dpwatch_bin):
    """(lab, daemon): the daemon in the lab's node netns under capsh with the DaemonSet's
    capabilities, DaemonProc's 1 s snapshot interval back to the default 5 s, so that every
    flag is the default one."""
    with Lab(pods=1) as lab:
        d = DaemonProc(dpwatch_bin, lab.node, PORT, "--snapshot-interval", "5s",
                       wrap=lambda cmd: capsh_argv(daemonset_caps(), *cmd))
        try:
            d.wait_ready()
            yield lab, d
        finally:
            rc = d.stop(20)
        assert rc == 0, d.output()[-2000:]


def mtu_probe(d: DaemonProc) -> dict:
    return next(p for p in json.loads(d.get("/probes")[2])["probes"] if p["name"] == "mtu")


def veth_issue(report: dict, pod) -> dict | None:
    for f in report["findings"]:
        if f["id"] != "mtu.mismatch":
            continue
        for m in f["evidence"]["mismatches"]:
            names = {dv["name"] for dv in m["devices"]}
            if m["kind"] == "veth_mismatch" and names == {pod.veth_node, pod.veth_pod}:
                return m
    return None


def audits(d: DaemonProc) -> dict[str, int]:
    return mtu_probe(d)["info"]["audits"]


def healthy(d: DaemonProc, net) -> dict[str, int]:
    """Both ends back at 1500, and the daemon's audit past that (else a late audit could be the
    one that sees the next fault): the audit counts by trigger from then on."""
    pod = net.pod
    mtus = [mtu_of(net.node, pod.veth_node), mtu_of(pod.ns, pod.veth_pod)]
    if mtus != [1500, 1500]:
        done = sum(audits(d).values())
        sh("ip", "link", "set", "dev", pod.veth_node, "mtu", "1500", ns=net.node)
        sh("ip", "link", "set", "dev", pod.veth_pod, "mtu", "1500", ns=pod.ns)
        deadline = time.monotonic() + DEADLINE
        while sum(audits(d).values()) == done:
            assert time.monotonic() < deadline, "no audit after the reset"
            time.sleep(0.25)
    wait_for(d, pod, present=False)
    return audits(d)


def mtu_of(ns: str, dev: str) -> int:
    return int(sh("cat", f"/sys/class/net/{dev}/mtu", ns=ns).stdout)


def wait_for(d: DaemonProc, pod, present: bool, timeout: float = DEADLINE) -> dict:
    """Poll /diagnose until the lab's veth pair is (or is no longer) in mtu.mismatch; the report."""
    start = time.monotonic()
    while True:
        report = json.loads(d.get("/diagnose?format=json")[2])
        took = time.monotonic() - start
        if (veth_issue(report, pod) is not None) == present:
            return report
        assert took < timeout, (f"mtu.mismatch {'never came' if present else 'stayed'} in {timeout}s",
                                report["findings"][:2], mtu_probe(d)["info"])
        time.sleep(0.25)


def black_hole(src_ns: str, dst_ns: str, dst_ip: str) -> tuple[int, int, int]:
    """5 full-size DF datagrams then 5 small ones from ``src_ns`` to a socket in ``dst_ns``:
    (small ones that arrived, full-size ones that arrived, full-size ones the sender's own
    MTU refused with EMSGSIZE, which is no black hole: the application is told)."""
    rx = socket_in(dst_ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        in_netns(dst_ns, lambda: rx.bind((dst_ip, 0)))
        port = rx.getsockname()[1]

        def send() -> int:
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            refused = 0
            try:
                for size in [1472] * 5 + [100] * 5:  # 1472 + 28 = a 1500-byte packet
                    try:
                        tx.sendto(b"m" * size, (dst_ip, port))
                    except OSError as exc:
                        if exc.errno != errno.EMSGSIZE:
                            raise
                        refused += 1
            finally:
                tx.close()
            return refused
        refused = in_netns(src_ns, send)
        time.sleep(0.3)
        rx.setblocking(False)
        sizes = []
        while True:
            try:
                sizes.append(len(rx.recv(65536)))
            except BlockingIOError:
                break
    finally:
        rx.close()
    return sizes.count(100), sizes.count(1472), refused


def check_finding(report: dict, net, node_mtu: int, pod_mtu: int) -> dict:
    """The top finding is mtu.mismatch, and names both ends (name, MTU, netns, the pod's nsid
    and its /run/netns path) of the lab's veth pair."""
    pod = net.pod
    top = report["findings"][0]
    assert top["id"] == "mtu.mismatch" and top["severity"] == "critical", [f["id"] for f in report["findings"]]
    issue = veth_issue(report, pod)
    ends = {dv["name"]: dv for dv in issue["devices"]}
    node_end, pod_end = ends[pod.veth_node], ends[pod.veth_pod]
    assert (node_end["mtu"], pod_end["mtu"], issue["safe_mtu"]) == (node_mtu, pod_mtu, 1400)
    node_ino, pod_ino = (os.stat(f"/run/netns/{ns}").st_ino for ns in (net.node, pod.ns))
    assert node_end["netns"] == node_ino and "netnsid" not in node_end
    nsid = json.loads(sh("ip", "-j", "link", "show", "dev", pod.veth_node, ns=net.node).stdout)[0]["link_netnsid"]
    assert (pod_end["netns"], pod_end["netnsid"], pod_end["netns_path"]) == (pod_ino, nsid, f"/run/netns/{pod.ns}")
    assert pod.veth_node in top["summary"] and pod.veth_pod in top["summary"] and pod.ns in top["summary"]
    return top


def run_fix(net, command: str) -> None:
    """Run a remediation command as an operator on the node would: in the node's netns."""
    argv = shlex.split(command)
    sh(*argv, ns=net.node)


# (the end whose MTU is lowered to make the fault, the sending side of the test traffic,
#  node end MTU, pod end MTU, the fix, the audit's trigger)
CASES = {
    "pod end bigger": ("node", "pod", 1400, 1500, "ip netns exec {pod.ns} ip link set dev {pod.veth_pod} mtu 1400",
                       "link_event"),
    "node end bigger": ("pod", "node", 1500, 1400, "ip link set dev {pod.veth_node} mtu 1400", "peer_change"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_black_hole_behind_a_pod_veth(env, case, capsys):
    net, daemon = env
    pod = net.pod
    lowered, sender, node_mtu, pod_mtu, fix, trigger = CASES[case]
    before = healthy(daemon, net)
    info = mtu_probe(daemon)["info"]
    assert (info["peer_read"], info["link_watch"], info["all_netns"]) == ("netnsid", "netlink", False), info
    assert info["peers_read"] >= 1 and info["peers_refused"] == 0, info
    ends = {"node": (net.node, pod.veth_node, pod.node_ip4), "pod": (pod.ns, pod.veth_pod, pod.ip4)}
    (src, _, _), (dst, _, dst_ip) = ends[sender], ends["pod" if sender == "node" else "node"]

    fault = time.monotonic()
    ns, dev, _ = ends[lowered]
    sh("ip", "link", "set", "dev", dev, "mtu", "1400", ns=ns)  # a pod's own change is seen only in its netns
    hole = black_hole(src, dst, dst_ip)
    report = wait_for(daemon, pod, present=True)
    took = time.monotonic() - fault
    with capsys.disabled():
        print(f"\n{case} (node end {node_mtu}, pod end {pod_mtu}): mtu.mismatch on top after {took:.2f}s "
              f"(audit on {trigger})")
    assert hole == (5, 0, 0)  # the black hole is real: full-size frames vanish, nobody is told
    top = check_finding(report, net, node_mtu, pod_mtu)
    fix = fix.format(pod=pod)
    assert fix in top["remediation"], top["remediation"]
    assert took < DEADLINE
    assert audits(daemon)[trigger] > before[trigger]

    run_fix(net, fix)
    wait_for(daemon, pod, present=False)
    assert black_hole(src, dst, dst_ip) == (5, 0, 5)  # the sender's own MTU says no now: it is told
