"""The node findings' remediation text: the fix lines, computed from the node's values.

Pure: each function takes the values its finding already worked out (probes/node/findings.py)
and returns the lines, most useful first.
"""

from __future__ import annotations

from dpwatch.probes.node.culprits import Culprit
from dpwatch.probes.node.thresholds import (CONNTRACK_ENTRY_BYTES, CONNTRACK_PER_CPU, SOMAXCONN_RECOMMENDED,
                                            mib, recommended_backlog, recommended_somaxconn)


def conntrack(want: int, cpus: int) -> list[str]:
    return [f"sysctl -w net.netfilter.nf_conntrack_max={want}   # about "
            f"{mib(want * CONNTRACK_ENTRY_BYTES)} of kernel memory when full",
            f"on Kubernetes set kube-proxy conntrack.maxPerCore={max(CONNTRACK_PER_CPU, want // cpus)} "
            f"(x {cpus} CPUs) so kube-proxy does not set it back"]


def somaxconn() -> list[str]:
    return [f"sysctl -w net.core.somaxconn={SOMAXCONN_RECOMMENDED}",
            f"raise the server's listen() backlog to {SOMAXCONN_RECOMMENDED} too (the kernel caps it at "
            "somaxconn)"]


def listen_overflow(found: list[Culprit], somaxconn: int | None) -> list[str]:
    """Fix lines for the named listeners: the application's backlog where somaxconn does not
    cap it, somaxconn (and then the backlog) only where it does."""
    fix: list[str] = []
    capped = [c for c in found if c.capped]
    if capped and somaxconn:
        want = recommended_somaxconn(somaxconn)
        fix.append(f"sysctl -w net.core.somaxconn={want}")
        for c in capped[:3]:
            fix.append(f"{c.who()}: its backlog {c.listener.backlog} is capped by somaxconn; after the "
                       f"sysctl it must call listen() again with a backlog of {want} (restart it: the cap "
                       "applies at listen() time; Go and listen(-1) ask for somaxconn itself)")
    for c in [c for c in found if not c.capped][:3]:
        want = recommended_backlog(c.listener.backlog, somaxconn)
        cap = f"; somaxconn={somaxconn} does not cap it, no sysctl helps" if somaxconn else ""
        if want > c.listener.backlog:
            fix.append(f"{c.who()}: raise its listen() backlog from {c.listener.backlog} to {want}, "
                       f"or make it accept() faster (more workers, nothing slow on the accept path){cap}")
        else:
            fix.append(f"{c.who()}: its backlog {c.listener.backlog} is already at or above what "
                       f"somaxconn={somaxconn} allows; make it accept() faster (more workers, nothing "
                       "slow on the accept path)")
    if found:
        fix.append(f"ss -ltnp 'sport = :{found[0].listener.port}'   # Recv-Q above Send-Q: its accept "
                   "queue is full")
    else:
        fix.append("ss -ltnp | awk 'NR == 1 || $2 > $3'   # listeners whose accept queue is full now "
                   "(Recv-Q above Send-Q)")
    fix.append("nstat -az TcpExtListenOverflows TcpExtListenDrops   # should stop growing")
    return fix


def port_range(lo: int, used: int) -> list[str]:
    fix = [f"sysctl -w net.ipv4.ip_local_port_range='{lo} 65535'",
           "sysctl -w net.ipv4.ip_local_reserved_ports=30000-32767   # keep Kubernetes NodePorts out "
           "of the ephemeral range"]
    if 65535 - lo + 1 < 4 * used:
        fix.append("spread the connections over more destination addresses or ports, or reuse them "
                   "(HTTP keep-alive, connection pools)")
    return fix


def tw_reuse(timestamps: int | None) -> list[str]:
    fix = ["sysctl -w net.ipv4.tcp_tw_reuse=1   # outgoing connections may reuse TIME_WAIT ports "
           "(safe: it relies on TCP timestamps)"]
    if timestamps == 0:
        fix.append("sysctl -w net.ipv4.tcp_timestamps=1   # tcp_tw_reuse needs timestamps")
    fix.append("prefer long-lived connections: client keep-alive and pooling avoid the churn")
    return fix


def backlog(want: int) -> list[str]:
    return [f"sysctl -w net.core.netdev_max_backlog={want}"]


def buffers(want: int) -> list[str]:
    return [f"sysctl -w net.core.rmem_max={want}", f"sysctl -w net.core.wmem_max={want}"]


def congestion(cc: str, bbr: str) -> list[str]:
    fix = []
    if bbr == "module":
        fix.append("modprobe tcp_bbr && echo tcp_bbr > /etc/modules-load.d/bbr.conf")
    elif bbr == "absent":
        fix.append("this kernel has no tcp_bbr (neither built in nor as a module): keep "
                   f"{cc}, or use a kernel built with CONFIG_TCP_CONG_BBR")
    fix.append("sysctl -w net.core.default_qdisc=fq   # applies to devices created or re-set after")
    if bbr != "absent":
        fix.append("sysctl -w net.ipv4.tcp_congestion_control=bbr")
    return fix


def inotify(watches: int, instances: int) -> list[str]:
    return [f"sysctl -w fs.inotify.max_user_watches={watches}",
            f"sysctl -w fs.inotify.max_user_instances={instances}"]


def netfilter(kube_proxy: bool) -> list[str]:
    if kube_proxy:
        return ["replace kube-proxy with an eBPF service load balancer: Cilium kube-proxy replacement "
                "(helm --set kubeProxyReplacement=true) or the Calico eBPF dataplane "
                "(Installation spec.calicoNetwork.linuxDataplane: BPF)",
                "or switch kube-proxy to hashed lookups: --proxy-mode=nftables (Kubernetes 1.31+) "
                "or --proxy-mode=ipvs",
                "nft list ruleset | grep -c 'KUBE-SVC-'   # re-count after the change"]
    return ["fold address and port lists into nft sets or maps (or ipset for iptables): one lookup "
            "instead of one rule per entry",
            "nft list ruleset -a | less   # find the longest chains listed in top_chains"]


def overlay(overhead: int) -> list[str]:
    return ["where nodes share an L2 or routed network, use native routing: Cilium "
            "routingMode=native, Calico IPIP/VXLAN mode Never (BGP), Flannel host-gw",
            f"or raise the underlay MTU (jumbo frames, 9001) so pods keep 1500 plus the "
            f"{overhead}-byte header"]
