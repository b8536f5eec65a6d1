"""MTU, path-MTU and fragmentation incidents: a link narrower than its neighbours (a veth pair
with unequal ends in either direction, bridge ports that differ, an overlay too big for its
underlay), a router that answers packets too big with frag-needed (ICMP delivered, or filtered:
a PMTU black hole, at the node or in the sending pod; IPv4 and IPv6), fragmentation without a
mismatch, reassembly timeouts and reassembly memory filled by incomplete fragment sets, and a
mismatch with the fragmentation it causes.

The daemon runs with its default flags: no --mtu-all-netns, so the pod end of each veth is read
by nsid. Faults on links are made after the daemon is up (the link watch and the peer poll must
notice them); every incident then sends real traffic through the fault, counted at the far end.
"""

from __future__ import annotations

import pytest

import json
import socket
import struct
import time

from harness import Incident
from netlab import in_netns, read_snmp, sh
from test_frag_mtu_kernel import _fragment
from test_triage_e2e import _router_with_mismatch, _send_unfragmented_df_off
from topologies import Sink, add_addresses, bridged, overlay, routed, send, set_mtu, set_underlay

BIG, SMALL = 1472, 100          # UDP payloads: a full 1500-byte IPv4 packet, and one that fits anywhere
BIG6 = 1452                     # the same for IPv6 (40-byte header)


def top_of(rep: dict) -> dict:
    """The top finding (printed: pytest shows it when the test fails, or with -s)."""
    top = rep["findings"][0]
    print(json.dumps(top, indent=1))
    return top


def mismatch(rep: dict, kind: str) -> list[dict]:
    """The mismatches of one kind in the top finding."""
    return [m for m in rep["findings"][0]["evidence"]["mismatches"] if m["kind"] == kind]


def has(kind: str):
    return lambda f: any(m["kind"] == kind for m in f["evidence"].get("mismatches", []))


def through(src_ns: str, dst_ns: str, dst: str, family: int = socket.AF_INET, big: int = BIG,
            count: int = 5) -> list[int]:
    """``count`` big and ``count`` small datagrams without DF from src_ns to dst; the payload
    sizes that reached a socket in dst_ns."""
    sink = Sink(dst_ns, family)
    try:
        send(src_ns, [dst], big, df=False, per_dst=count, family=family)
        send(src_ns, [dst], SMALL, df=False, per_dst=count, family=family)
        time.sleep(0.3)
    finally:
        sink.close()
    return sorted(sink.received)


# -- the MTU audit: links that disagree ---------------------------------------------------------

def test_mtu_veth_pod_end_bigger():
    """A pod's eth0 is 1500 behind a node veth of 1400, on a node whose other pods are 1500 on
    both ends: the pod's full-size frames vanish at the node end, small ones pass. The pod end
    is read by nsid from the node's netns; the node end is the one that differs, so the fix
    raises it to the node's pod MTU."""
    with Incident("mtu_veth_pod_end_bigger", pods=3) as inc:
        pod = inc.lab.pod_list[2]
        inc.start()
        inc.fault()
        set_mtu(inc.lab.node, pod.veth_node, 1400)
        assert through(pod.ns, inc.lab.node, pod.node_ip4) == [SMALL] * 5
        rep = inc.expect_top("mtu.mismatch", check=has("veth_mismatch"))
    top = top_of(rep)
    (m,) = mismatch(rep, "veth_mismatch")
    node_end, pod_end = m["devices"]
    assert (node_end["name"], node_end["mtu"]) == (pod.veth_node, 1400)
    assert (pod_end["name"], pod_end["mtu"]) == (pod.veth_pod, 1500)
    assert pod_end["netns_path"] == f"/run/netns/{pod.ns}" and pod_end["netnsid"] is not None
    assert m["safe_mtu"] == 1400 and top["severity"] == "critical"
    assert f"netns {pod.ns}" in top["summary"]
    assert f"ip link set dev {pod.veth_node} mtu 1500" in top["remediation"]


