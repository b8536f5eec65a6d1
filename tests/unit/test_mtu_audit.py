"""Unit tests for the MTU audit's pure parts: overlay_overhead(), audit() and cni_remediation()
on Snapshots built by hand, and Snapshots assembled from netlink records (no root, no
netlink). Inode numbers are small made-up values; NODE is the daemon's own netns."""

from __future__ import annotations

import socket

import pytest

from dpwatch.daemon.host import paths
from dpwatch.probes import encap
from dpwatch.probes.mtu.audit import audit, effective_overlay_mtu, overlay_overhead, skipped_overlays
from dpwatch.probes.mtu.model import Issue, Link, Snapshot
from dpwatch.probes.mtu.peers import peer_read_mode
from dpwatch.probes.mtu.remediation import cni_remediation
from dpwatch.probes.mtu.snapshot import _assemble

NODE, POD1, POD2, PROCNS, NOPATH = 100, 201, 202, 300, 400
PATHS = {NODE: "/run/netns/node", POD1: "/run/netns/pod1", POD2: "/run/netns/pod2",
         PROCNS: "/proc/4242/ns/net"}
V4, V6 = socket.AF_INET, socket.AF_INET6


def link(netns, ifindex, name, kind, mtu, up=True, master=None, lower=None, peer=None, family=None,
         via=None) -> Link:
    if lower is not None and via is None:
        via = "link"
    return Link(netns=netns, ifindex=ifindex, name=name, kind=kind, mtu=mtu, up=up, master=master,
                lower=lower, peer=peer, underlay_family=family, lower_via=via)


def snap(links, routes=(), own=NODE) -> Snapshot:
    return Snapshot(links=list(links), routes=list(routes), pmtu=[], netns_skipped=0, own_netns=own,
                    netns_paths=dict(PATHS))


def veth_pair(ns_a, idx_a, name_a, mtu_a, ns_b, idx_b, name_b, mtu_b, **kw):
    return (link(ns_a, idx_a, name_a, "veth", mtu_a, peer=(ns_b, idx_b), **kw),
            link(ns_b, idx_b, name_b, "veth", mtu_b, peer=(ns_a, idx_a)))


def dev(netns, name, kind, mtu):
    return {"netns": netns, "name": name, "kind": kind, "mtu": mtu}


CNI_1450 = cni_remediation(1450, 50)


# -- overlay_overhead -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,family,expected", [
    ("vxlan", V4, 50), ("vxlan", V6, 70), ("vxlan", None, 50),
    ("geneve", V4, 50), ("geneve", V6, 70), ("geneve", None, 50),
    ("ipip", None, 20), ("ipip", V4, 20), ("sit", None, 20),
    ("gre", None, 24), ("gretap", None, 38), ("ip6gre", None, 44), ("ip6tnl", None, 40),
    ("wireguard", V4, 60), ("wireguard", V6, 80), ("wireguard", None, 60),
    ("veth", None, None), ("bridge", None, None), ("device", None, None), ("loopback", None, None),
])
def test_overlay_overhead(kind, family, expected):
    assert overlay_overhead(link(NODE, 5, "x", kind, 1500, family=family)) == expected


# -- healthy ----------------------------------------------------------------------------------

def healthy_node() -> list[Link]:
    """eth0 1500, vxlan 1450 over it, two pods at 1450 on both ends, a bridge with equal ports."""
    p1n, p1p = veth_pair(NODE, 10, "veth1", 1450, POD1, 2, "eth0", 1450)
    p2n, p2p = veth_pair(NODE, 11, "veth2", 1450, POD2, 2, "eth0", 1450)
    return [
        link(NODE, 1, "lo", "loopback", 65536),
        link(NODE, 2, "eth0", "device", 1500),
        link(NODE, 3, "flannel.1", "vxlan", 1450, lower=(NODE, 2), family=V4),
        link(NODE, 4, "cni0", "bridge", 1450),
        p1n, p2n,
        link(POD1, 1, "lo", "loopback", 65536), p1p,
        link(POD2, 1, "lo", "loopback", 65536), p2p,
    ]


