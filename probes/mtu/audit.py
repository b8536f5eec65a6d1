"""MTU audit, the judging side: find MTU settings on this node that silently drop packets.

``audit()`` is pure: it turns a Snapshot (probes/mtu/snapshot.py reads one) into Issues with
exact remediation commands.

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

Encapsulation overheads: probes/encap.py.
"""

from __future__ import annotations

import shlex
from typing import Any

from dpwatch.daemon.host import paths
from dpwatch.probes import encap
from dpwatch.probes.mtu.model import Issue, Link, Snapshot
from dpwatch.probes.mtu.remediation import cni_remediation

# Overlay devices that carry pod traffic between nodes (the pod_above_overlay rule).
POD_OVERLAY_KINDS = frozenset({"vxlan", "geneve", "ipip", "wireguard"})


def overlay_overhead(link: Link) -> int | None:
    """Bytes a tunnel adds in front of each packet, or None when ``link`` is not a tunnel kind
    we know. Unknown underlay family: IPv4 is assumed (the smaller overhead)."""
    return encap.overhead(link.kind, link.underlay_family)


def _pid_of(path: str) -> str | None:
    """The pid of a /proc/PID/ns/net path, None for any other path."""
    root = paths.proc("")
    if path.startswith(root) and path.endswith("/ns/net"):
        return path[len(root):].split("/")[0]
    return None


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
        if _pid_of(path) is not None:
            return f"the netns of pid {_pid_of(path)}" + (f" (inode {ino}{tag})" if tag else "")
        return f"netns {ino}"

    def prefix(self, ino: int) -> str:
        if ino == self.own:
            return ""
        path = self.snap.netns_paths.get(ino, "")
        if path.startswith("/run/netns/"):
            return f"ip netns exec {shlex.quote(path[len('/run/netns/'):])} "
        if path.startswith(paths.proc("")):
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
    fam = link.underlay_family or encap.KIND_FAMILY.get(link.kind)
    if fam == encap.AF_INET6:
        return "over IPv6"
    if fam == encap.AF_INET:
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
