"""What the MTU audit works on: the links and routes it read (Snapshot) and what it found (Issue).

The reading side (probes/mtu/snapshot.py) builds a Snapshot; the judging side
(probes/mtu/audit.py) turns it into Issues; the probe keeps both.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
