"""MTU audit: find MTU settings on this node that silently drop packets.

Two halves:

- ``collect()`` reads the interfaces and routes of the daemon's own netns (and, with
  ``all_netns``, of every netns under /run/netns and /proc/*/ns/net, bounded) through
  rtnetlink (pyroute2), never by parsing ``ip`` output. Per netns it makes one link dump and
  one route dump (the route dump also returns the cached PMTU exceptions), plus RTM_GETNSID
  requests only when a link there points into another netns. The other end of each veth of
  the daemon's netns whose netns was not read that way (no ``all_netns``, or no setns without
  CAP_SYS_ADMIN) is read from the daemon's netns itself: RTM_GETLINK with IFLA_TARGET_NETNSID
  (daemon/host/linkpeer.py: CAP_NET_ADMIN, kernel 4.20+, no setns). Its netns is named by matching
  the nsid against the files under /run/netns and /proc/*/ns/net that can be opened; one that
  matches none is known by its nsid only. Where the kernel refuses, that veth's peer stays
  unseen, as before, and Snapshot.peers says why.
- ``audit()`` is pure: it turns a Snapshot into Issues with exact remediation commands.

Rules (each problem reported once):

- veth_mismatch: the two ends of a veth pair differ in MTU (also across netns). The bigger
  end's bigger frames are dropped by the smaller end with no ICMP error. The fix sets the
  bigger end down to the smaller one, except for a pod pair (one end in the daemon's netns)
  on a node whose other pod pairs mostly agree on one MTU (at least two, both ends equal):
  then the end that differs from that MTU is set to it.
- overlay_too_big: an up tunnel device whose MTU plus its encapsulation overhead exceeds the
  MTU of the device it sends through (its 'link' device, else the device of its netns'
  default route). Tunnels whose lower device is unknown are skipped (see skipped_overlays()).
- bridge_ports_differ: ports of one bridge with different MTUs.
- pod_above_overlay: the daemon's netns has an up overlay device (vxlan, geneve, ipip,
  wireguard) and a pod's veth is above the effective overlay MTU
  min(overlay MTU, lower MTU - overhead). A pod end whose default route carries an MTU at or
  below that value (Cilium's "route MTU") is protected and not reported. Veth pairs with both
  ends in the daemon's netns (e.g. cilium_host/cilium_net) and the overlays' own lower
  devices (with their peers and bridge ports) are not pods.

Overheads (outer headers; the outer Ethernet header is not counted against the MTU):
VXLAN 50 over IPv4 / 70 over IPv6 (IP + UDP 8 + VXLAN 8 + inner Ethernet 14); Geneve the
same without options (options cannot be read from rtnetlink and are not counted); IPIP 20;
sit 20; GRE 24 (IPv4 + 4-byte GRE header, without key/csum/seq options), gretap 38, ip6gre
44, ip6gretap 58; ip6tnl 40; WireGuard 60 over IPv4 / 80 over IPv6. When the underlay family
cannot be read (VXLAN/Geneve in external/metadata mode, WireGuard, whose peers are only
visible over generic netlink) IPv4 is assumed, as Calico's docs do for WireGuard (60).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
from dataclasses import dataclass, field
from typing import Any

from dpwatch.daemon.host import linkpeer
from dpwatch.daemon.host import netns as netns_mod

log = logging.getLogger("dpwatch.mtuaudit")

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
IFF_UP = 0x1
ARPHRD_LOOPBACK = 772
RTM_F_CLONED = 0x200
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
MAX_NETNS_DEFAULT = 64

# Tunnel kinds whose encapsulation overhead we know: kind -> (IPv4 underlay, IPv6 underlay).
# None where that underlay is impossible for the kind.
OVERHEAD: dict[str, tuple[int | None, int | None]] = {
    "vxlan": (50, 70),
    "geneve": (50, 70),
    "ipip": (20, None),
    "sit": (20, None),
    "gre": (24, None),
    "gretap": (38, None),
    "ip6gre": (None, 44),
    "ip6gretap": (None, 58),
    "ip6tnl": (None, 40),
    "wireguard": (60, 80),
}
# Underlay family fixed by the kind itself.
KIND_FAMILY = {"ipip": AF_INET, "sit": AF_INET, "gre": AF_INET, "gretap": AF_INET,
               "ip6gre": AF_INET6, "ip6gretap": AF_INET6, "ip6tnl": AF_INET6}
# Overlay devices that carry pod traffic between nodes (the pod_above_overlay rule).
POD_OVERLAY_KINDS = frozenset({"vxlan", "geneve", "ipip", "wireguard"})
# IFLA_INFO_DATA attribute holding the tunnel's 'link' (lower) device, per kind.
_DATA_LINK = {"vxlan": "IFLA_VXLAN_LINK", "gre": "IFLA_GRE_LINK", "gretap": "IFLA_GRE_LINK",
              "ip6gre": "IFLA_GRE_LINK", "ip6gretap": "IFLA_GRE_LINK",
              "ipip": "IFLA_IPTUN_LINK", "sit": "IFLA_IPTUN_LINK", "ip6tnl": "IFLA_IPTUN_LINK"}

CNI_SOURCES = {
    "cilium": "https://docs.cilium.io/en/stable/helm-reference/ (value MTU; "
              "install/kubernetes/cilium/templates/cilium-configmap.yaml writes it as cilium-config key mtu)",
    "calico": "https://docs.tigera.io/calico/latest/networking/configuring/mtu",
    "flannel": "https://github.com/flannel-io/cni-plugin#network-configuration-reference and "
               "https://github.com/flannel-io/flannel/blob/master/Documentation/configuration.md",
}


@dataclass
class Link:
    """One interface in one netns."""
    netns: int                       # netns inode
    ifindex: int
    name: str
    kind: str                        # rtnetlink kind, "loopback", or "device" (physical/unknown)
    mtu: int
    up: bool
    master: int | None               # ifindex of the bridge/bond it is enslaved to (same netns)
    lower: tuple[int, int] | None    # (netns inode, ifindex) of the device it sends through
    peer: tuple[int, int] | None     # veth only: (netns inode, ifindex) of the other end
    underlay_family: int | None      # AF_INET/AF_INET6 of a tunnel's underlay, None if unknown
    lower_via: str | None = None     # "link" (configured) or "default-route" (inferred), if lower


@dataclass
class Snapshot:
    links: list[Link]
    routes: list[dict]               # routes with an explicit MTU: {"netns","dst","dev","mtu"}
    pmtu: list[dict]                 # PMTU exceptions: {"netns","dst","dev","mtu","expires"}
    netns_skipped: int               # over max_netns, or unreadable
    own_netns: int | None = None     # the daemon's netns inode (None: the first link's netns)
    netns_paths: dict[int, str] = field(default_factory=dict)  # inode -> /run/netns/X or /proc/PID/ns/net
    # Namespaces whose links were read by nsid from the daemon's netns: netns key -> that nsid.
    # The key is the inode, or -1 - nsid when no openable file matched (inode unknown).
    netns_ids: dict[int, int] = field(default_factory=dict)
    # How the peers were read by nsid: {"wanted", "read", "refused", "unnamed", "error"}.
    peers: dict = field(default_factory=dict)


@dataclass
class Issue:
    kind: str                        # veth_mismatch | overlay_too_big | bridge_ports_differ | pod_above_overlay
    devices: list[dict]              # [{"netns","name","kind","mtu"}...]
    overhead: int | None
    safe_mtu: int | None
    summary: str
    remediation: list[str]


# ---------------------------------------------------------------------------------------
# Pure part
# ---------------------------------------------------------------------------------------

def overlay_overhead(link: Link) -> int | None:
    """Bytes a tunnel adds in front of each packet, or None when ``link`` is not a tunnel kind
    we know. Unknown underlay family: IPv4 is assumed (the smaller overhead)."""
    pair = OVERHEAD.get(link.kind)
    if pair is None:
        return None
    v4, v6 = pair
    family = link.underlay_family or KIND_FAMILY.get(link.kind)
    if family == AF_INET6 and v6 is not None:
        return v6
    return v4 if v4 is not None else v6


def cni_remediation(safe_mtu: int, overhead: int | None = None) -> list[str]:
    """The CNI settings that fix the pod MTU at ``safe_mtu`` (new pods only: existing pods keep
    their MTU until they are recreated). Cilium takes the underlying network's MTU and subtracts
    the tunnel overhead itself, so its value is ``safe_mtu + overhead`` when the overhead is known."""
    n = int(safe_mtu)
    base = n + int(overhead) if overhead else n
    return [
        f"helm upgrade cilium cilium/cilium --namespace kube-system --reuse-values --set MTU={base}"
        f"  # Cilium: Helm value MTU (cilium-config key mtu) is the underlying network MTU; Cilium "
        f"subtracts the tunnel overhead itself; restart the cilium DaemonSet, then the pods",
        f"kubectl patch installation.operator.tigera.io default --type merge "
        f"-p '{{\"spec\":{{\"calicoNetwork\":{{\"mtu\":{n}}}}}}}'"
        f"  # Calico (operator install): Installation spec.calicoNetwork.mtu",
        f"kubectl patch configmap/calico-config -n kube-system --type merge "
        f"-p '{{\"data\":{{\"veth_mtu\":\"{n}\"}}}}' && kubectl rollout restart daemonset calico-node -n kube-system"
        f"  # Calico (manifest install): ConfigMap calico-config key veth_mtu",
        f"kubectl -n kube-flannel edit configmap kube-flannel-cfg"
        f"  # Flannel: in cni-conf.json set \"delegate\": {{\"mtu\": {n}}} on the flannel plugin "
        f"(namespace kube-system on older installs); flanneld derives its own MTU from the "
        f"--iface interface, so fix that interface's MTU or --iface for the tunnel itself",
    ]


_UNSET = object()


class _Index:
    def __init__(self, snap: Snapshot):
        self.snap = snap
        self.by_key: dict[tuple[int, int], Link] = {(l.netns, l.ifindex): l for l in snap.links}
        self.order = {(l.netns, l.ifindex): i for i, l in enumerate(snap.links)}
        self.own = snap.own_netns if snap.own_netns is not None else (
            snap.links[0].netns if snap.links else None)
        self._pod_mtu: Any = _UNSET

    def get(self, key):
        return self.by_key.get(key) if key is not None else None

    # -- text helpers --------------------------------------------------------------
    def where(self, ino: int) -> str:
        if ino == self.own:
            return "the daemon's netns"
        nsid = self.snap.netns_ids.get(ino)
        if ino < 0:
            return f"the netns with nsid {nsid}"
        tag = "" if nsid is None else f", nsid {nsid}"
        path = self.snap.netns_paths.get(ino, "")
        if path.startswith("/run/netns/"):
            return f"netns {path[len('/run/netns/'):]}" + (f" (inode {ino}{tag})" if tag else "")
        if path.startswith("/proc/") and path.endswith("/ns/net"):
            return f"the netns of pid {path.split('/')[2]}" + (f" (inode {ino}{tag})" if tag else "")
        return f"netns {ino}"

    def prefix(self, ino: int) -> str:
        if ino == self.own:
            return ""
        path = self.snap.netns_paths.get(ino, "")
        if path.startswith("/run/netns/"):
            return f"ip netns exec {shlex.quote(path[len('/run/netns/'):])} "
        if path.startswith("/proc/"):
            return f"nsenter --net={shlex.quote(path)} "
        if ino < 0:
            return (f"# in the netns the node's netns numbers nsid {self.snap.netns_ids.get(ino)} "
                    f"(no file of it is visible to dpwatch; `ip netns list-id` on the node names it): ")
        return f"# netns inode {ino} has no known path: "

    def set_mtu(self, link: Link, mtu: int) -> str:
        return f"{self.prefix(link.netns)}ip link set dev {shlex.quote(link.name)} mtu {int(mtu)}"

    def dev(self, link: Link) -> dict:
        """A device of an Issue. A netns read by nsid also gives that nsid and its path (the
        inode is None when no file of it could be opened)."""
        out = {"netns": link.netns, "name": link.name, "kind": link.kind, "mtu": link.mtu}
        nsid = self.snap.netns_ids.get(link.netns)
        if nsid is not None:
            out["netns"] = link.netns if link.netns >= 0 else None
            out["netnsid"] = nsid
            out["netns_path"] = self.snap.netns_paths.get(link.netns)
        return out

    def pod_mtu(self) -> tuple[int, int] | None:
        """(MTU, how many pairs) shared by most pod veth pairs of the daemon's netns whose two
        ends agree, when at least two and more than half of those pairs do: the node's pod MTU."""
        if self._pod_mtu is _UNSET:
            counts: dict[int, int] = {}
            underlay = _underlay_keys(self)
            for link in self.snap.links:
                peer = self.get(link.peer)
                if (link.kind != "veth" or link.netns != self.own or peer is None or peer.netns == self.own
                        or _key(link) in underlay or link.mtu != peer.mtu):
                    continue
                counts[link.mtu] = counts.get(link.mtu, 0) + 1
            best = max(counts.items(), key=lambda kv: kv[1], default=None)
            total = sum(counts.values())
            self._pod_mtu = best if best and best[1] >= 2 and 2 * best[1] > total else None
        return self._pod_mtu


