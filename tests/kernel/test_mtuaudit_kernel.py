"""Kernel tier: the MTU audit against real interfaces in network namespaces the tests make.

collect() runs either inside the lab's "node" netns (through daemon.netns.run_in, so that netns
is the daemon's own) or in the test's own netns with all_netns; other namespaces on the host
may exist, so every check is narrowed to the lab's netns inodes. No traffic is needed except
in the PMTU test, which sends a few DF datagrams between the lab's namespaces.

The underlay of the overlay tests is a dummy device where the kernel has the dummy driver,
else a veth pair with both ends in the node netns (this VM's kernel has veth, vxlan and bridge
built in and no modules).
"""

from __future__ import annotations

import socket
import time

from dpwatch.daemon.host import netns as netns_mod
from dpwatch.probes.mtu.audit import audit
from dpwatch.probes.mtu.remediation import cni_remediation
from dpwatch.probes.mtu.snapshot import collect
from netlab import Lab, in_netns, sh

IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2          # not in Python 3.11's socket module
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO = 23, 2


def ino(ns: str) -> int:
    value = netns_mod.inode_of(f"/run/netns/{ns}")
    assert value is not None, ns
    return value


def collect_in(ns: str, all_netns: bool = True):
    return netns_mod.run_in(f"/run/netns/{ns}", lambda: collect(all_netns=all_netns, max_netns=512))


def lab_issues(issues, inodes: set[int]):
    """Issues that involve at least one device of the lab."""
    return [i for i in issues if any(d["netns"] in inodes for d in i.devices)]


def lab_inodes(lab: Lab) -> set[int]:
    return {ino(lab.node)} | {ino(p.ns) for p in lab.pod_list}


def add_underlay(ns: str, name: str, mtu: int) -> list[str]:
    """A device to carry the overlay: dummy if the kernel has it, else a veth pair whose two ends
    both stay in ``ns``. Returns the device names (the underlay first)."""
    if sh("ip", "link", "add", name, "type", "dummy", ns=ns, check=False).returncode == 0:
        devs = [name]
    else:
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p", ns=ns)
        devs = [name, name + "p"]
    for d in devs:
        sh("ip", "link", "set", d, "mtu", str(mtu), "up", ns=ns)
    return devs


def overlay_node(lab: Lab, vxlan_mtu: int | None) -> tuple[list[str], str]:
    """Underlay at 1500 with 198.18.200.1/24, and vxlan42 (VNI 42, dev underlay, dstport 4789).
    With ``vxlan_mtu`` the vxlan gets that MTU (the kernel refuses more than underlay - 50 at
    set time, so the underlay starts at 1600 and is lowered afterwards); else the kernel's
    default (underlay - 50)."""
    node = lab.node
    under = f"dpwu{lab.tag}"[:15]
    devs = add_underlay(node, under, 1600 if vxlan_mtu else 1500)
    sh("ip", "addr", "add", "198.18.200.1/24", "dev", under, ns=node)
    cmd = ["ip", "link", "add", "vxlan42", "type", "vxlan", "id", "42", "dev", under,
           "local", "198.18.200.1", "dstport", "4789"]
    sh(*cmd, ns=node)
    if vxlan_mtu:
        sh("ip", "link", "set", "vxlan42", "mtu", str(vxlan_mtu), ns=node)
        for d in devs:
            sh("ip", "link", "set", d, "mtu", "1500", ns=node)
    sh("ip", "link", "set", "vxlan42", "up", ns=node)
    return devs, "vxlan42"


def mtu_of(ns: str, dev: str) -> int:
    return int(sh("cat", f"/sys/class/net/{dev}/mtu", ns=ns).stdout)