def test_mtu_veth_node_end_bigger():
    """The other way round: the node's end of a pod veth is 1500, the pod's eth0 1400 (changed
    inside the pod, so only the peer poll sees it). The node's full-size frames to the pod are
    dropped at the pod end; the fix lowers the node end."""
    with Incident("mtu_veth_node_end_bigger", pods=1) as inc:
        pod = inc.lab.pod
        inc.start()
        inc.fault()
        set_mtu(pod.ns, pod.veth_pod, 1400)
        assert through(inc.lab.node, pod.ns, pod.ip4) == [SMALL] * 5
        rep = inc.expect_top("mtu.mismatch", check=has("veth_mismatch"))
    top = top_of(rep)
    (m,) = mismatch(rep, "veth_mismatch")
    assert [(d["name"], d["mtu"]) for d in m["devices"]] == [(pod.veth_node, 1500), (pod.veth_pod, 1400)]
    assert m["devices"][1]["netns_path"] == f"/run/netns/{pod.ns}"
    assert m["safe_mtu"] == 1400 == top["evidence"]["safe_mtu"]
    assert f"ip link set dev {pod.veth_node} mtu 1400" in top["remediation"]
    # The node's own datagrams over 1400 were lost at the pod end; their senders got ENOBUFS,
    # counted as UDP SndbufErrors. Four, not five: the first waited for ARP, and its loss then
    # reached no socket.
    bufs = top["evidence"]["related"]["node.socket_buffers_small"]
    assert bufs["buffer_errors_in_window"] == 4 and "4 UDP buffer errors" in top["summary"]
    assert not any(r.startswith("sysctl") for r in top["remediation"])


def test_mtu_bridge_ports_differ():
    """Pods on a CNI bridge (cni0) of the node, bridge netfilter on as Kubernetes wants it: one
    pod's veth pair is lowered to 1400 on both ends (no veth mismatch), so the bridge's ports
    differ. The bridge fragments what it forwards to the narrow port: 10 datagrams, 20
    fragments, folded into the mismatch."""
    with Incident("mtu_bridge_ports_differ", pods=2) as inc:
        node, (p0, p1) = inc.lab.node, inc.lab.pod_list
        sh("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", ns=node)
        bridge, addrs = bridged(inc.lab)
        inc.start()
        inc.fault()
        set_mtu(node, p1.veth_node, 1400)
        set_mtu(p1.ns, p1.veth_pod, 1400)
        sink = Sink(p1.ns)
        inc.on_close(sink.close)
        assert send(p0.ns, [addrs[1]], BIG, df=False, per_dst=10) == (10, 0)
        rep = inc.expect_top("mtu.mismatch", check=has("bridge_ports_differ"))
    top = top_of(rep)
    (m,) = mismatch(rep, "bridge_ports_differ")
    assert sorted((d["name"], d["mtu"]) for d in m["devices"]) == sorted([(p0.veth_node, 1500), (p1.veth_node, 1400)])
    assert m["safe_mtu"] == 1400 and not mismatch(rep, "veth_mismatch")
    assert f"ports of bridge {bridge}" in top["summary"]
    assert f"ip link set dev {p0.veth_node} mtu 1400" in top["remediation"]
    frag = top["evidence"]["related"]["frag.fragmentation_active"]
    assert frag["fragments_created"] == {"ipv4": 20, "ipv6": 0}
    assert sink.received == [BIG] * 10  # reassembled by the pod


