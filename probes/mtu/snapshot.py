"""The MTU audit's reading side: every netns's records (probes/mtu/netlink.py) assembled into
one Snapshot.

``collect()`` reads the interfaces and routes of the daemon's own netns (and, with
``all_netns``, of every netns under /run/netns and /proc/*/ns/net, bounded) through
rtnetlink, never by parsing ``ip`` output. Per netns it makes one link dump and one route
dump, plus RTM_GETNSID requests only when a link there points into another netns. The other
end of each veth of the daemon's netns whose netns was not read that way is read by nsid
from the daemon's netns (probes/mtu/peers.py).
"""

from __future__ import annotations

import logging
import os

from dpwatch.daemon.host import netns as netns_mod
from dpwatch.daemon.host import paths
from dpwatch.probes.encap import AF_INET, AF_INET6, OVERHEAD
from dpwatch.probes.mtu.model import Link, Snapshot
from dpwatch.probes.mtu.netlink import nsids_here, read_here
from dpwatch.probes.mtu.peers import peers_by_nsid

log = logging.getLogger("dpwatch.mtuaudit")

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
MAX_NETNS_DEFAULT = 64


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


def _lower(l: dict, target: int | None, reads: dict[int, dict]) -> tuple[tuple[int, int] | None, str | None]:
    """(netns, ifindex) of the device link record ``l`` sends through, and how it is known:
    its configured 'link' device, else for a tunnel its netns' default route's device."""
    if target is None:
        return None, None
    if l["lower"]:
        return (target, int(l["lower"])), "link"
    if l["kind"] in OVERHEAD:
        dev = _default_dev(reads[target]["routes"] if target in reads else [], l["family"])
        if dev is not None:
            return (target, int(dev)), "default-route"
    return None, None


def _links_of(ino: int, rd: dict, reads: dict[int, dict], own: int, peers: dict,
              ns_paths: dict[int, str], netns_ids: dict[int, int]) -> list[Link]:
    """The Links of one netns's records, each followed by its far end when that was read by
    nsid from the daemon's netns (and its netns not read whole); ``ns_paths`` and ``netns_ids``
    get the far ends' namespaces."""
    out: list[Link] = []
    for l in rd["links"]:
        peer = far = None
        nsid = l["link_netnsid"]
        target = ino if nsid is None else rd["nsids"].get(nsid)
        if l["kind"] == "veth" and l["link"] and target is not None:
            peer = (target, int(l["link"]))
        elif ino == own and l["index"] in peers["links"]:  # the other end, read by nsid
            far, path = _far_end(l, own, peers)
            peer = (far.netns, far.ifindex)
            if far.netns in reads:  # that netns was read whole: its links are there
                far = None
            else:
                netns_ids[far.netns] = nsid
                if path:
                    ns_paths[far.netns] = path
        lower, via = _lower(l, target, reads)
        out.append(Link(netns=ino, ifindex=l["index"], name=l["name"], kind=l["kind"], mtu=l["mtu"],
                        up=l["up"], master=l["master"], lower=lower, peer=peer,
                        underlay_family=None if l["family"] is None else int(l["family"]),
                        lower_via=via))
        if far is not None:
            out.append(far)
    return out


def _routes_of(ino: int, rd: dict, tick: int, routes: list[dict], pmtu: list[dict]) -> None:
    """One netns's routes with an explicit MTU into ``routes``, its PMTU exceptions into ``pmtu``."""
    names = {l["index"]: l["name"] for l in rd["links"]}
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


def _assemble(reads: dict[int, dict], own: int, ns_paths: dict[int, str], skipped: int,
              peers: dict | None = None) -> Snapshot:
    links: list[Link] = []
    routes: list[dict] = []
    pmtu: list[dict] = []
    tick = os.sysconf("SC_CLK_TCK") or 100
    peers = peers or {"links": {}, "names": {}, "stats": {}}
    ns_paths, netns_ids = dict(ns_paths), {}
    for ino, rd in reads.items():
        links += _links_of(ino, rd, reads, own, peers, ns_paths, netns_ids)
        _routes_of(ino, rd, tick, routes, pmtu)
    return Snapshot(links=links, routes=routes, pmtu=pmtu, netns_skipped=skipped, own_netns=own,
                    netns_paths=ns_paths, netns_ids=netns_ids, peers=dict(peers["stats"]))