def test_healthy_node_has_no_issue():
    links = healthy_node()
    links[4].master = links[5].master = 4  # both host ends are ports of cni0
    s = snap(links)
    assert audit(s) == []
    assert effective_overlay_mtu(s)[0] == 1450
    assert skipped_overlays(s) == []


def test_no_links_no_issue():
    assert audit(Snapshot(links=[], routes=[], pmtu=[], netns_skipped=0)) == []


# -- veth_mismatch ----------------------------------------------------------------------------

def test_veth_mismatch_across_netns_reported_once():
    a, b = veth_pair(NODE, 10, "veth1", 1500, POD1, 2, "eth0", 1400)
    issues = audit(snap([a, b]))
    assert issues == [Issue(
        kind="veth_mismatch",
        devices=[dev(NODE, "veth1", "veth", 1500), dev(POD1, "eth0", "veth", 1400)],
        overhead=None, safe_mtu=1400,
        summary=("veth pair veth1 (the daemon's netns, MTU 1500) and eth0 (netns pod1, MTU 1400) differ: "
                 "frames over 1400 bytes sent from veth1 are dropped at eth0 with no ICMP error."),
        remediation=["ip link set dev veth1 mtu 1400"])]


def test_veth_mismatch_fix_runs_in_the_bigger_ends_netns():
    a, b = veth_pair(NODE, 10, "veth1", 1400, POD1, 2, "eth0", 1500)
    (issue,) = audit(snap([a, b]))
    assert issue.safe_mtu == 1400
    assert issue.remediation == ["ip netns exec pod1 ip link set dev eth0 mtu 1400"]


def test_netns_paths_under_another_proc_root():
    """With the host's /proc mounted elsewhere (DPWATCH_PROC_ROOT), the audit still names the
    pid of a /proc/PID/ns/net path and enters it with nsenter."""
    a, b = veth_pair(PROCNS, 3, "eth0", 9000, NODE, 7, "veth7", 1500)
    s = snap([a, b])
    s.netns_paths[PROCNS] = "/host/proc/4242/ns/net"
    with paths.roots(proc_root="/host/proc"):
        (issue,) = audit(s)
    assert issue.remediation == ["nsenter --net=/host/proc/4242/ns/net ip link set dev eth0 mtu 1500"]
    assert "eth0 (the netns of pid 4242, MTU 9000)" in issue.summary


def test_encap_overheads():
    assert [encap.overhead(k) for k in ("vxlan", "geneve", "ipip", "gre", "ip6gre", "ip6tnl", "wireguard")] == [
        50, 50, 20, 24, 44, 40, 60]
    assert (encap.overhead("vxlan", V6), encap.overhead("wireguard", V6), encap.overhead("ipip", V6)) == (70, 80, 20)
    assert encap.overhead("veth") is None and encap.overhead("bridge", V4) is None
    assert overlay_overhead(link(NODE, 1, "gretap0", "gretap", 1500)) == encap.overhead("gretap") == 38


def test_veth_mismatch_proc_path_uses_nsenter_and_unknown_path_says_so():
    a, b = veth_pair(PROCNS, 3, "eth0", 9000, NOPATH, 7, "veth7", 1500)
    (issue,) = audit(snap([a, b]))
    assert issue.remediation == ["nsenter --net=/proc/4242/ns/net ip link set dev eth0 mtu 1500"]
    assert "the netns of pid 4242" in issue.summary and "netns 400" in issue.summary
    a, b = veth_pair(PROCNS, 3, "eth0", 1500, NOPATH, 7, "veth7", 9000)
    (issue,) = audit(snap([a, b]))
    assert issue.remediation == ["# netns inode 400 has no known path: ip link set dev veth7 mtu 1500"]