def _key(link: Link) -> tuple[int, int]:
    return (link.netns, link.ifindex)


def _family_note(link: Link) -> str:
    fam = link.underlay_family or KIND_FAMILY.get(link.kind)
    if fam == AF_INET6:
        return "over IPv6"
    if fam == AF_INET:
        return "over IPv4"
    return "over IPv4 (assumed: the underlay family is not visible)"


def _veth_mismatch(ix: _Index) -> list[Issue]:
    out, seen = [], set()
    for link in ix.snap.links:
        if link.kind != "veth":
            continue
        peer = ix.get(link.peer)
        if peer is None:
            continue
        pair = frozenset((_key(link), _key(peer)))
        if pair in seen:
            continue
        seen.add(pair)
        if link.mtu == peer.mtu:
            continue
        a, b = sorted((link, peer), key=lambda l: ix.order[_key(l)])
        small, big = (a, b) if a.mtu < b.mtu else (b, a)
        change, target, note = _veth_fix(ix, a, b, small, big)
        out.append(Issue(
            kind="veth_mismatch", devices=[ix.dev(a), ix.dev(b)], overhead=None, safe_mtu=small.mtu,
            summary=(f"veth pair {a.name} ({ix.where(a.netns)}, MTU {a.mtu}) and {b.name} "
                     f"({ix.where(b.netns)}, MTU {b.mtu}) differ: frames over {small.mtu} bytes "
                     f"sent from {big.name} are dropped at {small.name} with no ICMP error.{note}"),
            remediation=[ix.set_mtu(change, target)]))
    return out


