"""Encapsulation overheads of the tunnel kinds dpwatch knows (the mtu, frag and node probes').

Overheads (outer headers; the outer Ethernet header is not counted against the MTU):
VXLAN 50 over IPv4 / 70 over IPv6 (IP + UDP 8 + VXLAN 8 + inner Ethernet 14); Geneve the
same without options (options cannot be read from rtnetlink and are not counted); IPIP 20;
sit 20; GRE 24 (IPv4 + 4-byte GRE header, without key/csum/seq options), gretap 38, ip6gre
44, ip6gretap 58; ip6tnl 40; WireGuard 60 over IPv4 / 80 over IPv6. When the underlay family
cannot be read (VXLAN/Geneve in external/metadata mode, WireGuard, whose peers are only
visible over generic netlink) IPv4 is assumed, as Calico's docs do for WireGuard (60).
"""

from __future__ import annotations

import socket

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6

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


def overhead(kind: str, family: int | None = None) -> int | None:
    """Bytes a tunnel of ``kind`` adds in front of each packet over an underlay of ``family``
    (AF_INET/AF_INET6; None: fixed by the kind, else IPv4 assumed), or None for a kind that
    is not a tunnel we know."""
    pair = OVERHEAD.get(kind)
    if pair is None:
        return None
    v4, v6 = pair
    family = family or KIND_FAMILY.get(kind)
    if family == AF_INET6 and v6 is not None:
        return v6
    return v4 if v4 is not None else v6