def test_veth_with_unresolved_or_missing_peer_is_not_compared():
    lone = link(NODE, 10, "veth1", "veth", 1500, peer=None)
    dangling = link(NODE, 11, "veth2", "veth", 1500, peer=(POD2, 9))  # that netns was not read
    assert audit(snap([lone, dangling])) == []


def test_same_netns_pair_once():
    a, b = veth_pair(NODE, 10, "va", 1500, NODE, 11, "vb", 1280)
    issues = audit(snap([a, b]))
    assert [i.kind for i in issues] == ["veth_mismatch"]
    assert issues[0].devices == [dev(NODE, "va", "veth", 1500), dev(NODE, "vb", "veth", 1280)]


# -- overlay_too_big --------------------------------------------------------------------------

def test_overlay_too_big_with_link_device():
    s = snap([link(NODE, 2, "eth0", "device", 1500),
              link(NODE, 3, "vxlan42", "vxlan", 1500, lower=(NODE, 2), family=V4)])
    assert audit(s) == [Issue(
        kind="overlay_too_big",
        devices=[dev(NODE, "vxlan42", "vxlan", 1500), dev(NODE, "eth0", "device", 1500)],
        overhead=50, safe_mtu=1450,
        summary=("vxlan device vxlan42 (the daemon's netns) has MTU 1500 but sends through eth0 with MTU "
                 "1500, and vxlan over IPv4 adds 50 bytes, so its full-size packets (1550 bytes) do not "
                 "fit; at most 1450 does."),
        remediation=["ip link set dev vxlan42 mtu 1450"] + CNI_1450)]


def test_overlay_over_ipv6_and_default_route_lower():
    s = snap([link(NODE, 2, "eth0", "device", 1500),
              link(NODE, 3, "vx6", "vxlan", 1450, lower=(NODE, 2), family=V6, via="default-route")])
    (issue,) = audit(s)
    assert (issue.kind, issue.overhead, issue.safe_mtu) == ("overlay_too_big", 70, 1430)
    assert "through eth0 (the default route's device)" in issue.summary
    assert "vxlan over IPv6 adds 70 bytes" in issue.summary


def test_overlay_unknown_family_says_ipv4_is_assumed():
    s = snap([link(NODE, 2, "eth0", "device", 1500),
              link(NODE, 3, "wg0", "wireguard", 1500, lower=(NODE, 2), via="default-route")])
    issues = audit(s)
    assert [(i.kind, i.overhead, i.safe_mtu) for i in issues] == [("overlay_too_big", 60, 1440)]
    assert "over IPv4 (assumed: the underlay family is not visible)" in issues[0].summary


def test_ipip_exactly_fitting_is_fine():
    s = snap([link(NODE, 2, "eth0", "device", 1500),
              link(NODE, 3, "tunl0", "ipip", 1480, lower=(NODE, 2), via="default-route")])
    assert audit(s) == []


def test_unknown_lower_is_skipped_and_listed():
    tun = link(NODE, 3, "geneve0", "geneve", 9000, lower=None)
    s = snap([link(NODE, 2, "eth0", "device", 1500), tun])
    assert [i.kind for i in audit(s)] == []  # no lower: nothing to judge; its own MTU is the cap
    assert skipped_overlays(s) == [dev(NODE, "geneve0", "geneve", 9000)]
    # a lower that points at a device not in the snapshot is unknown too
    tun.lower = (NODE, 99)
    assert audit(s) == [] and len(skipped_overlays(s)) == 1


def test_down_tunnel_is_ignored():
    s = snap([link(NODE, 2, "eth0", "device", 1450),
              link(NODE, 3, "gre0", "gre", 1476, up=False, lower=(NODE, 2), via="default-route")])
    assert audit(s) == []
    assert skipped_overlays(s) == []


# -- bridge_ports_differ ----------------------------------------------------------------------