def test_overlay_mtu_too_big():
    """A vxlan at 1500 over an underlay that was 1600 and is lowered to 1500 (the second node's
    end too): the tunnel no longer fits (1500 + 50 > 1500), and the pod at 1500 is above the
    overlay's 1450. A pod's datagrams to the second node go out as fragmented VXLAN packets:
    10 datagrams, 20 fragments."""
    with Incident("overlay_mtu_too_big", pods=2) as inc:
        node, pod = inc.lab.node, inc.lab.pod
        ov = overlay(inc.lab, vxlan_mtu=1500, underlay_mtu=1600)
        inc.start()
        inc.fault()
        set_underlay(inc.lab, ov.remote, 1500)
        sink = Sink(ov.remote.ns)
        inc.on_close(sink.close)
        assert send(pod.ns, [ov.remote_ip], BIG, df=False, per_dst=10) == (10, 0)
        rep = inc.expect_top("mtu.mismatch", check=has("overlay_too_big"))
    top = top_of(rep)
    (m,) = mismatch(rep, "overlay_too_big")
    assert [(d["name"], d["kind"], d["mtu"]) for d in m["devices"]] == [
        (ov.vxlan, "vxlan", 1500), (ov.underlay, "veth", 1500)]
    assert (m["overhead"], m["safe_mtu"]) == (50, 1450) and top["evidence"]["safe_mtu"] == 1450
    (p,) = mismatch(rep, "pod_above_overlay")
    assert {d["name"] for d in p["devices"]} == {pod.veth_node, pod.veth_pod}
    assert f"ip link set dev {ov.vxlan} mtu 1450" in top["remediation"]
    frag = top["evidence"]["related"]["frag.fragmentation_active"]
    assert frag["fragments_created"] == {"ipv4": 20, "ipv6": 0}
    assert sink.received == [BIG] * 10


# -- path MTU discovery -------------------------------------------------------------------------

def test_pmtu_frag_needed_icmp_ok():
    """The node routes between pod A (1500) and pod B (1400 on both ends). A sends DF datagrams
    of 1472 bytes, three to each of five addresses of B: the first to each is refused with
    frag-needed (MTU 1400), A caches the path MTU and refuses the other two itself (EMSGSIZE).
    Path MTU discovery that works: 1372-byte datagrams then arrive."""
    with Incident("pmtu_frag_needed_icmp_ok", pods=2) as inc:
        a, b = routed(inc.lab)
        dsts = [b.ip4] + add_addresses(b, 4)
        sink = Sink(b.ns)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        assert send(a.ns, dsts, BIG, df=True, per_dst=3) == (5, 10)
        assert send(a.ns, dsts, BIG - 100, df=True) == (5, 0)
        rep = inc.expect_top("mtu.pmtu_frag_needed")
    top = top_of(rep)
    ev = top["evidence"]
    assert top["severity"] == "warning" and "black hole" not in top["title"]
    # Where kprobes exist (the 6.1 guest), the mtu probe also counts the frag-needed A received.
    kprobe = next(p for p in rep["probes"] if p["name"] == "mtu")["mode"] == "kprobe"
    assert ev["frag_needed"] == {"ipv4_sent": 5, **({"ipv4_received": 5} if kprobe else {})}
    assert ev["announced_mtus"] == [1400]
    assert sorted((r["dst"], r["mtu"], r["count"]) for r in ev["recent"]
                  if r["direction"] == "sent") == [(d, 1400, 1) for d in sorted(dsts)]
    failed = ev["related"]["frag.fragmentation_failed"]
    assert failed["fragmentation_failed"] == {"ipv4": 5, "ipv6": 0} and failed["frag_needed_sent"] == 5
    assert "drops.netfilter" not in ev["related"]
    assert sink.received == [BIG - 100] * 5


DROP_FRAG_NEEDED = {  # nft rule: the ICMP that tells a sender its packet was too big
    socket.AF_INET: "icmp type destination-unreachable icmp code frag-needed drop",
    socket.AF_INET6: "icmpv6 type packet-too-big drop",
}