def _veth_fix(ix: _Index, a: Link, b: Link, small: Link, big: Link) -> tuple[Link, int, str]:
    """(end to change, MTU to give it, a note for the summary). A pod pair on a node whose pod
    pairs agree on an MTU: the end that differs from it; otherwise the bigger end, lowered."""
    pod = (a.netns == ix.own) != (b.netns == ix.own)
    agreed = ix.pod_mtu() if pod else None
    if agreed is None or agreed[0] not in (a.mtu, b.mtu):
        return big, small.mtu, ""
    mtu, pairs = agreed
    odd = a if a.mtu != mtu else b
    return odd, mtu, (f" {pairs} other pod veth pairs of this node are MTU {mtu} on both ends, "
                      f"so {odd.name} is the end to change.")


def _lower_of(ix: _Index, link: Link) -> Link | None:
    lower = ix.get(link.lower)
    if lower is None or _key(lower) == _key(link):
        return None
    return lower


def _lower_desc(link: Link, lower: Link) -> str:
    via = " (the default route's device)" if link.lower_via == "default-route" else ""
    return f"{lower.name}{via}"


def _overlay_too_big(ix: _Index) -> list[Issue]:
    out = []
    for link in ix.snap.links:
        overhead = overlay_overhead(link)
        if overhead is None or not link.up:
            continue
        lower = _lower_of(ix, link)
        if lower is None:
            continue  # unknown lower device: see skipped_overlays()
        if link.mtu + overhead <= lower.mtu:
            continue
        safe = lower.mtu - overhead
        out.append(Issue(
            kind="overlay_too_big", devices=[ix.dev(link), ix.dev(lower)], overhead=overhead, safe_mtu=safe,
            summary=(f"{link.kind} device {link.name} ({ix.where(link.netns)}) has MTU {link.mtu} but "
                     f"sends through {_lower_desc(link, lower)} with MTU {lower.mtu}, and {link.kind} "
                     f"{_family_note(link)} adds {overhead} bytes, so its full-size packets "
                     f"({link.mtu + overhead} bytes) do not fit; at most {safe} does."),
            remediation=[ix.set_mtu(link, safe)] + cni_remediation(safe, overhead)))
    return out