def _netns_order(all_netns: bool, max_netns: int, own: int) -> tuple[list[int], dict[int, str], int]:
    """The namespaces to read, the daemon's first ([own] without ``all_netns``), a path to each,
    and how many were left out (over ``max_netns``, or not enumerable)."""
    order, names, skipped = [own], {}, 0
    if not all_netns:
        return order, names, skipped
    found, skipped = netns_mod.enumerate_netns(max_netns)
    self_prefix = paths.proc("self") + "/"
    for ino, path in found.items():
        if path.startswith(self_prefix):  # the main thread's netns: name it by pid
            path = paths.proc(str(os.getpid())) + "/" + path[len(self_prefix):]
        if ino == own:
            names[ino] = path
            continue
        if len(order) >= max_netns:
            skipped += 1
            continue
        order.append(ino)
        names[ino] = path
    return order, names, skipped


def _open_netns(order: list[int], own: int, names: dict[int, str], fds: dict[int, int]) -> None:
    """Open every netns of ``order`` once, in the caller's thread, into ``fds`` (inode -> fd):
    the workers use them for RTM_GETNSID (fds are process-wide). One that moved (its pid
    died and was reused) or cannot be opened is left out."""
    for ino in order:
        path = paths.proc("thread-self", "ns", "net") if ino == own else names[ino]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        if os.fstat(fd).st_ino != ino:  # the pid moved or died and was reused
            os.close(fd)
            continue
        fds[ino] = fd


def _read_all(order: list[int], fds: dict[int, int], pool: dict, reads: dict[int, dict]) -> int:
    """Each opened netns's records into ``reads``, read by its worker in ``pool`` (added when
    missing); returns how many could not be read."""
    failed = 0
    for ino in order:
        if ino not in fds:
            failed += 1
            continue
        try:
            w = pool.get(ino)
            if w is None:
                w = netns_mod.NetnsWorker(paths.proc("self", "fd", str(fds[ino])), name=f"dpwatch-mtu-{ino}")
                pool[ino] = w
            rd = w.call(read_here)
        except Exception as exc:
            log.debug("mtu: netns %s: %s", ino, exc)
            failed += 1
            continue
        if rd["inode"] != ino:
            failed += 1
            continue
        reads[ino] = rd
    return failed


def _name_nsids(reads: dict[int, dict], fds: dict[int, int], pool: dict) -> None:
    """Second pass, only where links point into other namespaces: map their nsids to inodes."""
    for ino, rd in reads.items():
        wanted = {l["link_netnsid"] for l in rd["links"] if l["link_netnsid"] is not None}
        cands = _candidates(ino, reads, fds) if wanted else []
        if not cands:
            continue
        try:
            rd["nsids"] = pool[ino].call(lambda: nsids_here(wanted, cands))
        except Exception as exc:
            log.debug("mtu: nsids of netns %s: %s", ino, exc)


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
        raise OSError(f"cannot read {paths.proc('thread-self', 'ns', 'net')}")
    order, names, skipped = _netns_order(all_netns, max_netns, own)
    own_workers = workers is None
    pool: dict = {} if workers is None else workers
    fds: dict[int, int] = {}
    reads: dict[int, dict] = {}
    try:
        _open_netns(order, own, names, fds)
        skipped += _read_all(order, fds, pool, reads)
        _name_nsids(reads, fds, pool)
    finally:
        for fd in fds.values():
            os.close(fd)
        for ino in [i for i in pool if own_workers or i not in reads and i not in order]:
            pool.pop(ino).close()
    peers = peers_by_nsid(reads[own], reads, own) if own in reads else None
    return _assemble(reads, own, names, skipped, peers)
