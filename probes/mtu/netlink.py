"""The MTU audit's rtnetlink reads inside one netns (pyroute2): one link dump, one route dump
(which also carries the cached PMTU exceptions), and RTM_GETNSID to name the namespaces its
links point into. Each message becomes a plain record dict; probes/mtu/snapshot.py joins the
records of every netns into a Snapshot.

The functions ending in ``_here`` run inside the netns they read (on a NetnsWorker thread):
pyroute2's sync API works on the calling thread's netns.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dpwatch.daemon.host import paths
from dpwatch.probes.encap import AF_INET, AF_INET6, KIND_FAMILY

log = logging.getLogger("dpwatch.mtuaudit")

IFF_UP = 0x1
ARPHRD_LOOPBACK = 772
RTM_F_CLONED = 0x200
# IFLA_INFO_DATA attribute holding the tunnel's 'link' (lower) device, per kind.
_DATA_LINK = {"vxlan": "IFLA_VXLAN_LINK", "gre": "IFLA_GRE_LINK", "gretap": "IFLA_GRE_LINK",
              "ip6gre": "IFLA_GRE_LINK", "ip6gretap": "IFLA_GRE_LINK",
              "ipip": "IFLA_IPTUN_LINK", "sit": "IFLA_IPTUN_LINK", "ip6tnl": "IFLA_IPTUN_LINK"}


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


def read_here() -> dict:
    """Runs inside one netns: its inode, links and routes (one link dump, one route dump)."""
    from pyroute2 import IPRoute

    here = os.stat(paths.proc("thread-self", "ns", "net")).st_ino
    ipr = IPRoute()
    try:
        links = [_link_record(m) for m in ipr.get_links()]
        # Family 255 returns both IPv4 and IPv6; a dump without RTM_F_CLONED in non-strict mode
        # also carries the PMTU exceptions (flagged RTM_F_CLONED), so one dump gives both.
        routes = [r for r in (_route_record(m) for m in ipr.route("dump", family=255)) if r]
    finally:
        ipr.close()
    return {"inode": here, "links": links, "routes": routes, "nsids": {}}


def nsids_here(wanted: set[int], candidates: list[tuple[int, int]]) -> dict[int, int]:
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