def _lower_peer_commands(ix: _Index, ports: list[Link], safe: int) -> list[str]:
    """Commands that lower ports (and their veth peers, so no veth pair ends up mismatched)."""
    cmds, done = [], set()
    for port in ports:
        if port.mtu <= safe:
            continue
        for dev in (port, ix.get(port.peer) if port.kind == "veth" else None):
            if dev is None or _key(dev) in done or dev.mtu <= safe:
                continue
            done.add(_key(dev))
            cmds.append(ix.set_mtu(dev, safe))
    return cmds


def _bridge_ports_differ(ix: _Index) -> list[Issue]:
    groups: dict[tuple[int, int], list[Link]] = {}
    for link in ix.snap.links:
        if link.master is None:
            continue
        master = ix.get((link.netns, link.master))
        if master is None or master.kind != "bridge":
            continue
        groups.setdefault(_key(master), []).append(link)
    out = []
    for bkey, ports in groups.items():
        if len({p.mtu for p in ports}) < 2:
            continue
        bridge = ix.by_key[bkey]
        safe = min(p.mtu for p in ports)
        listing = ", ".join(f"{p.name} {p.mtu}" for p in ports)
        out.append(Issue(
            kind="bridge_ports_differ", devices=[ix.dev(p) for p in ports], overhead=None, safe_mtu=safe,
            summary=(f"ports of bridge {bridge.name} ({ix.where(bridge.netns)}) have different MTUs "
                     f"({listing}): frames over {safe} bytes from the bigger ports are dropped at the "
                     f"smaller ones."),
            remediation=_lower_peer_commands(ix, ports, safe)))
    return out


def effective_overlay_mtu(snap: Snapshot) -> tuple[int, Link, int] | None:
    """(MTU, overlay device, its overhead) of the smallest path through an up overlay device of
    the daemon's netns, or None when it has none."""
    ix = _Index(snap)
    return _effective(ix)


def _effective(ix: _Index):
    best = None
    for link in ix.snap.links:
        if link.netns != ix.own or link.kind not in POD_OVERLAY_KINDS or not link.up:
            continue
        overhead = overlay_overhead(link)
        cap = link.mtu
        lower = _lower_of(ix, link)
        if lower is not None:
            cap = min(cap, lower.mtu - overhead)
        if best is None or cap < best[0]:
            best = (cap, link, overhead)
    return best