def black_hole(name: str, family: int, hook: str) -> tuple[dict, list[int], str]:
    """A -> node -> B (1400) with the frag-needed / packet-too-big filtered, in the node's
    output chain (``hook`` "output") or in A's own input ("input"): A never learns the path MTU
    and sends its full-size DF datagrams ten times; each is dropped at the node, none arrives.
    Returns the report, what B received and B's address."""
    v6 = family == socket.AF_INET6
    with Incident(name, pods=2) as inc:
        a, b = routed(inc.lab)
        sh("nft", "-f", "-", ns=inc.lab.node if hook == "output" else a.ns, input=(
            f"table inet fw {{\n chain c {{\n  type filter hook {hook} priority 0;\n"
            f"  {DROP_FRAG_NEEDED[family]}\n }}\n}}\n"))
        sink = Sink(b.ns, family)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        dst = b.ip6 if v6 else b.ip4
        assert send(a.ns, [dst], BIG6 if v6 else BIG, df=True, per_dst=10, family=family, gap=0.05) == (10, 0)
        rep = inc.expect_top("mtu.pmtu_frag_needed", check=lambda f: f["severity"] == "critical")
    return rep, sink.received, dst


def check_black_hole(rep: dict, family: str) -> dict:
    """The top finding of black_hole(): a PMTU black hole, ICMP filtered, 10 of everything."""
    top = top_of(rep)
    ev = top["evidence"]
    other = "ipv6" if family == "ipv4" else "ipv4"
    assert top["title"].startswith("PMTU black hole") and top["summary"].startswith("PMTU black hole")
    assert "netfilter dropped 10" in top["summary"] and "never learn the path MTU" in top["summary"]
    assert ev["frag_needed"] == {f"{family}_sent": 10} and ev["frag_needed_filtered"] == 10
    assert ev["netfilter_drops"] == {family: 10}
    assert ev["related"]["drops.netfilter"]["drops"] == 10
    assert ev["related"]["frag.fragmentation_failed"]["fragmentation_failed"] == {family: 10, other: 0}
    assert top["remediation"][0].startswith("nft list ruleset")
    return ev


def test_pmtu_icmp_blocked():
    """The same path as pmtu_frag_needed_icmp_ok, but the node's firewall drops its own ICMP
    frag-needed on the way out: a PMTU black hole, and the top finding says ICMP is filtered."""
    rep, received, dst = black_hole("pmtu_icmp_blocked", socket.AF_INET, "output")
    ev = check_black_hole(rep, "ipv4")
    assert [(r["dst"], r["mtu"], r["count"]) for r in ev["recent"]] == [(dst, 1400, 10)]
    assert "frag-needed went out again and again" in rep["findings"][0]["summary"]
    assert received == []


def test_pmtu_icmp_blocked_in_the_pod():
    """The frag-needed leave the node and the sending pod's own firewall drops them (a policy
    that blocks ICMP): the same black hole, seen from the node."""
    rep, received, dst = black_hole("pmtu_icmp_blocked_in_pod", socket.AF_INET, "input")
    ev = check_black_hole(rep, "ipv4")
    assert [(r["dst"], r["mtu"], r["count"]) for r in ev["recent"]] == [(dst, 1400, 10)]
    assert received == []


def test_ipv6_pmtu_icmp_blocked():
    """IPv6: the node's firewall drops its packet-too-big. Routers never fragment IPv6, so
    without them nothing over 1400 bytes gets through at all."""
    rep, received, dst = black_hole("ipv6_pmtu_icmp_blocked", socket.AF_INET6, "output")
    check_black_hole(rep, "ipv6")
    assert received == []