def test_veth_mismatch_across_netns():
    """(a) node end 1500, pod end 1400: exactly one veth_mismatch, safe 1400, seen from the
    node netns and from the test's own netns (where both ends are in other namespaces)."""
    with Lab(pods=1) as lab:
        pod = lab.pod
        sh("ip", "link", "set", pod.veth_pod, "mtu", "1400", ns=pod.ns)
        node_ino, pod_ino = ino(lab.node), ino(pod.ns)
        t0 = time.monotonic()
        snap = collect_in(lab.node)
        took = time.monotonic() - t0
        assert snap.own_netns == node_ino
        ends = {(l.netns, l.name): l for l in snap.links if l.kind == "veth"}
        node_end, pod_end = ends[(node_ino, pod.veth_node)], ends[(pod_ino, pod.veth_pod)]
        # the peer is resolved across namespaces through IFLA_LINK + IFLA_LINK_NETNSID
        assert node_end.peer == (pod_ino, pod_end.ifindex)
        assert pod_end.peer == (node_ino, node_end.ifindex)
        issues = lab_issues(audit(snap), {node_ino, pod_ino})
        assert [(i.kind, i.safe_mtu, i.overhead) for i in issues] == [("veth_mismatch", 1400, None)]
        assert issues[0].devices == [
            {"netns": node_ino, "name": pod.veth_node, "kind": "veth", "mtu": 1500},
            {"netns": pod_ino, "name": pod.veth_pod, "kind": "veth", "mtu": 1400}]
        assert issues[0].remediation == [f"ip link set dev {pod.veth_node} mtu 1400"]
        assert took < 5, f"collect took {took:.1f}s"

        # From the test's own netns: both ends elsewhere, commands go through ip netns exec.
        workers: dict = {}
        try:
            snap = collect(all_netns=True, max_netns=512, workers=workers)
            assert {node_ino, pod_ino} <= set(workers)
            again = collect(all_netns=True, max_netns=512, workers=workers)  # reuses the threads
        finally:
            for w in workers.values():
                w.close()
        for s in (snap, again):
            (issue,) = lab_issues(audit(s), {node_ino, pod_ino})
            assert issue.kind == "veth_mismatch" and issue.safe_mtu == 1400
            assert issue.remediation == [f"ip netns exec {lab.node} ip link set dev {pod.veth_node} mtu 1400"]
            assert s.netns_paths[node_ino] == f"/run/netns/{lab.node}"

        # Without all_netns the pod's netns is not entered: its end is read by nsid instead
        # (test_far_end_read_by_nsid), and the finding is the same.
        snap = collect_in(lab.node, all_netns=False)
        assert {l.netns for l in snap.links} == {node_ino, pod_ino}
        assert snap.netns_skipped == 0 and snap.peers["read"] == 1
        (issue,) = lab_issues(audit(snap), {node_ino, pod_ino})
        assert (issue.kind, issue.safe_mtu, issue.remediation) == (
            "veth_mismatch", 1400, [f"ip link set dev {pod.veth_node} mtu 1400"])


def test_vxlan_over_1500_underlay_with_1500_pods():
    """(b) vxlan42 at 1500 over a 1500 underlay, two pods at 1500: overlay_too_big for the vxlan
    and pod_above_overlay for each pod pair, all with safe MTU 1450."""
    with Lab(pods=2) as lab:
        devs, vx = overlay_node(lab, vxlan_mtu=1500)
        assert mtu_of(lab.node, vx) == 1500 and mtu_of(lab.node, devs[0]) == 1500
        node_ino = ino(lab.node)
        snap = collect_in(lab.node)
        vxl = next(l for l in snap.links if l.netns == node_ino and l.name == vx)
        under = next(l for l in snap.links if l.netns == node_ino and l.name == devs[0])
        assert (vxl.kind, vxl.lower, vxl.lower_via, vxl.underlay_family) == (
            "vxlan", (node_ino, under.ifindex), "link", socket.AF_INET)
        issues = lab_issues(audit(snap), lab_inodes(lab))
        assert [(i.kind, i.safe_mtu, i.overhead) for i in issues] == [
            ("overlay_too_big", 1450, 50), ("pod_above_overlay", 1450, 50), ("pod_above_overlay", 1450, 50)]
        too_big = issues[0]
        assert too_big.devices == [{"netns": node_ino, "name": vx, "kind": "vxlan", "mtu": 1500},
                                   {"netns": node_ino, "name": devs[0], "kind": under.kind, "mtu": 1500}]
        assert too_big.remediation == [f"ip link set dev {vx} mtu 1450"] + cni_remediation(1450, 50)
        for issue, pod in zip(issues[1:], lab.pod_list):
            assert issue.devices == [
                {"netns": node_ino, "name": pod.veth_node, "kind": "veth", "mtu": 1500},
                {"netns": ino(pod.ns), "name": pod.veth_pod, "kind": "veth", "mtu": 1500}]
            assert issue.remediation[:2] == [
                f"ip link set dev {pod.veth_node} mtu 1450",
                f"ip netns exec {pod.ns} ip link set dev {pod.veth_pod} mtu 1450"]
            assert issue.remediation[2:] == cni_remediation(1450, 50)
            assert f"overlay MTU 1450 ({vx} over {devs[0]})" in issue.summary