def _underlay_keys(ix: _Index) -> set[tuple[int, int]]:
    """Lower devices of every tunnel, their veth peers, and (for bridges) their ports and the
    ports' peers: these carry encapsulated traffic and are not pod interfaces."""
    keys: set[tuple[int, int]] = set()
    for link in ix.snap.links:
        if overlay_overhead(link) is None:
            continue
        lower = _lower_of(ix, link)
        if lower is None:
            continue
        todo = [lower]
        if lower.kind == "bridge":
            todo += [p for p in ix.snap.links if p.netns == lower.netns and p.master == lower.ifindex]
        for dev in todo:
            keys.add(_key(dev))
            if dev.kind == "veth" and dev.peer is not None:
                keys.add(dev.peer)
    return keys


def _route_protected(ix: _Index, link: Link, limit: int) -> bool:
    """True when ``link``'s netns sends its default route through it with an MTU <= limit."""
    for r in ix.snap.routes:
        if (r["netns"] == link.netns and r["dev"] == link.name and r["dst"] in ("0.0.0.0/0", "::/0")
                and r["mtu"] is not None and r["mtu"] <= limit):
            return True
    return False


def _pod_above_overlay(ix: _Index) -> list[Issue]:
    eff = _effective(ix)
    if eff is None:
        return []
    safe, overlay, overhead = eff
    lower = _lower_of(ix, overlay)
    path = f"{overlay.name} over {_lower_desc(overlay, lower)}" if lower else overlay.name
    underlay = _underlay_keys(ix)
    out, seen = [], set()
    for link in ix.snap.links:
        if link.kind != "veth" or _key(link) in underlay:
            continue
        peer = ix.get(link.peer)
        ends = [link] + ([peer] if peer is not None else [])
        pair = frozenset(_key(e) for e in ends)
        if pair in seen:
            continue
        seen.add(pair)
        if peer is not None and link.netns == ix.own and peer.netns == ix.own:
            continue  # a host-internal pair (e.g. cilium_host/cilium_net), not a pod
        pod_ends = [e for e in ends if e.netns != ix.own] or ends  # peer unseen: judge what we see
        above = [e for e in pod_ends if e.mtu > safe and not _route_protected(ix, e, safe)]
        if not above:
            continue
        ends.sort(key=lambda l: ix.order[_key(l)])
        names = " / ".join(f"{e.name} ({ix.where(e.netns)}, MTU {e.mtu})" for e in ends)
        unseen = "" if peer is not None else "; its peer's netns was not collected"
        out.append(Issue(
            kind="pod_above_overlay", devices=[ix.dev(e) for e in ends], overhead=overhead, safe_mtu=safe,
            summary=(f"pod veth {names} is above the node's overlay MTU {safe} ({path}), so pod packets "
                     f"over {safe} bytes to other nodes are dropped or must be fragmented{unseen}."),
            remediation=[ix.set_mtu(e, safe) for e in ends if e.mtu > safe] + cni_remediation(safe, overhead)))
    return out


def audit(snap: Snapshot) -> list[Issue]:
    """All MTU problems in ``snap`` (no I/O): veth mismatches, overlays too big for their lower
    device, bridges with differing ports, pods above the node's overlay MTU."""
    ix = _Index(snap)
    return _veth_mismatch(ix) + _overlay_too_big(ix) + _bridge_ports_differ(ix) + _pod_above_overlay(ix)


def skipped_overlays(snap: Snapshot) -> list[dict]:
    """Up tunnel devices whose lower device is unknown (no 'link' device and no default route):
    overlay_too_big cannot judge them."""
    ix = _Index(snap)
    return [ix.dev(l) for l in snap.links
            if overlay_overhead(l) is not None and l.up and _lower_of(ix, l) is None]


# ---------------------------------------------------------------------------------------
# Collection (pyroute2, inside each netns)
# ---------------------------------------------------------------------------------------

def _attrs(nla: Any) -> dict[str, Any]:
    """Attribute name -> value of a pyroute2 nla (empty when it is not decoded)."""
    try:
        items = nla["attrs"]
    except (TypeError, KeyError, IndexError):
        return {}
    out: dict[str, Any] = {}
    for item in items or ():
        try:  # tuples, or pyroute2's nla_slot (indexable, without len())
            name, value = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            continue
        if name != "UNKNOWN":
            out.setdefault(name, value)
    return out