def test_ipv6_pmtu():
    """IPv6 is never fragmented in transit: the node answers A's 1452-byte datagrams (1500-byte
    packets) to four addresses of B (1400) with packet-too-big; A caches the path MTU (IPv6
    PMTU discovery on: the next sends fail with EMSGSIZE), and 1352-byte ones then arrive."""
    with Incident("ipv6_pmtu", pods=2) as inc:
        a, b = routed(inc.lab)
        dsts = [b.ip6] + add_addresses(b, 3, socket.AF_INET6)
        sink = Sink(b.ns, socket.AF_INET6)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        assert send(a.ns, dsts, BIG6, df=True, per_dst=3, family=socket.AF_INET6) == (4, 8)
        assert send(a.ns, dsts, BIG6 - 100, df=True, family=socket.AF_INET6) == (4, 0)
        rep = inc.expect_top("mtu.pmtu_frag_needed")
    top = top_of(rep)
    ev = top["evidence"]
    assert ev["frag_needed"] == {"ipv6_sent": 4} and top["severity"] == "warning"
    failed = ev["related"]["frag.fragmentation_failed"]
    assert failed["fragmentation_failed"] == {"ipv4": 0, "ipv6": 4} and failed["frag_needed_sent"] == 4
    assert failed["fragments_created"] == {"ipv4": 0, "ipv6": 0}
    assert sink.received == [BIG6 - 100] * 4


# -- fragmentation and reassembly ---------------------------------------------------------------

def test_fragmentation_active():
    """DF off: the node fragments A's 1500-byte packets for B's 1400 link (consistent on both
    ends, so no mismatch): 10 datagrams, 20 fragments, all reassembled at B."""
    with Incident("fragmentation_active", pods=2) as inc:
        a, b = routed(inc.lab)
        sink = Sink(b.ns)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        assert send(a.ns, [b.ip4], BIG, df=False, per_dst=10) == (10, 0)
        rep = inc.expect_top("frag.fragmentation_active")
    top = top_of(rep)
    assert top["evidence"]["fragments_created"] == {"ipv4": 20, "ipv6": 0}
    assert top["evidence"]["fragmentation_failed"] == {"ipv4": 0, "ipv6": 0}
    assert top["evidence"]["smaller_links"] == [{"name": b.veth_node, "kind": "veth", "mtu": 1400}]
    assert f"{b.veth_node} (MTU 1400) below the 1500 of the others" in top["summary"]
    assert sink.received == [BIG] * 10


def test_reassembly_timeouts():
    """A pod sends the node four UDP datagrams as three fragments each with the middle one lost
    (and one whole): the node (net.ipv4.ipfrag_time 2) times the four incomplete ones out."""
    with Incident("reassembly_timeouts", pods=1) as inc:
        pod, node = inc.lab.pod, inc.lab.node
        sh("sysctl", "-qw", "net.ipv4.ipfrag_time=2", ns=node)
        sink = Sink(node)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        send_fragments(pod, range(0x4100, 0x4104), lose_middle=True)
        send_fragments(pod, [0x4104], lose_middle=False)
        rep = inc.expect_top("frag.reassembly_failures", check=lambda f: sum(
            f["evidence"]["reassembly_timeouts"].values()) >= 4)
    ev = top_of(rep)["evidence"]
    assert ev["reassembly_timeouts"] == {"ipv4": 4, "ipv6": 0}
    assert ev["reassembly_failed"] == {"ipv4": 4, "ipv6": 0}
    assert ev["failed_without_timeout"] == {"ipv4": 0, "ipv6": 0}
    assert ev["net.ipv4.ipfrag_time"] == 2
    assert ev["drop_reasons"]["FRAG_REASM_TIMEOUT"] >= 4  # counted host-wide
    assert "4 fragment sets timed out incomplete" in rep["findings"][0]["summary"]
    assert sink.received == [2400]