def test_bridge_ports_differ_once_with_peers_lowered():
    a_host, a_pod = veth_pair(NODE, 10, "veth1", 1500, POD1, 2, "eth0", 1500, master=4)
    b_host, b_pod = veth_pair(NODE, 11, "veth2", 1450, POD2, 2, "eth0", 1450, master=4)
    tap = link(NODE, 12, "tap0", "tun", 1450, master=4)
    s = snap([link(NODE, 4, "cni0", "bridge", 1450), a_host, b_host, tap, a_pod, b_pod])
    assert audit(s) == [Issue(
        kind="bridge_ports_differ",
        devices=[dev(NODE, "veth1", "veth", 1500), dev(NODE, "veth2", "veth", 1450),
                 dev(NODE, "tap0", "tun", 1450)],
        overhead=None, safe_mtu=1450,
        summary=("ports of bridge cni0 (the daemon's netns) have different MTUs (veth1 1500, veth2 1450, "
                 "tap0 1450): frames over 1450 bytes from the bigger ports are dropped at the smaller ones."),
        remediation=["ip link set dev veth1 mtu 1450",
                     "ip netns exec pod1 ip link set dev eth0 mtu 1450"])]


def test_bond_slaves_are_not_bridge_ports():
    s = snap([link(NODE, 4, "bond0", "bond", 1500),
              link(NODE, 5, "ens1", "device", 1500, master=4),
              link(NODE, 6, "ens2", "device", 9000, master=4)])
    assert audit(s) == []


# -- pod_above_overlay ------------------------------------------------------------------------

def classic_black_hole() -> list[Link]:
    """VXLAN at 1450 over a 1500 underlay (correct), pods at 1500 on both ends."""
    p1n, p1p = veth_pair(NODE, 10, "veth1", 1500, POD1, 2, "eth0", 1500)
    p2n, p2p = veth_pair(NODE, 11, "veth2", 1500, POD2, 2, "eth0", 1500)
    return [link(NODE, 2, "eth0", "device", 1500),
            link(NODE, 3, "flannel.1", "vxlan", 1450, lower=(NODE, 2), family=V4),
            p1n, p2n, p1p, p2p]


def test_pod_above_overlay_classic_black_hole():
    issues = audit(snap(classic_black_hole()))
    assert [i.kind for i in issues] == ["pod_above_overlay", "pod_above_overlay"]
    assert issues[0] == Issue(
        kind="pod_above_overlay",
        devices=[dev(NODE, "veth1", "veth", 1500), dev(POD1, "eth0", "veth", 1500)],
        overhead=50, safe_mtu=1450,
        summary=("pod veth veth1 (the daemon's netns, MTU 1500) / eth0 (netns pod1, MTU 1500) is above the "
                 "node's overlay MTU 1450 (flannel.1 over eth0), so pod packets over 1450 bytes to other "
                 "nodes are dropped or must be fragmented."),
        remediation=["ip link set dev veth1 mtu 1450",
                     "ip netns exec pod1 ip link set dev eth0 mtu 1450"] + CNI_1450)
    assert issues[1].devices == [dev(NODE, "veth2", "veth", 1500), dev(POD2, "eth0", "veth", 1500)]
    assert issues[1].remediation[:2] == ["ip link set dev veth2 mtu 1450",
                                         "ip netns exec pod2 ip link set dev eth0 mtu 1450"]


def test_overlay_and_pods_too_big_together():
    links = classic_black_hole()
    links[1].mtu = 1500  # the vxlan device itself is too big as well
    issues = audit(snap(links))
    assert [(i.kind, i.safe_mtu) for i in issues] == [
        ("overlay_too_big", 1450), ("pod_above_overlay", 1450), ("pod_above_overlay", 1450)]


def test_overlay_mtu_caps_when_lower_unknown():
    links = classic_black_hole()
    links[1].lower = None
    links[1].mtu = 1400
    issues = audit(snap(links))
    assert [(i.kind, i.safe_mtu, i.overhead) for i in issues] == [("pod_above_overlay", 1400, 50)] * 2
    assert "(flannel.1)" in issues[0].summary