def test_bridge_ports_with_different_mtus():
    """(c) two ports of one bridge at 1500 and 1400: one bridge_ports_differ, safe 1400."""
    with Lab(pods=0) as lab:
        node = lab.node
        sh("ip", "link", "add", "br-dpw", "type", "bridge", ns=node)
        for a, b, mtu in (("pa1", "pb1", "1500"), ("pa2", "pb2", "1400")):
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b, ns=node)
            sh("ip", "link", "set", a, "mtu", mtu, ns=node)
            sh("ip", "link", "set", b, "mtu", mtu, ns=node)
            sh("ip", "link", "set", a, "master", "br-dpw", ns=node)
        node_ino = ino(node)
        snap = collect_in(node, all_netns=False)
        issues = lab_issues(audit(snap), {node_ino})
        assert [(i.kind, i.safe_mtu) for i in issues] == [("bridge_ports_differ", 1400)]
        assert issues[0].devices == [{"netns": node_ino, "name": "pa1", "kind": "veth", "mtu": 1500},
                                     {"netns": node_ino, "name": "pa2", "kind": "veth", "mtu": 1400}]
        # the bigger port and its peer, so the pair stays matched
        assert issues[0].remediation == ["ip link set dev pa1 mtu 1400", "ip link set dev pb1 mtu 1400"]
        assert "bridge br-dpw" in issues[0].summary


def test_healthy_overlay_topology_has_no_issue():
    """(d) vxlan at 1450 over a 1500 underlay, pod veths at 1450 on both ends: nothing to report."""
    with Lab(pods=2) as lab:
        devs, vx = overlay_node(lab, vxlan_mtu=None)
        assert mtu_of(lab.node, vx) == 1450  # the kernel's own choice: 1500 - 50
        for pod in lab.pod_list:
            sh("ip", "link", "set", pod.veth_node, "mtu", "1450", ns=lab.node)
            sh("ip", "link", "set", pod.veth_pod, "mtu", "1450", ns=pod.ns)
        snap = collect_in(lab.node)
        assert lab_issues(audit(snap), lab_inodes(lab)) == []


def test_route_mtu_and_pmtu_exception():
    """(e) a route with `mtu 1300` shows in snap.routes; a DF datagram through the node (as a
    router) onto a 1400 link makes the node answer frag-needed / packet-too-big, and the
    sender's PMTU exceptions show in snap.pmtu (IPv4 and IPv6)."""
    with Lab(pods=2) as lab:
        a, b = lab.pod_list
        sh("ip", "link", "set", b.veth_node, "mtu", "1400", ns=lab.node)
        sh("ip", "link", "set", b.veth_pod, "mtu", "1400", ns=b.ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=lab.node)
        for pod in (a, b):
            sh("ip", "route", "add", "default", "via", pod.node_ip4, ns=pod.ns)
            sh("ip", "-6", "route", "add", "default", "via", pod.node_ip6, ns=pod.ns)
        sh("ip", "route", "add", "198.19.0.0/24", "dev", a.veth_pod, "mtu", "1300", ns=a.ns)
        a_ino = ino(a.ns)

        def send_df():
            s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s4.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            s6.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            try:
                for s, dst, size in ((s4, b.ip4, 1472), (s6, b.ip6, 1452)):
                    try:
                        s.sendto(b"x" * size, (dst, 9))
                    except OSError:  # EMSGSIZE once the exception is cached
                        pass
            finally:
                s4.close()
                s6.close()

        deadline = time.monotonic() + 5
        while True:
            in_netns(a.ns, send_df)
            snap = collect_in(a.ns, all_netns=False)
            pm = {p["dst"]: p for p in snap.pmtu if p["netns"] == a_ino}
            if (b.ip4 in pm and b.ip6 in pm) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {"netns": a_ino, "dst": "198.19.0.0/24", "dev": a.veth_pod, "mtu": 1300} in snap.routes
        assert b.ip4 in pm and b.ip6 in pm, snap.pmtu
        for dst in (b.ip4, b.ip6):
            entry = pm[dst]
            assert (entry["dev"], entry["mtu"]) == (a.veth_pod, 1400)
            assert 0 < entry["expires"] <= 600
        # exceptions are not mixed into the configured routes
        assert not any(r["dst"].startswith((b.ip4 + "/", b.ip6 + "/")) for r in snap.routes)
