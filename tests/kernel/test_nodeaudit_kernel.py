"""Kernel tier: the node audit reads the real kernel.

Per-netns sysctls (somaxconn, ip_local_port_range, tcp_tw_reuse, tcp_congestion_control)
are set inside a test netns; global ones (nf_conntrack_max, fs.inotify.max_user_instances,
netdev_max_backlog, rmem_max/wmem_max) are read, changed and restored in a finally. Netfilter rules are loaded for real
(nft in one netns, iptables-legacy and ip6tables-legacy in another) and counted exactly;
TIME_WAIT sockets come from real TCP connections in the netns. Listeners are read through
sock_diag against real sockets whose accept queues are filled from the pod's netns, and
checked against the kernel's own counters (TcpExt ListenDrops, ListenOverflows).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from dpwatch.probes.node import audit as nodeaudit
from dpwatch.probes.node import findings
from dpwatch.daemon.host import sysctl
from dpwatch.daemon.config import Config
from dpwatch.daemon.host.netns import run_in
from dpwatch.probes.base import Window
from dpwatch.probes.node.probe import NodeProbe
from netlab import Lab, in_netns, read_snmp, sh


def gather_in(ns: str) -> nodeaudit.Facts:
    return run_in(f"/run/netns/{ns}", nodeaudit.gather)


def _set_global(key: str, value: str) -> str:
    old = sysctl.read(key)
    with open(sysctl.path_of(key), "w") as fh:
        fh.write(value)
    return old


def time_wait_sockets(ns: str, server_ip: str, count: int) -> int:
    """``count`` TCP connections in ``ns`` that the client closes first: each leaves one
    TIME_WAIT socket on the client side. Returns the listener's port."""
    def go():
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((server_ip, 0))
        srv.listen(1024)
        port = srv.getsockname()[1]
        for _ in range(count):
            c = socket.create_connection((server_ip, port))
            s, _ = srv.accept()
            c.close()          # the active closer goes to TIME_WAIT
            s.recv(1)          # the FIN
            s.close()
        srv.close()
        return port
    return in_netns(ns, go)


def test_per_netns_sysctls_and_time_wait(lab):
    ns = lab.node
    for kv in ("net.core.somaxconn=128", "net.ipv4.ip_local_port_range=40000 40999",
               "net.ipv4.tcp_tw_reuse=0", "net.ipv4.tcp_congestion_control=reno"):
        sh("sysctl", "-qw", kv, ns=ns)
    time_wait_sockets(ns, lab.pod.node_ip4, 600)
    f = gather_in(ns)
    assert f.sysctls["net.core.somaxconn"] == "128"
    assert f.sysctls["net.ipv4.tcp_congestion_control"] == "reno"
    assert f.tcp_states.get("TIME_WAIT") == 600
    assert f.busiest_destination["sockets"] == 600
    assert f.busiest_destination["destination"].startswith(f"{lab.pod.node_ip4}:")
    assert f.ephemeral_ports_in_use == 600
    assert f.cpus == os.cpu_count()
    found = {r.id: r for r in findings.check(f)}
    s = found["node.somaxconn_low"]
    assert s.severity == "info" and s.evidence["net.core.somaxconn"] == 128
    p = found["node.port_range_small"]
    assert p.severity == "warning" and p.evidence["range_size"] == 1000
    assert p.evidence["busiest_destination_sockets"] == 600
    t = found["node.tcp_tw_reuse_off"]
    assert t.severity == "warning" and t.evidence["time_wait"] == 600 and t.evidence["net.ipv4.tcp_tw_reuse"] == 0
    c = found["node.congestion_control"]
    assert c.evidence["net.ipv4.tcp_congestion_control"] == "reno"
    # The pod's netns kept the defaults: none of that there.
    g = {r.id for r in findings.check(gather_in(lab.pod.ns))}
    assert not g & {"node.somaxconn_low", "node.port_range_small", "node.tcp_tw_reuse_off"}