def test_route_mtu_protects_pod():
    """Cilium style: eth0 at 1500 in the pod, but its default route carries mtu 1450."""
    routes = [{"netns": POD1, "dst": "0.0.0.0/0", "dev": "eth0", "mtu": 1450},
              {"netns": POD2, "dst": "0.0.0.0/0", "dev": "eth0", "mtu": 1480}]  # not enough
    issues = audit(snap(classic_black_hole(), routes))
    assert [i.devices[1]["netns"] for i in issues] == [POD2]


def test_pod_side_below_overlay_is_fine_even_if_host_side_is_bigger():
    host, pod = veth_pair(NODE, 10, "veth1", 1500, POD1, 2, "eth0", 1450)
    s = snap([link(NODE, 2, "eth0", "device", 1500),
              link(NODE, 3, "vxlan.calico", "vxlan", 1450, lower=(NODE, 2), family=V4), host, pod])
    assert [i.kind for i in audit(s)] == ["veth_mismatch"]


def test_host_internal_pair_and_underlay_veth_are_not_pods():
    host_a, host_b = veth_pair(NODE, 20, "cilium_host", 1500, NODE, 21, "cilium_net", 1500)
    under, under_peer = veth_pair(NODE, 2, "eth0", 1500, PROCNS, 30, "vethkind", 1500)
    s = snap([under, link(NODE, 3, "cilium_vxlan", "vxlan", 1500, lower=(NODE, 2), family=V4, up=False),
              link(NODE, 4, "vxlan.calico", "vxlan", 1450, lower=(NODE, 2), family=V4),
              host_a, host_b, under_peer])
    assert audit(s) == []


def test_unresolved_peer_is_judged_on_the_visible_end():
    s = snap([link(NODE, 2, "eth0", "device", 1500),
              link(NODE, 3, "vxlan.calico", "vxlan", 1450, lower=(NODE, 2), family=V4),
              link(NODE, 10, "cali123", "veth", 1500, peer=None)])
    (issue,) = audit(s)
    assert issue.kind == "pod_above_overlay" and issue.devices == [dev(NODE, "cali123", "veth", 1500)]
    assert issue.summary.endswith("; its peer's netns was not collected.")
    assert issue.remediation[0] == "ip link set dev cali123 mtu 1450"


def test_overlay_outside_the_daemons_netns_does_not_define_pod_mtu():
    links = classic_black_hole()
    links[1].netns = POD2  # the vxlan lives in some other netns
    links[1].lower = None
    assert [i.kind for i in audit(snap(links))] == []


def test_smallest_overlay_wins_and_wireguard_counts():
    links = classic_black_hole()
    links.append(link(NODE, 7, "wireguard.cali", "wireguard", 1440, lower=(NODE, 2), via="default-route"))
    issues = audit(snap(links))
    assert [(i.kind, i.safe_mtu, i.overhead) for i in issues] == [("pod_above_overlay", 1440, 60)] * 2
    assert "(wireguard.cali over eth0 (the default route's device))" in issues[0].summary
    assert issues[0].remediation[2:] == cni_remediation(1440, 60)


def test_own_netns_defaults_to_first_link():
    s = snap(classic_black_hole(), own=None)
    assert [i.kind for i in audit(s)] == ["pod_above_overlay"] * 2


def test_audit_is_pure():
    s = snap(classic_black_hole())
    before = repr(s)
    audit(s)
    audit(s)
    assert repr(s) == before


# -- cni_remediation --------------------------------------------------------------------------

