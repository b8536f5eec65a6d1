"""The far ends of the daemon's veths, read by nsid from the daemon's own netns.

A veth whose other end lives in a netns the audit did not enter (no --mtu-all-netns, or no
setns without CAP_SYS_ADMIN) is read with RTM_GETLINK and IFLA_TARGET_NETNSID
(daemon/host/linkpeer.py: CAP_NET_ADMIN, kernel 4.20+, no setns). Its netns is named by
matching the nsid against the files under /run/netns and /proc/*/ns/net that can be opened;
one that matches none is known by its nsid only. Where the kernel refuses, that veth's peer
stays unseen and Snapshot.peers says why.
"""

from __future__ import annotations

from typing import Any

from dpwatch.daemon.host import linkpeer
from dpwatch.probes.mtu.model import Snapshot


def peers_by_nsid(own_rd: dict, reads: dict[int, dict], own: int, limit: int = 4096) -> dict:
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