def test_buffers_and_global_sysctls_read_and_restored(lab):
    ns = lab.node
    restore: dict[str, str] = {}
    try:
        # rmem_max/wmem_max: global on 6.1; 6.18 shows them in every netns but accepts writes
        # only in the initial one (EINVAL elsewhere), so they are set globally and restored.
        for key in ("net.core.rmem_max", "net.core.wmem_max"):
            restore[key] = _set_global(key, "212992")
        restore["net.core.netdev_max_backlog"] = _set_global("net.core.netdev_max_backlog", "300")
        restore["fs.inotify.max_user_instances"] = _set_global("fs.inotify.max_user_instances", "77")
        # Read from the test's own (initial) netns, as the daemon does with hostNetwork: a
        # child netns does not show netdev_max_backlog or default_qdisc at all.
        f = nodeaudit.gather()
        child = gather_in(ns)
    finally:
        for key, value in restore.items():
            _set_global(key, value)
    assert f.sysctls["net.core.rmem_max"] == "212992" and f.sysctls["net.core.wmem_max"] == "212992"
    assert child.sysctls["net.core.netdev_max_backlog"] is None
    assert "net.core.netdev_max_backlog" in child.errors["sysctl"]
    assert "node.netdev_max_backlog_low" not in {r.id for r in findings.check(child)}  # unknown: no advice
    found = {r.id: r for r in findings.check(f)}
    b = found["node.socket_buffers_small"]
    assert b.evidence["net.core.rmem_max"] == 212992 and b.severity == "info"
    assert found["node.netdev_max_backlog_low"].evidence["net.core.netdev_max_backlog"] == 300
    i = found["node.inotify_limits_low"]
    assert i.evidence["fs.inotify.max_user_instances"] == 77
    assert i.remediation[1] == "sysctl -w fs.inotify.max_user_instances=8192"


def test_conntrack_max_against_peak_use(lab):
    old = _set_global("net.netfilter.nf_conntrack_max", "1000")
    try:
        f = gather_in(lab.node)
    finally:
        _set_global("net.netfilter.nf_conntrack_max", old)
    r = {x.id: x for x in findings.check(f, conntrack_peak=800)}["node.conntrack_max_low"]
    assert r.evidence["net.netfilter.nf_conntrack_max"] == 1000 and r.severity == "warning"
    assert r.evidence["peak_fill_percent"] == 80.0
    assert r.evidence["cpus"] == os.cpu_count()
    want = max(32768 * os.cpu_count(), 131072)
    assert r.evidence["recommended_max"] == want
    assert r.remediation[0].startswith(f"sysctl -w net.netfilter.nf_conntrack_max={want}")


def kube_rules(chains: int, per_chain: int) -> str:
    lines = ["table ip kube-proxy {"]
    for c in range(chains):
        lines.append(f"  chain KUBE-SVC-{c:04X}{'A' * 12} {{")
        for r in range(per_chain):
            lines.append(f"    ip saddr 10.{c // 256}.{c % 256}.{r + 1} counter accept")
        lines.append("  }")
    lines.append("  chain KUBE-SERVICES {")
    lines.append("    counter")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def test_nft_rules_counted_exactly_and_kube_chains_found(lab):
    sh("nft", "-f", "-", ns=lab.node, input=kube_rules(100, 3))
    f = gather_in(lab.node)
    nf = f.netfilter
    assert nf["nft_rules"] == 301
    assert nf["kube_svc_chains"] == 100
    assert nf["kube_proxy_rules"] == 301
    assert nf["top_chains"][0]["rules"] == 3
    assert "nftables" not in f.errors
    r = {x.id: x for x in findings.check(f, netfilter_threshold=300)}["netfilter.rule_count_high"]
    assert r.evidence["total_rules"] == 301 and r.evidence["kube_svc_chains"] == 100
    assert "eBPF" in r.remediation[0] and "Cilium" in r.remediation[0]
    assert "netfilter.rule_count_high" not in {x.id for x in findings.check(f, netfilter_threshold=302)}
    # The pod's netns has none of them.
    assert gather_in(lab.pod.ns).netfilter["nft_rules"] == 0


