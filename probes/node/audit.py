"""The node audit: the settings the field tunes again and again, read from the node itself.

Two halves:

- gathering (``gather()``): sysctls, TCP sockets by state (/proc/thread-self/net/tcp{,6}),
  netfilter rules counted by the kernel (an nf_tables NFT_MSG_GETRULE dump over nfnetlink,
  and iptables-legacy tables through getsockopt IPT_SO_GET_INFO/GET_ENTRIES on a raw
  socket, ip6tables too), inotify use per uid (/proc/*/fd and fdinfo), overlay devices
  (rtnetlink). Call it from a thread that lives in the netns to audit: every per-netns file
  is opened through /proc/thread-self and every socket is made there.
- checking (``check()``): pure functions from those facts (and the window's counter deltas)
  to findings with evidence and remediation computed from the node.

Nothing here is guessed: a value that cannot be read is None and its check is skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import os
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from dpwatch.probes.node import listeners
from dpwatch.daemon.host import sysctl
from dpwatch.probes.node.listeners import ListenWindow

# -- thresholds (documented in docs/findings.md) ---------------------------------------------
CONNTRACK_ENTRY_BYTES = 320        # kernel memory per conntrack entry (struct nf_conn + hash)
CONNTRACK_PER_CPU = 32768          # kube-proxy conntrack.maxPerCore default
CONNTRACK_MIN = 131072             # kube-proxy conntrack.min default
CONNTRACK_PEAK_WARN = 0.75         # peak use above this share of nf_conntrack_max: warning
CONNTRACK_MEMORY_SHARE = 0.05      # never advise a table whose full size exceeds 5% of memory
SOMAXCONN_RECOMMENDED = 4096       # the kernel default since 5.4
# Refused connection attempts (ListenDrops) that make node.listen_queue_overflow critical: at
# least this many a second, and at least as many as the handshakes completed meanwhile (Tcp
# PassiveOpens): new connections then fail more often than they succeed, each failure a SYN
# retried after 1, 3, 7... s, so the service is down for new clients, not merely slow.
LISTEN_CRITICAL_RATE = 1.0
PORT_RANGE_DEFAULT = 60999 - 32768 + 1  # 28232 ports: the kernel's default range
PORT_USE_WARN = 0.5                # ephemeral ports toward one destination: share of the range
TIME_WAIT_INFO, TIME_WAIT_WARN = 0.05, 0.25  # TIME_WAIT sockets as a share of the range
INOTIFY_WATCHES_RECOMMENDED = 524288
INOTIFY_INSTANCES_RECOMMENDED = 8192
INOTIFY_USE_WARN = 0.8
BUFFER_MIN, BUFFER_MAX = 4 << 20, 64 << 20
BUFFER_RTT_SECONDS = 0.010         # socket buffers sized for the fastest link at 10 ms RTT
BACKLOG_DEFAULT = 1000

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
OVERLAY_KINDS = ("vxlan", "geneve", "ipip", "sit", "gre", "gretap", "ip6gre", "ip6gretap",
                 "ip6tnl", "wireguard")

SYSCTLS = (
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_count",
    "net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_timestamps", "net.core.netdev_max_backlog",
    "net.core.rmem_max", "net.core.wmem_max", "net.ipv4.tcp_congestion_control",
    "net.ipv4.tcp_available_congestion_control", "net.core.default_qdisc",
    "fs.inotify.max_user_watches", "fs.inotify.max_user_instances",
)


@dataclass
class Facts:
    cpus: int = 1
    mem_bytes: int | None = None
    sysctls: dict[str, str | None] = field(default_factory=dict)
    tcp_states: dict[str, int] = field(default_factory=dict)
    ephemeral_ports_in_use: int = 0        # distinct local ports in the range, not listening
    busiest_destination: dict[str, Any] | None = None  # {"destination", "sockets"}
    netfilter: dict[str, Any] = field(default_factory=dict)
    inotify: dict[str, Any] = field(default_factory=dict)
    overlays: list[dict[str, Any]] = field(default_factory=list)
    fastest_link_mbps: int | None = None
    bbr: str = "absent"                    # available | module | absent
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: str | None) -> int | None:
    try:
        return int(str(value).split()[0])
    except (TypeError, ValueError, IndexError):
        return None


def port_range(value: str | None) -> tuple[int, int] | None:
    parts = (value or "").split()
    if len(parts) != 2:
        return None
    try:
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return (lo, hi) if lo <= hi else None


def pow2_at_least(n: float) -> int:
    n = max(1, int(n))
    return 1 << (n - 1).bit_length()


# =============================================================================================
# Gathering
# =============================================================================================

def parse_proc_tcp(text: str, rng: tuple[int, int] | None, states: dict[str, int],
                   ports: set[int], dests: dict[str, int]) -> None:
    """One /proc/net/tcp or tcp6 file: count sockets by state; for non-listening sockets whose
    local port lies in the ephemeral range, note the port and count per destination."""
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        try:
            st = int(parts[3], 16)
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
        except (ValueError, IndexError):
            continue
        name = TCP_STATES.get(st, f"STATE_{st}")
        states[name] = states.get(name, 0) + 1
        if rng and name != "LISTEN" and rng[0] <= local_port <= rng[1]:
            ports.add(local_port)
            dests[parts[2]] = dests.get(parts[2], 0) + 1


def _hexaddr_text(hexaddr: str) -> str:
    """'0100007F:0050' (or the IPv6 form) -> '127.0.0.1:80'."""
    addr, port = hexaddr.rsplit(":", 1)
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
        return f"{ip}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def gather_tcp(facts: Facts) -> None:
    rng = port_range(facts.sysctls.get("net.ipv4.ip_local_port_range"))
    states: dict[str, int] = {}
    ports: set[int] = set()
    dests: dict[str, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/thread-self/net/{name}") as fh:
                parse_proc_tcp(fh.read(), rng, states, ports, dests)
        except OSError as exc:
            if name == "tcp":
                facts.errors["tcp"] = str(exc)
    facts.tcp_states = dict(sorted(states.items()))
    facts.ephemeral_ports_in_use = len(ports)
    if dests:
        key, n = max(dests.items(), key=lambda kv: kv[1])
        try:
            text = _hexaddr_text(key)
        except (ValueError, OSError):
            text = key
        facts.busiest_destination = {"destination": text, "sockets": n}


# -- netfilter: nf_tables over nfnetlink ------------------------------------------------------
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7  # a GETRULE dump answers with NEWRULE messages
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFPROTO = {0: "unspec", 1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def parse_nft_rule_messages(data: bytes, counts: dict[tuple[str, str, str], int]) -> tuple[bool, bool]:
    """Netlink messages of an NFT_MSG_GETRULE dump -> counts[(family, table, chain)] += 1.
    Returns (done, interrupted). Raises OSError on an NLMSG_ERROR."""
    off, done, intr = 0, False, False
    while off + 16 <= len(data):
        length, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > len(data):
            raise ValueError(f"truncated netlink message at {off} (length {length})")
        if flags & NLM_F_DUMP_INTR:
            intr = True
        if mtype == NLMSG_DONE:
            done = True
        elif mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + 16)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE and length >= 20:
            family = data[off + 16]
            table = chain = ""
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                value = data[a + 4:a + alen]
                atype &= 0x3FFF
                if atype == NFTA_RULE_TABLE:
                    table = value.split(b"\0", 1)[0].decode(errors="replace")
                elif atype == NFTA_RULE_CHAIN:
                    chain = value.split(b"\0", 1)[0].decode(errors="replace")
                a += (alen + 3) & ~3
            key = (NFPROTO.get(family, str(family)), table, chain)
            counts[key] = counts.get(key, 0) + 1
        off += (length + 3) & ~3
    return done, intr


def nft_rule_counts() -> dict[tuple[str, str, str], int]:
    """Every nf_tables rule of this netns, all families, counted per (family, table, chain)."""
    for _attempt in range(3):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            s.settimeout(5)
            s.bind((0, 0))
            msg = struct.pack("=IHHII", 20, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + struct.pack("=BBH", 0, 0, 0)
            s.send(msg)
            counts: dict[tuple[str, str, str], int] = {}
            interrupted = False
            while True:
                data = s.recv(1 << 18)
                done, intr = parse_nft_rule_messages(data, counts)
                interrupted |= intr
                if done:
                    break
            if not interrupted:  # the ruleset changed during the dump: count again
                return counts
        finally:
            s.close()
    return counts


NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1


def nft_generation() -> int | None:
    """The nf_tables generation id of this netns (it changes with every ruleset commit): one
    small netlink request, cheap enough for every sampler pass. None when there is no
    nf_tables here."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.settimeout(2)
        s.bind((0, 0))
        s.send(struct.pack("=IHHII", 20, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0)
               + struct.pack("=BBH", 0, 0, 0))
        data = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    return parse_nft_generation(data)