def test_reassembly_memory_full():
    """A pod floods the node with fragment sets that never complete (1200, a piece of each
    missing). With the default limits (ipfrag_high_thresh 4 MiB, ipfrag_time 30 s) reassembly
    memory fills and the kernel refuses every further fragment: the pod's next ten datagrams
    arrive whole and are lost too. The refusals are unreasoned drops in ip_defrag, which the
    drops probe's catch-all finding would report on its own."""
    with Incident("reassembly_memory_full", pods=1) as inc:
        pod, node = inc.lab.pod, inc.lab.node
        sink = Sink(node)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        send_fragments(pod, range(1200), lose_middle=True)
        send_fragments(pod, range(5000, 5010), lose_middle=False)
        rep = inc.expect_top("frag.reassembly_failures",
                             check=lambda f: f["evidence"]["failed_without_timeout"]["ipv4"] >= 30)
        counted = read_snmp(node, "Ip")  # the node's own counters, for the exact numbers
        high = int(sh("sysctl", "-n", "net.ipv4.ipfrag_high_thresh", ns=node).stdout)
    top = top_of(rep)
    ev = top["evidence"]
    assert counted["ReasmTimeout"] == 0 and counted["ReasmOKs"] == 0
    assert ev["reassembly_failed"] == {"ipv4": counted["ReasmFails"], "ipv6": 0}
    assert ev["failed_without_timeout"] == ev["reassembly_failed"]
    assert ev["reassembly_timeouts"] == {"ipv4": 0, "ipv6": 0}
    assert ev["net.ipv4.ipfrag_high_thresh"] == high and ev["reassembly_memory_bytes"]["ipv4"] >= 0.9 * high
    assert "the kernel refuses fragments while the reassembly memory is above" in top["summary"]
    assert f"sysctl -w net.ipv4.ipfrag_high_thresh={2 * high}" in top["remediation"]
    assert sink.received == []


def send_fragments(pod, idents, lose_middle: bool, size: int = 2400) -> None:
    """From the pod to the node: one UDP datagram per ident, as three fragments (the middle
    one left out with ``lose_middle``), through a raw socket."""
    raw = in_netns(pod.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
    try:
        for ident in idents:
            for i, frag in enumerate(_udp_fragments(pod.ip4, pod.node_ip4, ident, size, 3)):
                if not (lose_middle and i == 1):
                    raw.sendto(frag, (pod.node_ip4, 0))
    finally:
        raw.close()


def _udp_fragments(src: str, dst: str, ident: int, size: int, parts: int) -> list[bytes]:
    """A UDP datagram to port 9 with ``size`` bytes of payload, as ``parts`` IPv4 fragments."""
    data = struct.pack("!HHHH", 40000, 9, 8 + size, 0) + b"r" * size  # UDP checksum 0: none
    step = (-(-len(data) // parts) + 7) // 8 * 8  # a multiple of 8 bytes, as offsets need
    return [_fragment(src, dst, ident, off // 8, off + step < len(data), data[off:off + step])
            for off in range(0, len(data), step)]


# -- two faults, one cause ----------------------------------------------------------------------

def test_mtu_mismatch_with_fragmentation():
    """The node's end of pod B's veth is set to 1400 while B stays 1500: a veth mismatch, and
    the node fragments what it routes from A to B (20 datagrams, 40 fragments). One root cause:
    mtu.mismatch on top, the fragmentation folded into it."""
    with Incident("mtu_mismatch_with_fragmentation", pods=2) as inc:
        a, b = inc.lab.pod_list
        sink = Sink(b.ns)
        inc.on_close(sink.close)
        inc.start()
        inc.fault()
        _router_with_mismatch(inc.lab)
        _send_unfragmented_df_off(a.ns, b.ip4, BIG, 20)
        rep = inc.expect_top("mtu.mismatch", check=lambda f: has("veth_mismatch")(f)
                             and "frag.fragmentation_active" in f["evidence"].get("related", {}))
    top = top_of(rep)
    (m,) = mismatch(rep, "veth_mismatch")
    assert [(d["name"], d["mtu"]) for d in m["devices"]] == [(b.veth_node, 1400), (b.veth_pod, 1500)]
    frag = top["evidence"]["related"]["frag.fragmentation_active"]
    assert frag["fragments_created"] == {"ipv4": 40, "ipv6": 0}
    assert top["impact"] >= frag["fragments_created_per_second"]
    assert "frag.fragmentation_active" in top["summary"]
    time.sleep(0.2)
    assert sink.received == [BIG] * 20
