"""The node audit: the settings the field tunes again and again, read from the node itself.

``gather()`` fills a Facts (probes/node/facts.py) in the calling thread's netns: the sysctls
(probes/node/sysctls.py), TCP sockets by state (probes/node/sockets.py), netfilter rules
counted by the kernel (an nf_tables dump over nfnetlink, probes/node/nftables.py, and the
iptables-legacy tables through getsockopt, probes/node/iptlegacy.py), inotify use per uid
(/proc/*/fd and fdinfo) and overlay devices (rtnetlink). Call it from a thread that lives in
the netns to audit: every per-netns file is opened through /proc/thread-self and every socket
is made there. ``change_signature()`` and ``audit_due()`` say when to audit again early.

The findings judge from the Facts (probes/node/findings.py); nothing here judges. Nothing is
guessed either: a value that cannot be read is None and its finding is skipped.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from dpwatch.daemon.host import paths
from dpwatch.probes.node.facts import Facts
from dpwatch.probes.node.iptlegacy import LEGACY, legacy_rule_counts, legacy_table_sizes
from dpwatch.probes.node.nftables import nft_generation, nft_rule_counts
from dpwatch.probes.node.sockets import gather_tcp, read_tcp_socket_count
from dpwatch.probes.node.sysctls import gather_sysctls, meminfo_bytes

OVERLAY_KINDS = ("vxlan", "geneve", "ipip", "sit", "gre", "gretap", "ip6gre", "ip6gretap",
                 "ip6tnl", "wireguard")


def gather_netfilter(facts: Facts) -> None:
    nf: dict[str, Any] = {"nft_rules": None, "iptables_legacy_rules": None,
                          "ip6tables_legacy_rules": None}
    chains: dict[str, int] = {}
    try:
        counts = nft_rule_counts()
        nf["nft_rules"] = sum(counts.values())
        for (fam, table, chain), n in counts.items():
            chains[f"nft {fam} {table} {chain}"] = n
    except (OSError, ValueError) as exc:
        facts.errors["nftables"] = f"{type(exc).__name__}: {exc}"
    for family, key, tool in (("ipv4", "iptables_legacy_rules", "iptables-legacy"),
                              ("ipv6", "ip6tables_legacy_rules", "ip6tables-legacy")):
        try:
            counts = legacy_rule_counts(family)
        except (OSError, ValueError) as exc:
            facts.errors[tool] = f"{type(exc).__name__}: {exc}"
            continue
        if counts is None:
            continue
        nf[key] = sum(counts.values())
        for (table, chain), n in counts.items():
            chains[f"{tool} {table} {chain}"] = n
    nf["total_rules"] = sum(v for k, v in nf.items() if k.endswith("_rules") and v)
    names = [c.rsplit(" ", 1)[1] for c in chains]
    nf["kube_svc_chains"] = sum(1 for n in names if n.startswith("KUBE-SVC-"))
    nf["kube_sep_chains"] = sum(1 for n in names if n.startswith("KUBE-SEP-"))
    nf["kube_proxy_rules"] = sum(v for c, v in chains.items() if c.rsplit(" ", 1)[1].startswith("KUBE-"))
    top = sorted(chains.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    nf["top_chains"] = [{"chain": c, "rules": n} for c, n in top if n]
    facts.netfilter = nf


def gather_inotify(facts: Facts, max_fds: int = 200_000) -> None:
    """inotify instances and watches per uid, from /proc/*/fd links and their fdinfo."""
    instances: dict[int, int] = {}
    watches: dict[int, int] = {}
    scanned = 0
    for fd_dir in glob.glob(paths.proc("[0-9]*", "fd")):
        pid_dir = fd_dir[:-3]
        try:
            uid = os.stat(pid_dir).st_uid
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            scanned += 1
            if scanned > max_fds:
                break
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"{pid_dir}/fdinfo/{fd}") as fh:
                    n = sum(1 for line in fh if line.startswith("inotify wd:"))
            except OSError:
                continue
            instances[uid] = instances.get(uid, 0) + 1
            watches[uid] = watches.get(uid, 0) + n
    top_i = max(instances.items(), key=lambda kv: kv[1], default=(None, 0))
    top_w = max(watches.items(), key=lambda kv: kv[1], default=(None, 0))
    facts.inotify = {"instances_busiest_uid": top_i[0], "instances_in_use": top_i[1],
                     "watches_busiest_uid": top_w[0], "watches_in_use": top_w[1],
                     "fds_scanned": min(scanned, max_fds), "truncated": scanned > max_fds}


def gather_links(facts: Facts) -> None:
    from pyroute2 import IPRoute
    from dpwatch.probes.encap import OVERHEAD
    overlays = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind not in OVERLAY_KINDS:
                continue
            up = bool(msg["flags"] & 1)
            v4, v6 = OVERHEAD.get(kind, (None, None))
            overlays.append({"name": msg.get_attr("IFLA_IFNAME"), "kind": kind,
                             "mtu": msg.get_attr("IFLA_MTU"), "up": up,
                             "overhead": v4 if v4 is not None else v6})
    facts.overlays = sorted(overlays, key=lambda o: o["name"])
    facts.fastest_link_mbps = fastest_link_mbps()


def fastest_link_mbps() -> int | None:
    """The fastest physical NIC's speed (/sys/class/net/*/speed of devices with a device)."""
    speeds = []
    for path in glob.glob(paths.sys("class", "net", "*", "speed")):
        if not os.path.exists(os.path.join(os.path.dirname(path), "device")):
            continue  # virtual devices report no real speed
        try:
            with open(path) as fh:
                v = int(fh.read().strip())
            if v > 0:
                speeds.append(v)
        except (OSError, ValueError):
            continue
    return max(speeds) if speeds else None


def gather(inotify: bool = True) -> Facts:
    """Everything the findings need, read in the calling thread's netns."""
    facts = Facts(cpus=os.cpu_count() or 1, mem_bytes=meminfo_bytes())
    gather_sysctls(facts)
    gather_tcp(facts)
    gather_netfilter(facts)
    if inotify:
        gather_inotify(facts)
    try:
        gather_links(facts)
    except Exception as exc:  # no rtnetlink here: the overlay check is skipped
        facts.errors["links"] = f"{type(exc).__name__}: {exc}"
    return facts


def change_signature() -> dict[str, Any]:
    """What the cheap counters say about the audit's inputs, read in this netns: the nf_tables
    generation, the iptables-legacy tables' sizes, and the TCP sockets in use (with TIME_WAIT).
    The node probe re-audits early when they move (a rule load, a connection storm)."""
    out: dict[str, Any] = {"nft_generation": nft_generation(), "tcp_sockets": read_tcp_socket_count()}
    for family in LEGACY:
        sizes = legacy_table_sizes(family)
        if sizes is not None:
            out[f"legacy_{family}"] = sizes
    return out


def audit_due(before: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """Why the audit should run again before its interval: a ruleset changed, or the TCP
    sockets (the port range and TIME_WAIT checks' input) moved by at least max(64, 25%)."""
    if before is None:
        return None
    for key in now:
        if key != "tcp_sockets" and now.get(key) != before.get(key):
            return key
    a, b = int(before.get("tcp_sockets", 0)), int(now.get("tcp_sockets", 0))
    if abs(b - a) >= max(64, a // 4):
        return "tcp_sockets"
    return None