def parse_nft_generation(data: bytes) -> int | None:
    off = 0
    while off + 20 <= len(data):
        length, mtype, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > len(data):
            return None
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x3FFF == NFTA_GEN_ID and alen >= 8:
                    return struct.unpack_from(">I", data, a + 4)[0]
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return None


def tcp_socket_count(text4: str, text6: str = "") -> int:
    """TCP sockets in use plus TIME_WAIT, from /proc/net/sockstat (and sockstat6's TCP6 inuse)."""
    n = 0
    for line in (text4 + "\n" + text6).splitlines():
        parts = line.split()
        if parts and parts[0] in ("TCP:", "TCP6:"):
            fields = dict(zip(parts[1::2], parts[2::2]))
            n += int(fields.get("inuse", 0)) + (int(fields.get("tw", 0)) if parts[0] == "TCP:" else 0)
    return n


def change_signature() -> dict[str, Any]:
    """What the cheap counters say about the audit's inputs, read in this netns: the nf_tables
    generation, the iptables-legacy tables' sizes, and the TCP sockets in use (with TIME_WAIT).
    The node probe re-audits early when they move (a rule load, a connection storm)."""
    out: dict[str, Any] = {"nft_generation": nft_generation()}
    texts = []
    for name in ("sockstat", "sockstat6"):
        try:
            with open(f"/proc/thread-self/net/{name}") as fh:
                texts.append(fh.read())
        except OSError:
            texts.append("")
    out["tcp_sockets"] = tcp_socket_count(*texts)
    for family, (fam, level, _off, names_file) in LEGACY.items():
        try:
            with open(f"/proc/thread-self/net/{names_file}") as fh:
                tables = [t.strip() for t in fh if t.strip()]
        except OSError:
            continue
        if not tables:
            continue
        sizes = []
        try:
            sock = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError:
            continue
        try:
            for table in tables:
                info = ctypes.create_string_buffer(GETINFO.pack(table.encode(), 0, *([0] * 10), 0, 0),
                                                   GETINFO.size)
                try:
                    _getsockopt(sock.fileno(), level, IPT_SO_GET_INFO, info)
                except OSError:
                    continue
                sizes.append((table, GETINFO.unpack(info.raw)[12]))
        finally:
            sock.close()
        out[f"legacy_{family}"] = tuple(sizes)
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