def test_iptables_legacy_counted_through_the_kernel(lab):
    ns = lab.node
    sh("iptables-legacy", "-N", "KUBE-SVC-LEGACY1", ns=ns)
    for i in range(5):
        sh("iptables-legacy", "-A", "KUBE-SVC-LEGACY1", "-s", f"10.9.0.{i + 1}", "-j", "ACCEPT", ns=ns)
    sh("iptables-legacy", "-A", "INPUT", "-j", "KUBE-SVC-LEGACY1", ns=ns)
    sh("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "RETURN", ns=ns)
    sh("ip6tables-legacy", "-A", "OUTPUT", "-j", "ACCEPT", ns=ns)
    sh("ip6tables-legacy", "-A", "OUTPUT", "-j", "ACCEPT", ns=ns)
    f = gather_in(ns)
    assert f.netfilter["iptables_legacy_rules"] == 7
    assert f.netfilter["ip6tables_legacy_rules"] == 2
    assert f.netfilter["kube_svc_chains"] == 1
    assert {"chain": "iptables-legacy filter KUBE-SVC-LEGACY1", "rules": 5} in f.netfilter["top_chains"]
    # Our count equals what iptables-legacy itself lists.
    listed = sh("iptables-legacy-save", ns=ns).stdout
    assert sum(1 for line in listed.splitlines() if line.startswith("-A ")) == 7


def test_overlay_device_and_node_probe_in_netns(lab):
    sh("ip", "link", "add", "vxlan77", "type", "vxlan", "id", "77", "dstport", "4789",
       "local", lab.pod.node_ip4, "dev", lab.pod.veth_node, ns=lab.node)
    sh("ip", "link", "set", "vxlan77", "up", ns=lab.node)
    sh("sysctl", "-qw", "net.core.somaxconn=64", ns=lab.node)
    probe = NodeProbe(Config(probes=["node"]).validate())
    run_in(f"/run/netns/{lab.node}", lambda: probe.attach(None))
    try:
        first = probe.collect()
        # Listen overflows in the netns, for real: a backlog-1 listener that never accepts.
        def overflow():
            srv = socket.socket()
            srv.bind((lab.pod.node_ip4, 0))
            srv.listen(1)
            port = srv.getsockname()[1]
            clients = []
            for _ in range(6):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex((lab.pod.node_ip4, port))
                clients.append(c)
            return srv, clients
        srv, clients = in_netns(lab.node, overflow)
        time.sleep(1.5)
        second = probe.collect()
        for c in clients:
            c.close()
        srv.close()
        found = {x.id: x for x in probe.diagnose(Window(2.0, first, second))}
    finally:
        probe.close()
    o = found["node.overlay_in_use"]
    assert [d["name"] for d in o.evidence["overlay_devices"]] == ["vxlan77"]
    assert o.evidence["overhead_bytes"] == 50
    # The overflows are named: the backlog-1 listener, which somaxconn (64) does not cap.
    r = found["node.listen_queue_overflow"]
    assert r.evidence["listen_overflows_in_window"] >= 1
    (named,) = r.evidence["listeners"]
    assert named["effective_backlog"] == 1 and named["capped_by_somaxconn"] is False
    assert named["socket_drops_in_window"] >= 1 and named["process"]["pid"] == os.getpid()
    assert not any(step.startswith("sysctl -w net.core.somaxconn") for step in r.remediation)
    s = found["node.somaxconn_low"]
    assert s.evidence["net.core.somaxconn"] == 64
    assert s.severity == "info" and s.evidence["listeners_capped_by_somaxconn"] == 0


def _until(read, port: int, pred, timeout: float = 3.0):
    """The listener on ``port`` once ``pred`` holds for it (handshakes finish asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        x = read()[port]
        if pred(x) or time.monotonic() > deadline:
            return x
        time.sleep(0.02)


def _connect(ns: str, host: str, port: int, n: int, family: int = socket.AF_INET) -> list[socket.socket]:
    def go():
        out = []
        for _ in range(n):
            c = socket.socket(family)
            c.setblocking(False)
            c.connect_ex((host, port))
            out.append(c)
        return out
    return in_netns(ns, go)


def test_listeners_read_through_sock_diag_exactly(lab):
    """Queue, backlog and drops of real listeners, as the kernel counts them: listen(4) holds
    five connections (full is queue > backlog), each refused SYN is one drop on the socket and
    one TcpExt ListenDrops/ListenOverflows, a backlog above somaxconn is capped to it, and
    the pod's listeners are not the node's."""
    from dpwatch.probes.node import listeners
    ns, ip4, ip6 = lab.node, lab.pod.node_ip4, lab.pod.node_ip6
    sh("sysctl", "-qw", "net.core.somaxconn=8", ns=ns)

    def listen(family, addr, backlog):
        def go():
            srv = socket.socket(family)
            srv.bind((addr, 0))
            srv.listen(backlog)
            return srv
        return in_netns(ns, go)

    def read():
        found, error, somaxconn = run_in(f"/run/netns/{ns}", listeners.sample_netns)
        assert error == "" and somaxconn == 8
        return {x.port: x for x in found}

    srv = listen(socket.AF_INET, ip4, 4)
    big = listen(socket.AF_INET, ip4, 100)
    v6 = listen(socket.AF_INET6, ip6, 2)
    pod_srv = in_netns(lab.pod.ns, lambda: socket.socket())
    in_netns(lab.pod.ns, lambda: (pod_srv.bind((lab.pod.ip4, 0)), pod_srv.listen(3)))
    port, port6 = srv.getsockname()[1], v6.getsockname()[1]
    before = read_snmp(ns, "TcpExt", "/proc/net/netstat")
    clients = []
    try:
        x = read()[port]
        assert (x.queue, x.backlog, x.drops, x.full) == (0, 4, 0, False)
        assert x.endpoint == f"{ip4}:{port}" and x.inode == os.fstat(srv.fileno()).st_ino
        assert read()[big.getsockname()[1]].backlog == 8  # listen(100), capped at somaxconn 8
        assert all(y.address != lab.pod.ip4 for y in read().values())  # the pod's own netns
        clients += _connect(lab.pod.ns, ip4, port, 4)
        x = _until(read, port, lambda y: y.queue == 4)
        assert x.queue == 4 and not x.full and x.drops == 0
        clients += _connect(lab.pod.ns, ip4, port, 1)
        x = _until(read, port, lambda y: y.queue == 5)
        assert x.queue == 5 and x.full and x.drops == 0  # backlog + 1 held: now full
        extra = _connect(lab.pod.ns, ip4, port, 3)
        _until(read, port, lambda y: y.drops >= 3)
        for c in extra:
            c.close()  # no more SYN retransmissions
        x = read()[port]
        assert x.queue == 5 and x.drops >= 3 and x.drops % 3 == 0  # 3 SYNs, maybe retransmitted
        after = read_snmp(ns, "TcpExt", "/proc/net/netstat")
        assert after["ListenDrops"] - before["ListenDrops"] == x.drops
        assert after["ListenOverflows"] - before["ListenOverflows"] == x.drops
        # IPv6: listen(2) holds three.
        clients += _connect(lab.pod.ns, ip6, port6, 3, socket.AF_INET6)
        y = _until(read, port6, lambda z: z.queue == 3)
        text6 = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip6))
        assert y.queue == 3 and y.full and y.family == "ipv6" and y.endpoint == f"[{text6}]:{port6}"
        # The owner, from /proc: this process.
        owners, scanned, truncated = listeners.socket_owners([x.inode])
        assert owners[x.inode][0][0] == os.getpid() and scanned > 0 and not truncated
    finally:
        for c in clients:
            c.close()
        for s_ in (srv, big, v6, pod_srv):
            s_.close()


def test_change_signature_moves_with_rules_and_sockets(lab):
    """The early re-audit's inputs, read in a real netns: the nf_tables generation moves with
    each commit (and only then), iptables-legacy sizes with a rule load, TCP sockets with
    real connections (TIME_WAIT included)."""
    ns = lab.node
    sig = lambda: run_in(f"/run/netns/{ns}", nodeaudit.change_signature)  # noqa: E731
    first = sig()
    assert sig()["nft_generation"] == first["nft_generation"]          # nothing committed
    sh("nft", "add table inet dpwsig; add chain inet dpwsig c; add rule inet dpwsig c counter", ns=ns)
    second = sig()
    assert second["nft_generation"] != first["nft_generation"]
    assert nodeaudit.audit_due(first, second) == "nft_generation"
    time_wait_sockets(ns, "127.0.0.1", 70)
    third = sig()
    assert third["tcp_sockets"] - second["tcp_sockets"] >= 70          # 70 TIME_WAIT at least
    assert nodeaudit.audit_due(second, third) == "tcp_sockets"
    assert nodeaudit.audit_due(third, sig()) is None
