"""Kernel tier: the far end of a veth read from the node netns by nsid (daemon/host/linkpeer.py),
with real namespaces and real veths; no BPF.

Each check runs inside the lab's node netns: as root through daemon.netns.run_in, or as a
child process under capsh whose bounding set keeps only the capabilities named (uid 0, so
that is exactly what it has), to show what CAP_NET_ADMIN alone gives and what its absence
costs. A netns that only a process holds (no /run/netns file) is made with unshare(1).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from dpwatch.daemon.host import linkpeer
from dpwatch.daemon.host import netns as netns_mod
from dpwatch.probes.mtu.audit import audit
from dpwatch.probes.mtu.peers import peer_read_mode, peers_changed
from dpwatch.probes.mtu.snapshot import collect
from netlab import Lab, sh
from test_mtuaudit_kernel import ino, lab_issues

PROBE = """
import json
from dpwatch.probes.mtu.audit import audit
from dpwatch.probes.mtu.peers import peer_read_mode
from dpwatch.probes.mtu.snapshot import collect
snap = collect(all_netns=False)
print(json.dumps({"peers": snap.peers, "mode": peer_read_mode(snap, False),
                  "issues": [{"devices": i.devices, "remediation": i.remediation, "summary": i.summary}
                             for i in audit(snap) if i.kind == "veth_mismatch"]}))