def _link_record(msg: Any) -> dict:
    top = _attrs(msg)
    info = _attrs(top.get("IFLA_LINKINFO"))
    kind = info.get("IFLA_INFO_KIND")
    data = _attrs(info.get("IFLA_INFO_DATA"))
    if not kind:
        kind = "loopback" if msg["ifi_type"] == ARPHRD_LOOPBACK else "device"
    family = KIND_FAMILY.get(kind)
    if kind == "vxlan":
        if data.get("IFLA_VXLAN_GROUP6") or data.get("IFLA_VXLAN_LOCAL6"):
            family = AF_INET6
        elif data.get("IFLA_VXLAN_GROUP") or data.get("IFLA_VXLAN_LOCAL"):
            family = AF_INET
    elif kind == "geneve":
        if data.get("IFLA_GENEVE_REMOTE6"):
            family = AF_INET6
        elif data.get("IFLA_GENEVE_REMOTE"):
            family = AF_INET
    index = int(msg["index"])
    link = top.get("IFLA_LINK")
    lower = data.get(_DATA_LINK.get(kind, ""), None)
    if not lower and kind != "veth" and link and link != index:
        lower = link
    # A truncated attribute comes back from pyroute2 as raw bytes: never use it as a value.
    name = top.get("IFLA_IFNAME")
    return {"index": index, "name": name if isinstance(name, str) and name else f"if{index}",
            "kind": kind if isinstance(kind, str) else "device",
            "mtu": int(top.get("IFLA_MTU") or 0), "up": bool(msg["flags"] & IFF_UP),
            "master": _int(top.get("IFLA_MASTER")) or None, "link": _int(link),
            "link_netnsid": _int(top.get("IFLA_LINK_NETNSID")), "lower": _int(lower) or None,
            "family": family}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _route_record(msg: Any) -> dict | None:
    family = msg["family"]
    if family not in (AF_INET, AF_INET6):
        return None
    top = _attrs(msg)
    mtu = _attrs(top.get("RTA_METRICS")).get("RTAX_MTU")
    oif = top.get("RTA_OIF")
    if oif is None and top.get("RTA_MULTIPATH"):
        hops = top["RTA_MULTIPATH"]
        try:
            oif = hops[0]["oif"]
        except (TypeError, KeyError, IndexError):
            oif = None
    cache = top.get("RTA_CACHEINFO")
    expires = None
    if cache is not None:
        try:
            expires = int(cache["rta_expires"])
        except (TypeError, KeyError, ValueError):
            expires = None
    dst = top.get("RTA_DST")
    return {"family": family, "dst": dst if isinstance(dst, str) else None, "dst_len": int(msg["dst_len"]),
            "oif": _int(oif), "table": top.get("RTA_TABLE") or msg["table"], "type": msg["type"],
            "priority": top.get("RTA_PRIORITY") or 0, "mtu": _int(mtu),
            "cloned": bool(msg["flags"] & RTM_F_CLONED), "expires": expires}


def _read_here() -> dict:
    """Runs inside one netns: its inode, links and routes (one link dump, one route dump)."""
    from pyroute2 import IPRoute

    here = os.stat("/proc/thread-self/ns/net").st_ino
    ipr = IPRoute()
    try:
        links = [_link_record(m) for m in ipr.get_links()]
        # Family 255 returns both IPv4 and IPv6; a dump without RTM_F_CLONED in non-strict mode
        # also carries the PMTU exceptions (flagged RTM_F_CLONED), so one dump gives both.
        routes = [r for r in (_route_record(m) for m in ipr.route("dump", family=255)) if r]
    finally:
        ipr.close()
    return {"inode": here, "links": links, "routes": routes, "nsids": {}}


def _nsids_here(wanted: set[int], candidates: list[tuple[int, int]]) -> dict[int, int]:
    """Runs inside one netns: {nsid: netns inode} for the ``wanted`` nsids (as this netns numbers
    its peers), asking RTM_GETNSID for each candidate (inode, fd) in turn until all are found."""
    from pyroute2 import IPRoute

    found: dict[int, int] = {}
    ipr = IPRoute()
    try:
        for ino, fd in candidates:
            if not wanted - set(found):
                break
            if ino in found.values():
                continue
            try:
                reply = ipr.get_netnsid(fd=fd)
            except Exception as exc:  # a kernel without RTM_GETNSID by fd
                log.debug("RTM_GETNSID: %s", exc)
                break
            nsid = (reply or {}).get("nsid")
            if nsid in wanted:
                found[nsid] = ino
    finally:
        ipr.close()
    return found


def _candidates(ino: int, reads: dict[int, dict], fds: dict[int, int]) -> list[tuple[int, int]]:
    """Namespaces to ask about, likeliest first: those holding the other end of one of this
    netns' cross-netns veths (matching ifindex and back-pointing IFLA_LINK), then the rest."""
    mine = {(l["index"], l["link"]) for l in reads[ino]["links"]
            if l["kind"] == "veth" and l["link_netnsid"] is not None}
    likely = []
    for other, rd in reads.items():
        if other == ino:
            continue
        if any(l["kind"] == "veth" and l["link_netnsid"] is not None and (l["link"], l["index"]) in mine
               for l in rd["links"]):
            likely.append(other)
    rest = [o for o in reads if o != ino and o not in likely]
    return [(o, fds[o]) for o in likely + rest if o in fds]


def _dst_text(r: dict, plain_host: bool = False) -> str:
    dst = r["dst"] or ("0.0.0.0" if r["family"] == AF_INET else "::")
    full = 32 if r["family"] == AF_INET else 128
    if plain_host and r["dst_len"] == full:
        return dst
    return f"{dst}/{r['dst_len']}"


def _default_dev(routes: list[dict], family: int | None) -> int | None:
    for fam in ((family,) if family else (AF_INET, AF_INET6)):
        cands = [r for r in routes if r["family"] == fam and r["dst_len"] == 0 and not r["cloned"]
                 and r["table"] == RT_TABLE_MAIN and r["type"] == RTN_UNICAST and r["oif"]]
        if cands:
            return min(cands, key=lambda r: r["priority"])["oif"]
    return None