def test_cni_remediation_text():
    assert cni_remediation(1450, 50) == [
        "helm upgrade cilium cilium/cilium --namespace kube-system --reuse-values --set MTU=1500"
        "  # Cilium: Helm value MTU (cilium-config key mtu) is the underlying network MTU; Cilium subtracts "
        "the tunnel overhead itself; restart the cilium DaemonSet, then the pods",
        "kubectl patch installation.operator.tigera.io default --type merge "
        "-p '{\"spec\":{\"calicoNetwork\":{\"mtu\":1450}}}'"
        "  # Calico (operator install): Installation spec.calicoNetwork.mtu",
        "kubectl patch configmap/calico-config -n kube-system --type merge -p '{\"data\":{\"veth_mtu\":\"1450\"}}'"
        " && kubectl rollout restart daemonset calico-node -n kube-system"
        "  # Calico (manifest install): ConfigMap calico-config key veth_mtu",
        "kubectl -n kube-flannel edit configmap kube-flannel-cfg"
        "  # Flannel: in cni-conf.json set \"delegate\": {\"mtu\": 1450} on the flannel plugin (namespace "
        "kube-system on older installs); flanneld derives its own MTU from the --iface interface, so fix "
        "that interface's MTU or --iface for the tunnel itself",
    ]


def test_cni_remediation_without_overhead_uses_the_mtu_itself():
    lines = cni_remediation(1400)
    assert "--set MTU=1400 " in lines[0]
    assert '"mtu":1400' in lines[1] and '"veth_mtu":"1400"' in lines[2] and '{"mtu": 1400}' in lines[3]


# -- far ends read by nsid (daemon/host/linkpeer.py) ----------------------------------------------

def own_read(*links: dict) -> dict:
    return {"inode": NODE, "links": list(links), "routes": [], "nsids": {}}


def rec(index, name, mtu, kind="veth", link=None, link_netnsid=None) -> dict:
    return {"index": index, "name": name, "kind": kind, "mtu": mtu, "up": True, "master": None,
            "link": link, "link_netnsid": link_netnsid, "lower": None, "family": None}


def by_nsid(node_mtu, pod_mtu, names, nsid=3) -> Snapshot:
    """The daemon's netns with veth1 (ifindex 10) whose far end, eth0 (ifindex 2 in the netns
    it numbers ``nsid``), was read by nsid; ``names``: {nsid: (inode, path)} that matched."""
    node = own_read(rec(1, "lo", 65536, kind="loopback"), rec(10, "veth1", node_mtu, link=2, link_netnsid=nsid))
    peers = {"links": {10: rec(2, "eth0", pod_mtu, link=10, link_netnsid=7)}, "names": names,
             "stats": {"wanted": 1, "read": 1, "refused": 0, "unnamed": 0 if names else 1, "error": ""}}
    return _assemble({NODE: node}, NODE, {}, 0, peers)


def test_far_end_read_by_nsid_joins_the_snapshot():
    s = by_nsid(1400, 1500, {3: (POD1, "/run/netns/cni-1")})
    assert s.netns_ids == {POD1: 3} and s.netns_paths == {POD1: "/run/netns/cni-1"}
    ends = {l.name: l for l in s.links if l.kind == "veth"}
    assert ends["veth1"].peer == (POD1, 2) and ends["eth0"].peer == (NODE, 10)
    assert [l.name for l in s.links] == ["lo", "veth1", "eth0"]  # the far end follows its node end


def test_pod_end_bigger_read_by_nsid():
    """(a) pod end 1500 behind a node veth of 1400: the pod end is lowered, in its netns."""
    (issue,) = audit(by_nsid(1400, 1500, {3: (POD1, "/run/netns/cni-1")}))
    assert issue.kind == "veth_mismatch" and issue.safe_mtu == 1400
    assert issue.devices == [dev(NODE, "veth1", "veth", 1400),
                             dict(dev(POD1, "eth0", "veth", 1500), netnsid=3, netns_path="/run/netns/cni-1")]
    assert issue.remediation == ["ip netns exec cni-1 ip link set dev eth0 mtu 1400"]
    assert f"eth0 (netns cni-1 (inode {POD1}, nsid 3), MTU 1500)" in issue.summary


def test_node_end_bigger_read_by_nsid():
    """(b) node end 1500, pod end 1400: the node end is lowered, in the daemon's netns."""
    (issue,) = audit(by_nsid(1500, 1400, {3: (PROCNS, "/proc/4242/ns/net")}))
    assert issue.remediation == ["ip link set dev veth1 mtu 1400"]
    assert issue.devices[1]["netns_path"] == "/proc/4242/ns/net"
    assert "the netns of pid 4242 (inode 300, nsid 3)" in issue.summary