# -- netfilter: iptables-legacy through the kernel --------------------------------------------
IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES = 64, 65
HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# (socket family, sockopt level, offset of target_offset in struct ipt_entry / ip6t_entry)
LEGACY = {"ipv4": (socket.AF_INET, socket.IPPROTO_IP, 88, "ip_tables_names"),
          "ipv6": (socket.AF_INET6, socket.IPPROTO_IPV6, 140, "ip6_tables_names")}
GETINFO = struct.Struct("=32sI5I5III")   # struct ipt_getinfo (84 bytes)
GET_ENTRIES_HEADER = 40                  # struct ipt_get_entries: name[32], size, pad to 8
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _getsockopt(fd: int, level: int, opt: int, buf: ctypes.Array) -> None:
    size = ctypes.c_uint(len(buf))
    if _libc.getsockopt(fd, level, opt, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def parse_legacy_entries(blob: bytes, hook_entry: tuple[int, ...], underflow: tuple[int, ...],
                         valid_hooks: int, target_off_at: int) -> dict[str, int]:
    """An iptables-legacy table's entry blob (IPT_SO_GET_ENTRIES) -> rules per chain.

    The blob holds, in order, each chain's entries: a built-in chain starts at its hook_entry
    offset and ends with its policy at the underflow offset; a user chain starts with an ERROR
    entry naming it and ends with a RETURN; a last ERROR entry closes the table. Rules are the
    entries that are none of those."""
    starts = {hook_entry[h]: HOOK_NAMES[h] for h in range(5) if valid_hooks & (1 << h)}
    policies = {underflow[h] for h in range(5) if valid_hooks & (1 << h)}
    entries: list[tuple[int, str, str]] = []  # (offset, target name, error name)
    off = 0
    while off < len(blob):
        if off + target_off_at + 4 > len(blob):
            raise ValueError(f"truncated entry at {off}")
        t_off, n_off = struct.unpack_from("=HH", blob, off + target_off_at)
        if n_off <= 0 or t_off + 32 > n_off or off + n_off > len(blob):
            raise ValueError(f"bad entry at {off}: target_offset {t_off}, next_offset {n_off}")
        tname = blob[off + t_off + 2:off + t_off + 31].split(b"\0", 1)[0].decode(errors="replace")
        ename = ""
        if tname == "ERROR":
            ename = blob[off + t_off + 32:off + n_off].split(b"\0", 1)[0].decode(errors="replace")
        entries.append((off, tname, ename))
        off += n_off
    rules: dict[str, int] = {}
    chain = None
    for i, (off, tname, ename) in enumerate(entries):
        last = i == len(entries) - 1
        if off in starts:
            chain = starts[off]
            rules.setdefault(chain, 0)
        if tname == "ERROR":
            chain = None if last else ename
            if chain is not None:
                rules.setdefault(chain, 0)
            continue
        if chain is None or off in policies:
            continue
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        if chain not in HOOK_NAMES and nxt is not None and nxt[1] == "ERROR":
            continue  # a user chain's closing RETURN
        rules[chain] += 1
    return rules


def legacy_rule_counts(family: str) -> dict[tuple[str, str], int] | None:
    """iptables-legacy (or ip6tables-legacy) rules of this netns per (table, chain), or None
    when the kernel has no legacy tables. Only tables the netns already has are asked for
    (asking for another one would make the kernel create it)."""
    fam, level, target_off_at, names_file = LEGACY[family]
    try:
        with open(f"/proc/thread-self/net/{names_file}") as fh:
            tables = [t.strip() for t in fh if t.strip()]
    except OSError:
        return None
    out: dict[tuple[str, str], int] = {}
    if not tables:
        return out
    s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for table in tables:
            for _attempt in range(3):
                info = ctypes.create_string_buffer(GETINFO.pack(table.encode(), 0, *([0] * 10), 0, 0),
                                                   GETINFO.size)
                _getsockopt(s.fileno(), level, IPT_SO_GET_INFO, info)
                fields = GETINFO.unpack(info.raw)
                valid, hooks, under, size = fields[1], fields[2:7], fields[7:12], fields[13]
                req = ctypes.create_string_buffer(
                    struct.pack("=32sI", table.encode(), size) + b"\0" * (GET_ENTRIES_HEADER - 36 + size),
                    GET_ENTRIES_HEADER + size)
                try:
                    _getsockopt(s.fileno(), level, IPT_SO_GET_ENTRIES, req)
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:  # the table changed between the two calls
                        continue
                    raise
                per_chain = parse_legacy_entries(req.raw[GET_ENTRIES_HEADER:GET_ENTRIES_HEADER + size],
                                                 hooks, under, valid, target_off_at)
                for chain, n in per_chain.items():
                    out[(table, chain)] = n
                break
    finally:
        s.close()
    return out


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


# -- inotify ----------------------------------------------------------------------------------
def gather_inotify(facts: Facts, max_fds: int = 200_000) -> None:
    """inotify instances and watches per uid, from /proc/*/fd links and their fdinfo."""
    instances: dict[int, int] = {}
    watches: dict[int, int] = {}
    scanned = 0
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
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


# -- links ------------------------------------------------------------------------------------
def gather_links(facts: Facts) -> None:
    from pyroute2 import IPRoute
    from dpwatch.probes.mtu.audit import OVERHEAD
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
    speeds = []
    for path in glob.glob("/sys/class/net/*/speed"):
        if not os.path.exists(os.path.join(os.path.dirname(path), "device")):
            continue  # virtual devices report no real speed
        try:
            with open(path) as fh:
                v = int(fh.read().strip())
            if v > 0:
                speeds.append(v)
        except (OSError, ValueError):
            continue
    facts.fastest_link_mbps = max(speeds) if speeds else None


def _bbr_state(available: str | None) -> str:
    if "bbr" in (available or "").split():
        return "available"
    release = os.uname().release
    if glob.glob(f"/lib/modules/{release}/kernel/net/ipv4/tcp_bbr.ko*"):
        return "module"
    return "absent"


def _meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gather(inotify: bool = True) -> Facts:
    """Everything the checks need, read in the calling thread's netns."""
    facts = Facts(cpus=os.cpu_count() or 1, mem_bytes=_meminfo())
    facts.sysctls = {k: sysctl.read(k) for k in SYSCTLS}
    hidden = [k for k, v in facts.sysctls.items() if v is None and k.startswith("net.core.")]
    if hidden:  # global keys that only the initial netns shows (the daemon runs with hostNetwork)
        facts.errors["sysctl"] = f"not visible in this netns: {', '.join(hidden)}"
    facts.bbr = _bbr_state(facts.sysctls.get("net.ipv4.tcp_available_congestion_control"))
    gather_tcp(facts)
    gather_netfilter(facts)
    if inotify:
        gather_inotify(facts)
    try:
        gather_links(facts)
    except Exception as exc:  # no rtnetlink here: the overlay check is skipped
        facts.errors["links"] = f"{type(exc).__name__}: {exc}"
    return facts


# =============================================================================================
# Checks
# =============================================================================================

@dataclass
class Result:
    """One check's outcome, turned into a Finding by the node probe."""
    id: str
    severity: str
    title: str
    summary: str
    evidence: dict[str, Any]
    remediation: list[str]
    impact: float = 0.0
    claims: tuple[str, ...] = ()  # evidence keys the headline asserts (see probes/base.py Finding)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def check_conntrack(f: Facts, peak: int | None, drops: int) -> Result | None:
    cmax = _int(f.sysctls.get("net.netfilter.nf_conntrack_max"))
    count = _int(f.sysctls.get("net.netfilter.nf_conntrack_count"))
    if cmax is None:
        return None  # nf_conntrack not loaded
    peak = max(peak or 0, count or 0)
    kube_default = max(CONNTRACK_PER_CPU * f.cpus, CONNTRACK_MIN)
    want = max(kube_default, pow2_at_least(2 * peak))
    mem_cap = int(f.mem_bytes * CONNTRACK_MEMORY_SHARE / CONNTRACK_ENTRY_BYTES) if f.mem_bytes else None
    capped = mem_cap is not None and want > mem_cap
    if capped:
        want = max(pow2_at_least(mem_cap) // 2, pow2_at_least(peak))
    share = peak / cmax if cmax else 0.0
    ev = {"net.netfilter.nf_conntrack_max": cmax, "nf_conntrack_count": count, "peak_count": peak,
          "peak_fill_percent": round(100 * share, 1), "cpus": f.cpus,
          "memory_mib": round(f.mem_bytes / (1 << 20)) if f.mem_bytes else None,
          "table_memory_mib_when_full": round(cmax * CONNTRACK_ENTRY_BYTES / (1 << 20), 1),
          "recommended_max": want, "drops_in_window": drops}
    fix = [f"sysctl -w net.netfilter.nf_conntrack_max={want}   # about "
           f"{_mib(want * CONNTRACK_ENTRY_BYTES)} of kernel memory when full",
           f"on Kubernetes set kube-proxy conntrack.maxPerCore={max(CONNTRACK_PER_CPU, want // f.cpus)} "
           f"(x {f.cpus} CPUs) so kube-proxy does not set it back"]
    if share >= CONNTRACK_PEAK_WARN or drops:
        return Result("node.conntrack_max_low", "warning", "nf_conntrack_max is too small for this node",
                      f"Conntrack use peaked at {peak:,} of {cmax:,} entries ({100 * share:.0f}%) since "
                      f"dpwatch started{' and the table dropped packets' if drops else ''}. A burst of new "
                      f"connections will fill it; {want:,} keeps the peak under half full.",
                      ev, fix, impact=float(drops))
    if cmax < kube_default and not capped:
        return Result("node.conntrack_max_low", "info", "nf_conntrack_max is below the Kubernetes default",
                      f"nf_conntrack_max is {cmax:,}, below what kube-proxy would set for "
                      f"{f.cpus} CPUs ({kube_default:,}); peak use so far is {peak:,}.", ev, fix)
    return None


def check_somaxconn(f: Facts, listen: ListenWindow | None = None) -> Result | None:
    """somaxconn below the kernel default, as info. Overflowing listeners are
    node.listen_queue_overflow's: it names them, and advises somaxconn only for those it caps."""
    sample = listen.sample if listen else None
    value = sample.somaxconn if sample and sample.somaxconn is not None else _int(f.sysctls.get("net.core.somaxconn"))
    if value is None or value >= SOMAXCONN_RECOMMENDED:
        return None
    ev: dict[str, Any] = {"net.core.somaxconn": value, "recommended": SOMAXCONN_RECOMMENDED}
    summary = (f"somaxconn={value} caps every listen() backlog below the kernel default "
               f"{SOMAXCONN_RECOMMENDED}: a burst of connections to a busy server is dropped.")
    if sample and sample.ok:
        capped = [x.endpoint for x in sample.listeners if x.backlog == value]
        ev["listeners_capped_by_somaxconn"] = len(capped)
        ev["capped_listeners"] = capped[:listeners.NAMED_MAX]
        summary += (f" {len(capped)} listener(s) here are capped by it now ({', '.join(capped[:3])})."
                    if capped else " No listener here is capped by it now.")
    fix = [f"sysctl -w net.core.somaxconn={SOMAXCONN_RECOMMENDED}",
           f"raise the server's listen() backlog to {SOMAXCONN_RECOMMENDED} too (the kernel caps it at somaxconn)"]
    return Result("node.somaxconn_low", "info", "net.core.somaxconn is low", summary, ev, fix)


def check_listen_overflow(lw: ListenWindow | None) -> Result | None:
    """Connection attempts a listener refused in the window (TcpExt ListenOverflows: its accept
    queue was full; ListenDrops: those and the SYNs dropped before it), with the listeners
    that refused them named (see probes/node/listeners.py)."""
    if lw is None or (lw.overflows <= 0 and lw.drops <= 0):
        return None
    refused = max(lw.overflows, lw.drops)
    rate = refused / max(lw.seconds, 1e-9)
    found = listeners.culprits(lw)
    sample = lw.sample
    somax = lw.somaxconn
    critical = rate >= LISTEN_CRITICAL_RATE and refused >= lw.passive_opens
    extra = lw.drops - lw.overflows
    if lw.overflows:
        summary = (f"{lw.overflows:,} connection attempts were refused because a listener's accept queue "
                   f"was full ({rate:.1f}/s; {lw.passive_opens:,} were accepted meanwhile).")
        if extra > 0:
            summary += (f" {extra:,} more were dropped before reaching the accept queue (a full SYN queue "
                        "without syncookies, or no memory: see TcpExt TCPReqQFullDrop).")
    else:
        summary = (f"{lw.drops:,} connection attempts were dropped before reaching a listener's accept "
                   f"queue ({rate:.1f}/s; {lw.passive_opens:,} were accepted meanwhile): a full SYN queue "
                   "without syncookies, or no memory (see TcpExt TCPReqQFullDrop).")
    if found:
        top = found[0]
        x = top.listener
        age = top.tracked.get("last_full_seconds_ago")
        state = "full" if x.full else (f"full {age:g} s ago" if age is not None else "not full now")
        summary += (f" {top.who()} has a listen() backlog of {x.backlog} and {x.queue} connection(s) "
                    f"waiting for accept() ({state}): ")
        if top.capped:
            summary += f"net.core.somaxconn={somax} caps its backlog, so raise both."
        elif somax is not None:
            summary += (f"the application accepts too slowly or asked for too small a backlog; "
                        f"somaxconn={somax} does not cap it, so raising somaxconn changes nothing.")
        else:
            summary += "the application accepts too slowly or asked for too small a backlog."
        if len(found) > 1:
            summary += f" {len(found) - 1} more listener(s) overflowed too (see listeners)."
    elif sample is not None and sample.ok:
        summary += (" No listener of this netns counted drops or was seen full in the window: it closed "
                    "since, or its queue filled and drained between two samples.")
    ev: dict[str, Any] = {
        "listen_overflows_in_window": lw.overflows, "listen_drops_in_window": lw.drops,
        "passive_opens_in_window": lw.passive_opens, "refused_per_second": round(rate, 3),
        "net.core.somaxconn": somax,
        "listeners": [c.evidence() for c in found[:listeners.NAMED_MAX]],
        "listeners_named_total": len(found),
    }
    if sample is not None:
        ev["listeners_read"] = len(sample.listeners)
        ev["listeners_full_now"] = sum(1 for x in sample.listeners if x.full)
        if sample.error:
            ev["read_error"] = sample.error
    unseen = [c.listener.endpoint for c in found[:listeners.NAMED_MAX] if c.owners == []]
    if unseen:
        ev["owner_note"] = (f"no process the daemon can see holds {', '.join(unseen)}: its owner runs in "
                            "another pid namespace (the DaemonSet has no hostPID), or as another user "
                            "(reading its /proc/PID/fd needs CAP_SYS_PTRACE)")
    title, claim = (("A listener's accept queue overflows", "listen_overflows_in_window") if lw.overflows
                    else ("Listeners drop connection attempts", "listen_drops_in_window"))
    return Result("node.listen_queue_overflow", "critical" if critical else "warning", title, summary, ev,
                  listeners.remediation(found, somax), impact=float(refused), claims=(claim,))


def check_ports(f: Facts) -> Result | None:
    rng = port_range(f.sysctls.get("net.ipv4.ip_local_port_range"))
    if rng is None:
        return None
    size = rng[1] - rng[0] + 1
    busiest = (f.busiest_destination or {}).get("sockets", 0)
    used = max(busiest, 0)
    share = used / size
    want_size = max(PORT_RANGE_DEFAULT, pow2_at_least(4 * used))
    lo = max(1024, min(32768, 65536 - want_size))  # the range ends at 65535; 32768 at the latest
    ev = {"net.ipv4.ip_local_port_range": f"{rng[0]} {rng[1]}", "range_size": size,
          "ephemeral_ports_in_use": f.ephemeral_ports_in_use,
          "busiest_destination": (f.busiest_destination or {}).get("destination"),
          "busiest_destination_sockets": busiest,
          "time_wait": f.tcp_states.get("TIME_WAIT", 0), "tcp_states": f.tcp_states}
    fix = [f"sysctl -w net.ipv4.ip_local_port_range='{lo} 65535'",
           "sysctl -w net.ipv4.ip_local_reserved_ports=30000-32767   # keep Kubernetes NodePorts out "
           "of the ephemeral range"]
    if 65535 - lo + 1 < 4 * used:
        fix.append("spread the connections over more destination addresses or ports, or reuse them "
                   "(HTTP keep-alive, connection pools)")
    if share >= PORT_USE_WARN:
        return Result("node.port_range_small", "warning", "Ephemeral ports running out",
                      f"{busiest} sockets toward {ev['busiest_destination']} use {100 * share:.0f}% of the "
                      f"{size} ephemeral ports ({rng[0]}-{rng[1]}); new connections to it will fail "
                      "with EADDRNOTAVAIL.", ev, fix, impact=float(busiest))
    if size < PORT_RANGE_DEFAULT:
        return Result("node.port_range_small", "info", "The ephemeral port range is small",
                      f"ip_local_port_range {rng[0]}-{rng[1]} gives {size} ports, fewer than the kernel "
                      f"default {PORT_RANGE_DEFAULT}; the busiest destination has {busiest} sockets.", ev, fix)
    return None


def check_tw_reuse(f: Facts) -> Result | None:
    reuse = _int(f.sysctls.get("net.ipv4.tcp_tw_reuse"))
    rng = port_range(f.sysctls.get("net.ipv4.ip_local_port_range"))
    if reuse is None or rng is None or reuse == 1:
        return None
    size = rng[1] - rng[0] + 1
    tw = f.tcp_states.get("TIME_WAIT", 0)
    share = tw / size
    if share < TIME_WAIT_INFO:
        return None
    ev = {"net.ipv4.tcp_tw_reuse": reuse, "time_wait": tw, "range_size": size,
          "time_wait_share_of_range_percent": round(100 * share, 1),
          "net.ipv4.tcp_timestamps": _int(f.sysctls.get("net.ipv4.tcp_timestamps"))}
    fix = ["sysctl -w net.ipv4.tcp_tw_reuse=1   # outgoing connections may reuse TIME_WAIT ports "
           "(safe: it relies on TCP timestamps)"]
    if ev["net.ipv4.tcp_timestamps"] == 0:
        fix.append("sysctl -w net.ipv4.tcp_timestamps=1   # tcp_tw_reuse needs timestamps")
    fix.append("prefer long-lived connections: client keep-alive and pooling avoid the churn")
    sev = "warning" if share >= TIME_WAIT_WARN else "info"
    mode = {0: "off", 2: "loopback only"}.get(reuse, str(reuse))
    return Result("node.tcp_tw_reuse_off", sev, "TIME_WAIT sockets hold ephemeral ports",
                  f"{tw} TCP sockets are in TIME_WAIT ({100 * share:.0f}% of the {size}-port ephemeral "
                  f"range) and tcp_tw_reuse is {reuse} ({mode}): outgoing connections cannot reuse them.",
                  ev, fix, impact=float(tw) if sev == "warning" else 0.0)


def check_backlog(f: Facts, backlog_drops: int) -> Result | None:
    value = _int(f.sysctls.get("net.core.netdev_max_backlog"))
    if value is None:
        return None
    by_speed = pow2_at_least(f.fastest_link_mbps) if f.fastest_link_mbps else BACKLOG_DEFAULT
    want = min(65536, max(BACKLOG_DEFAULT, by_speed, 2 * value if backlog_drops else 0))
    if value >= want and not backlog_drops:
        return None
    ev = {"net.core.netdev_max_backlog": value, "fastest_link_mbps": f.fastest_link_mbps,
          "backlog_drops_in_window": backlog_drops, "recommended": want}
    fix = [f"sysctl -w net.core.netdev_max_backlog={want}"]
    if backlog_drops:
        return Result("node.netdev_max_backlog_low", "warning", "The input backlog overflows",
                      f"{backlog_drops} packets were dropped because a CPU's input backlog "
                      f"(netdev_max_backlog={value}) was full.", ev, fix, impact=float(backlog_drops))
    return Result("node.netdev_max_backlog_low", "info", "netdev_max_backlog is low for the link speed",
                  f"netdev_max_backlog={value} packets per CPU is small for a {f.fastest_link_mbps} Mbit/s "
                  f"link; bursts will be dropped.", ev, fix)


def check_buffers(f: Facts, buffer_errors: int) -> Result | None:
    rmax = _int(f.sysctls.get("net.core.rmem_max"))
    wmax = _int(f.sysctls.get("net.core.wmem_max"))
    if rmax is None or wmax is None:
        return None
    speed = f.fastest_link_mbps
    bdp = speed * 1e6 / 8 * BUFFER_RTT_SECONDS if speed else 0
    want = min(BUFFER_MAX, max(BUFFER_MIN, pow2_at_least(bdp) if bdp else 16 << 20))
    if buffer_errors:
        want = min(BUFFER_MAX, max(want, pow2_at_least(2 * max(rmax, wmax))))
    if min(rmax, wmax) >= want and not buffer_errors:
        return None
    ev = {"net.core.rmem_max": rmax, "net.core.wmem_max": wmax, "fastest_link_mbps": speed,
          "buffer_errors_in_window": buffer_errors, "recommended": want}
    fix = [f"sysctl -w net.core.rmem_max={want}", f"sysctl -w net.core.wmem_max={want}"]
    basis = (f"the {speed} Mbit/s link at {BUFFER_RTT_SECONDS * 1000:.0f} ms RTT needs {_mib(bdp)}"
             if bdp else "links of unknown speed (virtual NICs) are sized for 10 Gbit/s")
    if buffer_errors:
        return Result("node.socket_buffers_small", "warning", "Socket buffers overflow (rmem_max/wmem_max)",
                      f"{buffer_errors} UDP datagrams were lost to full socket buffers in this window; "
                      f"rmem_max={rmax} and wmem_max={wmax} cap what applications may ask for.",
                      ev, fix, impact=float(buffer_errors))
    return Result("node.socket_buffers_small", "info", "rmem_max/wmem_max are small",
                  f"rmem_max={rmax} and wmem_max={wmax} cap socket buffers below {want} ({basis}).", ev, fix)


def check_congestion(f: Facts) -> Result | None:
    cc = f.sysctls.get("net.ipv4.tcp_congestion_control")
    qdisc = f.sysctls.get("net.core.default_qdisc")
    if not cc:
        return None
    if cc == "bbr" and qdisc in ("fq", None):  # None: not visible from this netns, no advice
        return None
    avail = f.sysctls.get("net.ipv4.tcp_available_congestion_control") or ""
    ev = {"net.ipv4.tcp_congestion_control": cc, "net.core.default_qdisc": qdisc,
          "available": avail, "tcp_bbr": f.bbr}
    fix = []
    if f.bbr == "module":
        fix.append("modprobe tcp_bbr && echo tcp_bbr > /etc/modules-load.d/bbr.conf")
    elif f.bbr == "absent":
        fix.append("this kernel has no tcp_bbr (neither built in nor as a module): keep "
                   f"{cc}, or use a kernel built with CONFIG_TCP_CONG_BBR")
    fix.append("sysctl -w net.core.default_qdisc=fq   # applies to devices created or re-set after")
    if f.bbr != "absent":
        fix.append("sysctl -w net.ipv4.tcp_congestion_control=bbr")
    where = {"available": "tcp_bbr is available", "module": "tcp_bbr exists as a module (not loaded)",
             "absent": "tcp_bbr is not available on this kernel"}[f.bbr]
    if cc == "bbr":
        summary = f"BBR runs with default_qdisc={qdisc}; BBR paces best with fq."
    else:
        summary = (f"TCP uses {cc} with default_qdisc={qdisc}; bbr with fq keeps throughput up and "
                   f"queues short on lossy or long paths ({where}).")
    return Result("node.congestion_control", "info", "TCP congestion control is not bbr with fq",
                  summary, ev, fix)


def check_inotify(f: Facts) -> Result | None:
    watches = _int(f.sysctls.get("fs.inotify.max_user_watches"))
    inst = _int(f.sysctls.get("fs.inotify.max_user_instances"))
    if watches is None or inst is None:
        return None
    used_i = f.inotify.get("instances_in_use", 0)
    used_w = f.inotify.get("watches_in_use", 0)
    want_w = max(INOTIFY_WATCHES_RECOMMENDED, pow2_at_least(2 * used_w) if used_w else 0)
    want_i = max(INOTIFY_INSTANCES_RECOMMENDED, pow2_at_least(2 * used_i) if used_i else 0)
    hot = (inst and used_i >= INOTIFY_USE_WARN * inst) or (watches and used_w >= INOTIFY_USE_WARN * watches)
    if watches >= want_w and inst >= want_i and not hot:
        return None
    ev = {"fs.inotify.max_user_watches": watches, "fs.inotify.max_user_instances": inst,
          **f.inotify, "recommended_watches": want_w, "recommended_instances": want_i}
    fix = [f"sysctl -w fs.inotify.max_user_watches={max(watches, want_w)}",
           f"sysctl -w fs.inotify.max_user_instances={max(inst, want_i)}"]
    if hot:
        return Result("node.inotify_limits_low", "warning", "inotify limits nearly reached",
                      f"One user holds {used_i} of {inst} inotify instances and {used_w} of {watches} "
                      "watches: the next kubelet, container runtime or log agent watch fails with "
                      "'too many open files' or ENOSPC.", ev, fix)
    return Result("node.inotify_limits_low", "info", "inotify limits are low for a Kubernetes node",
                  f"max_user_watches={watches} and max_user_instances={inst}: container runtimes, "
                  f"kubelet and log agents on a busy node need about {INOTIFY_WATCHES_RECOMMENDED} and "
                  f"{INOTIFY_INSTANCES_RECOMMENDED}.", ev, fix)


def check_netfilter(f: Facts, threshold: int) -> Result | None:
    nf = f.netfilter
    total = nf.get("total_rules") or 0
    if total < threshold:
        return None
    ev = {k: nf.get(k) for k in ("total_rules", "nft_rules", "iptables_legacy_rules",
                                  "ip6tables_legacy_rules", "kube_svc_chains", "kube_sep_chains",
                                  "kube_proxy_rules")}
    ev["threshold"] = threshold
    ev["top_chains"] = nf.get("top_chains", [])
    kube = nf.get("kube_svc_chains", 0)
    if kube:
        summary = (f"The kernel holds {total:,} netfilter rules, {nf.get('kube_proxy_rules', 0):,} of them in "
                   f"kube-proxy chains ({kube:,} KUBE-SVC-* services). Every new connection walks "
                   "these chains linearly, and each kube-proxy sync rewrites them: latency and CPU "
                   "grow with the number of services.")
        fix = ["replace kube-proxy with an eBPF service load balancer: Cilium kube-proxy replacement "
               "(helm --set kubeProxyReplacement=true) or the Calico eBPF dataplane "
               "(Installation spec.calicoNetwork.linuxDataplane: BPF)",
               "or switch kube-proxy to hashed lookups: --proxy-mode=nftables (Kubernetes 1.31+) "
               "or --proxy-mode=ipvs",
               "nft list ruleset | grep -c 'KUBE-SVC-'   # re-count after the change"]
    else:
        summary = (f"The kernel holds {total:,} netfilter rules (threshold {threshold:,}). Rules are "
                   "evaluated linearly per packet: long chains cost CPU on every new connection.")
        fix = ["fold address and port lists into nft sets or maps (or ipset for iptables): one lookup "
               "instead of one rule per entry",
               "nft list ruleset -a | less   # find the longest chains listed in top_chains"]
    return Result("netfilter.rule_count_high", "warning", "Very many netfilter rules",
                  summary, ev, fix, impact=0.0)


def check_overlays(f: Facts) -> Result | None:
    up = [o for o in f.overlays if o.get("up")]
    if not up:
        return None
    worst = max((o.get("overhead") or 0 for o in up), default=0)
    ev = {"overlay_devices": up, "overhead_bytes": worst,
          "overhead_percent_of_1500": round(100 * worst / 1500, 1)}
    names = ", ".join(f"{o['name']} ({o['kind']})" for o in up[:5])
    return Result("node.overlay_in_use", "info", "Pod traffic pays the overlay tax",
                  f"Overlay devices are up: {names}. Each packet carries {worst} bytes of "
                  f"encapsulation ({ev['overhead_percent_of_1500']}% of a 1500-byte MTU) and costs "
                  "encapsulation CPU; MTUs must account for it (see mtu.mismatch).",
                  ev, ["where nodes share an L2 or routed network, use native routing: Cilium "
                       "routingMode=native, Calico IPIP/VXLAN mode Never (BGP), Flannel host-gw",
                       f"or raise the underlay MTU (jumbo frames, 9001) so pods keep 1500 plus the "
                       f"{worst}-byte header"])


def check(f: Facts, *, conntrack_peak: int | None = None, conntrack_drops: int = 0,
          listen: ListenWindow | None = None, buffer_errors: int = 0, backlog_drops: int = 0,
          netfilter_threshold: int = 10000) -> list[Result]:
    results = [
        check_conntrack(f, conntrack_peak, conntrack_drops),
        check_listen_overflow(listen),
        check_somaxconn(f, listen),
        check_ports(f),
        check_tw_reuse(f),
        check_backlog(f, backlog_drops),
        check_buffers(f, buffer_errors),
        check_congestion(f),
        check_inotify(f) if f.inotify else None,
        check_netfilter(f, netfilter_threshold),
        check_overlays(f),
    ]
    return [r for r in results if r is not None]