def _far_end(l: dict, own: int, peers: dict) -> tuple[Link, str | None]:
    """The other end of own veth ``l``, read by nsid, and a path to its netns when one is known.
    Its netns key is the inode when a file of that netns matched the nsid, else -1 - nsid."""
    rec, nsid = peers["links"][l["index"]], l["link_netnsid"]
    ino, path = peers["names"].get(nsid, (-1 - nsid, None))
    return Link(netns=ino, ifindex=rec["index"], name=rec["name"], kind=rec["kind"], mtu=rec["mtu"],
                up=rec["up"], master=None, lower=None, peer=(own, l["index"]), underlay_family=None), path


def _assemble(reads: dict[int, dict], own: int, paths: dict[int, str], skipped: int,
              peers: dict | None = None) -> Snapshot:
    links: list[Link] = []
    routes: list[dict] = []
    pmtu: list[dict] = []
    tick = os.sysconf("SC_CLK_TCK") or 100
    peers = peers or {"links": {}, "names": {}, "stats": {}}
    paths, netns_ids = dict(paths), {}
    for ino, rd in reads.items():
        names = {l["index"]: l["name"] for l in rd["links"]}
        nsids = rd["nsids"]

        def other_ns(l, ino=ino, nsids=nsids):
            nsid = l["link_netnsid"]
            return ino if nsid is None else nsids.get(nsid)

        for l in rd["links"]:
            peer = lower = via = far = None
            target = other_ns(l)
            if l["kind"] == "veth" and l["link"] and target is not None:
                peer = (target, int(l["link"]))
            elif ino == own and l["index"] in peers["links"]:  # the other end, read by nsid
                far, path = _far_end(l, own, peers)
                peer = (far.netns, far.ifindex)
                if far.netns in reads:  # that netns was read whole: its links are there
                    far = None
                else:
                    netns_ids[far.netns] = l["link_netnsid"]
                    if path:
                        paths[far.netns] = path
            if l["lower"] and target is not None:
                lower, via = (target, int(l["lower"])), "link"
            elif l["kind"] in OVERHEAD and target is not None:
                dev = _default_dev(reads[target]["routes"] if target in reads else [], l["family"])
                if dev is not None:
                    lower, via = (target, int(dev)), "default-route"
            links.append(Link(netns=ino, ifindex=l["index"], name=l["name"], kind=l["kind"], mtu=l["mtu"],
                              up=l["up"], master=l["master"], lower=lower, peer=peer,
                              underlay_family=None if l["family"] is None else int(l["family"]),
                              lower_via=via))
            if far is not None:
                links.append(far)
        for r in rd["routes"]:
            if r["mtu"] is None:
                continue
            dev = names.get(r["oif"]) if r["oif"] else None
            if r["cloned"]:
                exp = r["expires"]
                pmtu.append({"netns": ino, "dst": _dst_text(r, plain_host=True), "dev": dev,
                             "mtu": int(r["mtu"]), "expires": None if exp is None else round(exp / tick)})
            else:
                routes.append({"netns": ino, "dst": _dst_text(r), "dev": dev, "mtu": int(r["mtu"])})
    return Snapshot(links=links, routes=routes, pmtu=pmtu, netns_skipped=skipped, own_netns=own,
                    netns_paths=paths, netns_ids=netns_ids, peers=dict(peers["stats"]))


def _peers_by_nsid(own_rd: dict, reads: dict[int, dict], own: int, limit: int = 4096) -> dict:
    """Runs in the daemon's netns: the other end of each of its veths whose netns was not read
    (RTM_GETLINK with IFLA_TARGET_NETNSID), and names for those netns. Returns {"links":
    {own veth ifindex: peer record}, "names": {nsid: (inode, path)}, "stats": {...}}."""
    todo = [l for l in own_rd["links"] if l["kind"] == "veth" and l["link"] and l["link_netnsid"] is not None
            and own_rd["nsids"].get(l["link_netnsid"]) not in reads]
    stats = {"wanted": len(todo), "read": 0, "refused": 0, "unnamed": 0, "error": ""}
    out: dict[str, Any] = {"links": {}, "names": {}, "stats": stats}
    if not todo:
        return out
    try:
        reader = linkpeer.PeerReader()
    except OSError as exc:
        stats.update(refused=len(todo), error=linkpeer.describe(exc))
        return out
    with reader:
        for l in todo:
            nsid = l["link_netnsid"]
            try:
                rec = reader.get_link(int(l["link"]), nsid)
            except OSError as exc:
                stats["refused"] += 1
                stats["error"] = linkpeer.describe(exc)
                continue
            if rec["kind"] != "veth" or rec["link"] != l["index"]:
                stats["refused"] += 1
                stats["error"] = f"ifindex {l['link']} of nsid {nsid} is not the peer of {l['name']}"
                continue
            out["links"][l["index"]] = rec
            stats["read"] += 1
        wanted = {l["link_netnsid"] for l in todo if l["index"] in out["links"]}
        if wanted:
            out["names"] = linkpeer.name_nsids(reader, wanted, own, limit)
        stats["unnamed"] = len(wanted - set(out["names"]))
    return out