def test_unnamed_far_end_is_known_by_its_nsid():
    s = by_nsid(1400, 1500, {})
    (issue,) = audit(s)
    assert issue.devices[1] == {"netns": None, "name": "eth0", "kind": "veth", "mtu": 1500,
                                "netnsid": 3, "netns_path": None}
    assert "eth0 (the netns with nsid 3, MTU 1500)" in issue.summary
    assert issue.remediation == [
        "# in the netns the node's netns numbers nsid 3 (no file of it is visible to dpwatch; "
        "`ip netns list-id` on the node names it): ip link set dev eth0 mtu 1400"]


def test_far_end_of_a_netns_read_whole_is_not_added_twice():
    node = own_read(rec(10, "veth1", 1500, link=2, link_netnsid=3))
    pod = {"inode": POD1, "links": [rec(2, "eth0", 1400, link=10, link_netnsid=0)], "routes": [], "nsids": {}}
    peers = {"links": {10: rec(2, "eth0", 1400, link=10)}, "names": {3: (POD1, "/run/netns/pod1")}, "stats": {}}
    s = _assemble({NODE: node, POD1: pod}, NODE, dict(PATHS), 0, peers)
    assert [(l.netns, l.name) for l in s.links] == [(NODE, "veth1"), (POD1, "eth0")]
    assert s.netns_ids == {} and s.links[0].peer == (POD1, 2)


def pods_agreeing(odd_node, odd_pod, others=1500, n=3) -> Snapshot:
    links = []
    for i in range(n):
        links += veth_pair(NODE, 10 + i, f"veth{i}", others, POD1 + i * 1000, 2, "eth0", others)
    links += veth_pair(NODE, 20, "vethodd", odd_node, POD2, 2, "eth0", odd_pod)
    return snap(links)


@pytest.mark.parametrize("odd_node,odd_pod,fix", [
    (1500, 1400, "ip netns exec pod2 ip link set dev eth0 mtu 1500"),   # the pod end is the odd one
    (1400, 1500, "ip link set dev vethodd mtu 1500"),                    # the node end is
])
def test_the_end_that_differs_from_the_nodes_pod_mtu_is_changed(odd_node, odd_pod, fix):
    (issue,) = audit(pods_agreeing(odd_node, odd_pod))
    assert issue.safe_mtu == 1400 and issue.remediation == [fix]
    assert "3 other pod veth pairs of this node are MTU 1500 on both ends" in issue.summary


def test_pod_mtu_needs_two_agreeing_pairs_and_a_majority():
    (issue,) = audit(pods_agreeing(1500, 1400, n=1))  # one other pair: not enough to go by
    assert issue.remediation == ["ip link set dev vethodd mtu 1400"]
    links = list(pods_agreeing(1500, 1400, n=2).links)
    links += veth_pair(NODE, 30, "vethx", 9000, PROCNS, 2, "eth0", 9000)
    links += veth_pair(NODE, 31, "vethy", 9000, NOPATH, 2, "eth0", 9000)  # 2 at 1500, 2 at 9000: no majority
    (issue,) = audit(snap(links))
    assert issue.remediation == ["ip link set dev vethodd mtu 1400"]


def test_peer_read_mode():
    def with_peers(**kw):
        return Snapshot(links=[], routes=[], pmtu=[], netns_skipped=0, peers=kw)
    assert peer_read_mode(None, False) == "netnsid"
    assert peer_read_mode(with_peers(wanted=0, read=0), True) == "all_netns"
    assert peer_read_mode(with_peers(wanted=2, read=1, refused=1, error="EINVAL: x"), True) == "netnsid"
    assert peer_read_mode(with_peers(wanted=2, read=0, refused=2, error="EACCES: Permission denied"), False) == (
        "unavailable: EACCES: Permission denied; the far ends of 2 veth(s) are not compared")