"""


def link_netnsid(ns: str, dev: str) -> int:
    return int(json.loads(sh("ip", "-j", "link", "show", "dev", dev, ns=ns).stdout)[0]["link_netnsid"])


def collect_under_caps(ns: str, keep: list[str]) -> dict:
    """PROBE's output, run in netns ``ns`` by uid 0 with only the capabilities in ``keep``."""
    have = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    bounding = re.search(r"^Bounding set =(.*)$", have, re.M).group(1)
    drop = [c.strip() for c in bounding.split(",") if c.strip() and c.strip() not in keep]
    res = subprocess.run(["ip", "netns", "exec", ns, "capsh", f"--drop={','.join(drop)}", "--", "-c",
                          'exec "$0" "$@"', sys.executable, "-c", PROBE],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_far_end_read_by_nsid():
    """As root, without all_netns: the pod end's name and MTU come back by nsid, its netns is
    named by its /run/netns file, and a change of the pod end's MTU (announced only in the
    pod's netns) is seen by peers_changed()."""
    with Lab(pods=1) as lab:
        pod = lab.pod
        sh("ip", "link", "set", pod.veth_pod, "mtu", "1400", ns=pod.ns)
        nsid = link_netnsid(lab.node, pod.veth_node)
        node_ino, pod_ino = ino(lab.node), ino(pod.ns)
        with_nsid = netns_mod.run_in(f"/run/netns/{lab.node}", lambda: _get(pod.veth_pod, pod.ns, nsid))
        assert (with_nsid["name"], with_nsid["mtu"], with_nsid["kind"]) == (pod.veth_pod, 1400, "veth")

        snap = collect_in_node(lab)
        assert snap.peers == {"wanted": 1, "read": 1, "refused": 0, "unnamed": 0, "error": ""}
        assert snap.netns_ids == {pod_ino: nsid} and snap.netns_paths[pod_ino] == f"/run/netns/{pod.ns}"
        (issue,) = lab_issues(audit(snap), {node_ino, pod_ino})
        assert issue.devices == [
            {"netns": node_ino, "name": pod.veth_node, "kind": "veth", "mtu": 1500},
            {"netns": pod_ino, "name": pod.veth_pod, "kind": "veth", "mtu": 1400, "netnsid": nsid,
             "netns_path": f"/run/netns/{pod.ns}"}]
        assert issue.remediation == [f"ip link set dev {pod.veth_node} mtu 1400"]
        assert peer_read_mode(snap, False) == "netnsid"

        in_node = lambda fn: netns_mod.run_in(f"/run/netns/{lab.node}", fn)  # noqa: E731
        assert in_node(lambda: peers_changed(snap)) is False
        sh("ip", "link", "set", pod.veth_pod, "mtu", "1500", ns=pod.ns)
        assert in_node(lambda: peers_changed(snap)) is True
        assert lab_issues(audit(collect_in_node(lab)), {node_ino, pod_ino}) == []


def _get(dev: str, ns: str, nsid: int) -> dict:
    index = int(sh("cat", f"/sys/class/net/{dev}/ifindex", ns=ns).stdout)
    with linkpeer.PeerReader() as r:
        return r.get_link(index, nsid)


def collect_in_node(lab: Lab):
    return netns_mod.run_in(f"/run/netns/{lab.node}", lambda: collect(all_netns=False))


@pytest.fixture
def proc_netns(lab):
    """A netns held only by a process (no /run/netns file), with the far end of a veth from the
    lab's node netns: (pid, node end, far end)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    node_end, far_end = f"dpwq{lab.tag}"[:15], f"dpwr{lab.tag}"[:15]
    try:
        deadline = time.monotonic() + 5
        while netns_mod.inode_of(f"/proc/{proc.pid}/ns/net") == netns_mod.inode_of("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare did not make its netns"
            time.sleep(0.02)
        sh("ip", "link", "add", node_end, "type", "veth", "peer", "name", far_end)
        sh("ip", "link", "set", node_end, "netns", lab.node)
        sh("ip", "link", "set", far_end, "netns", str(proc.pid))
        sh("nsenter", f"--net=/proc/{proc.pid}/ns/net", "ip", "link", "set", far_end, "mtu", "1500", "up")
        sh("ip", "link", "set", node_end, "mtu", "1400", "up", ns=lab.node)
        yield proc.pid, node_end, far_end
    finally:
        proc.kill()
        proc.wait()


def test_only_net_admin_reads_the_far_end(lab, proc_netns):
    """uid 0 with CAP_NET_ADMIN only (no SYS_ADMIN, no SYS_PTRACE): the pod end behind a /run/netns
    file and the one only a full-capability process holds are both read. The first is named by
    its file; the second's /proc/PID/ns/net cannot be opened, so it is known by its nsid."""
    pid, node_end, far_end = proc_netns
    sh("ip", "link", "set", lab.pod.veth_pod, "mtu", "9000", ns=lab.pod.ns)
    out = collect_under_caps(lab.node, ["cap_net_admin"])
    assert out["mode"] == "netnsid" and out["peers"]["read"] == 2 and out["peers"]["unnamed"] == 1, out
    by_node = {i["devices"][0]["name"]: i for i in out["issues"]}
    named = by_node[lab.pod.veth_node]
    assert named["devices"][1]["netns_path"] == f"/run/netns/{lab.pod.ns}"
    assert named["remediation"] == [f"ip netns exec {lab.pod.ns} ip link set dev {lab.pod.veth_pod} mtu 1500"]
    unnamed = by_node[node_end]
    nsid = link_netnsid(lab.node, node_end)
    assert unnamed["devices"][1] == {"netns": None, "name": far_end, "kind": "veth", "mtu": 1500,
                                     "netnsid": nsid, "netns_path": None}
    assert unnamed["remediation"] == [
        f"# in the netns the node's netns numbers nsid {nsid} (no file of it is visible to dpwatch; "
        f"`ip netns list-id` on the node names it): ip link set dev {far_end} mtu 1400"]

    # As root, the process's netns is named by its /proc path.
    snap = collect_in_node(lab)
    (issue,) = [i for i in audit(snap) if i.devices[0]["name"] == node_end]
    assert issue.remediation == [f"nsenter --net=/proc/{pid}/ns/net ip link set dev {far_end} mtu 1400"]


def test_without_net_admin_the_kernel_refuses_and_the_audit_falls_back(lab):
    """No capabilities at all: RTM_GETLINK by nsid is refused (EACCES), the pod end stays unseen
    as before (no veth_mismatch), and the reason is what /probes shows."""
    sh("ip", "link", "set", lab.pod.veth_pod, "mtu", "1400", ns=lab.pod.ns)
    out = collect_under_caps(lab.node, [])
    assert out["issues"] == []
    assert out["peers"] == {"wanted": 1, "read": 0, "refused": 1, "unnamed": 0,
                            "error": "EACCES: Permission denied"}
    assert out["mode"] == "unavailable: EACCES: Permission denied; the far ends of 1 veth(s) are not compared"