def peer_read_mode(snap: Snapshot | None, all_netns: bool) -> str:
    """How the far ends of the daemon's veths were read, for /probes: "netnsid" (RTM_GETLINK
    by nsid from the daemon's netns), "all_netns" (each netns entered), or "unavailable: why"
    when the kernel refused every read (their peers are then not compared)."""
    peers = snap.peers if snap is not None else {}
    if peers.get("wanted") and not peers.get("read"):
        return (f"unavailable: {peers.get('error') or 'refused'}; the far ends of "
                f"{peers['wanted']} veth(s) are not compared")
    return "all_netns" if all_netns and not peers.get("read") else "netnsid"


def peers_changed(snap: Snapshot) -> bool:
    """Runs in the daemon's netns: whether any veth end read by nsid in ``snap`` now has another
    name or MTU, or is gone (one RTM_GETLINK each; a pod's own MTU change is announced only in
    the pod's netns, so no link event tells the daemon's)."""
    ends = [l for l in snap.links if l.netns in snap.netns_ids]
    if not ends:
        return False
    with linkpeer.PeerReader() as reader:
        for l in ends:
            try:
                rec = reader.get_link(l.ifindex, snap.netns_ids[l.netns])
            except OSError:
                return True
            if (rec["name"], rec["mtu"]) != (l.name, l.mtu):
                return True
    return False


def collect(all_netns: bool, max_netns: int = MAX_NETNS_DEFAULT,
            workers: dict | None = None) -> Snapshot:
    """Read links and routes of the calling thread's netns, and with ``all_netns`` also of every
    netns under /run/netns and /proc/*/ns/net (at most ``max_netns`` in all; the rest counted in
    netns_skipped, as are namespaces that vanish or cannot be read).

    ``workers``: optional {netns inode: daemon.netns.NetnsWorker} kept by the caller between
    calls; missing ones are added, those of namespaces no longer found are closed and removed.
    The caller closes the rest when done. Without it, workers live for this call only. A
    worker's thread holds its netns alive: a deleted netns lingers until the next collect()
    closes its worker."""
    own = netns_mod.own_inode()
    if own is None:
        raise OSError("cannot read /proc/thread-self/ns/net")
    paths: dict[int, str] = {}
    order = [own]
    skipped = 0
    if all_netns:
        found, skipped = netns_mod.enumerate_netns(max_netns)
        for ino, path in found.items():
            if path.startswith("/proc/self/"):  # the main thread's netns: name it by pid
                path = f"/proc/{os.getpid()}/" + path[len("/proc/self/"):]
            if ino == own:
                paths[ino] = path
                continue
            if len(order) >= max_netns:
                skipped += 1
                continue
            order.append(ino)
            paths[ino] = path

    own_workers = workers is None
    pool: dict = {} if workers is None else workers
    fds: dict[int, int] = {}
    reads: dict[int, dict] = {}
    try:
        # Every netns fd is opened here, in the caller's thread, once: the workers use them for
        # RTM_GETNSID (fds are process-wide).
        for ino in order:
            path = "/proc/thread-self/ns/net" if ino == own else paths[ino]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            if os.fstat(fd).st_ino != ino:  # the pid moved or died and was reused
                os.close(fd)
                continue
            fds[ino] = fd
        for ino in order:
            if ino not in fds:
                skipped += 1
                continue
            try:
                w = pool.get(ino)
                if w is None:
                    w = netns_mod.NetnsWorker(f"/proc/self/fd/{fds[ino]}", name=f"dpwatch-mtu-{ino}")
                    pool[ino] = w
                rd = w.call(_read_here)
            except Exception as exc:
                log.debug("mtu: netns %s: %s", ino, exc)
                skipped += 1
                continue
            if rd["inode"] != ino:
                skipped += 1
                continue
            reads[ino] = rd
        # Second pass, only where links point into other namespaces: map their nsids to inodes.
        for ino, rd in reads.items():
            wanted = {l["link_netnsid"] for l in rd["links"] if l["link_netnsid"] is not None}
            cands = _candidates(ino, reads, fds) if wanted else []
            if not cands:
                continue
            try:
                rd["nsids"] = pool[ino].call(lambda: _nsids_here(wanted, cands))
            except Exception as exc:
                log.debug("mtu: nsids of netns %s: %s", ino, exc)
    finally:
        for fd in fds.values():
            os.close(fd)
        for ino in [i for i in pool if own_workers or i not in reads and i not in order]:
            pool.pop(ino).close()
    peers = _peers_by_nsid(reads[own], reads, own) if own in reads else None
    return _assemble(reads, own, paths, skipped, peers)
