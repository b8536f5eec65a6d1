"""nf_tables rules counted by the kernel over nfnetlink: an NFT_MSG_GETRULE dump, and the
ruleset's generation id (the early re-audit's cheap check). Call from a thread in the netns
to read: the netlink socket is made there."""

from __future__ import annotations

import socket
import struct

from dpwatch.probes.node import netlink as nl

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7  # a GETRULE dump answers with NEWRULE messages
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_GEN_ID = 1
NFPROTO = {0: "unspec", 1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
_NFGENMSG = struct.pack("=BBH", 0, 0, 0)  # struct nfgenmsg: every family, version 0, res_id 0


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def parse_nft_rule_messages(data: bytes, counts: dict[tuple[str, str, str], int]) -> tuple[bool, bool]:
    """Netlink messages of an NFT_MSG_GETRULE dump -> counts[(family, table, chain)] += 1.
    Returns (done, interrupted). Raises OSError on an NLMSG_ERROR."""
    done = intr = False
    for off, length, mtype, flags in nl.messages(data):
        if flags & nl.NLM_F_DUMP_INTR:
            intr = True
        if mtype == nl.NLMSG_DONE:
            done = True
        elif mtype == nl.NLMSG_ERROR:
            nl.check_error(data, off)
        elif mtype == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE and length >= 20:
            table = chain = ""
            for atype, value in nl.attrs(data, off + 20, off + length):
                if atype == NFTA_RULE_TABLE:
                    table = _text(value)
                elif atype == NFTA_RULE_CHAIN:
                    chain = _text(value)
            key = (NFPROTO.get(data[off + 16], str(data[off + 16])), table, chain)
            counts[key] = counts.get(key, 0) + 1
    return done, intr


def _socket(timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.settimeout(timeout)
        s.bind((0, 0))
    except OSError:
        s.close()
        raise
    return s


def nft_rule_counts() -> dict[tuple[str, str, str], int]:
    """Every nf_tables rule of this netns, all families, counted per (family, table, chain)."""
    for _attempt in range(3):
        s = _socket(5)
        try:
            s.send(nl.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
                              nl.NLM_F_REQUEST | nl.NLM_F_DUMP, _NFGENMSG))
            counts: dict[tuple[str, str, str], int] = {}
            interrupted = False
            while True:
                done, intr = parse_nft_rule_messages(s.recv(1 << 18), counts)
                interrupted |= intr
                if done:
                    break
            if not interrupted:  # the ruleset changed during the dump: count again
                return counts
        finally:
            s.close()
    return counts


def nft_generation() -> int | None:
    """The nf_tables generation id of this netns (it changes with every ruleset commit): one
    small netlink request, cheap enough for every sampler pass. None when there is no
    nf_tables here."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.settimeout(2)
        s.bind((0, 0))
        s.send(nl.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, nl.NLM_F_REQUEST, _NFGENMSG))
        data = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    return parse_nft_generation(data)


def parse_nft_generation(data: bytes) -> int | None:
    try:
        for off, length, mtype, _flags in nl.messages(data):
            if mtype != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
                continue
            for atype, value in nl.attrs(data, off + 20, off + length):
                if atype == NFTA_GEN_ID and len(value) >= 4:
                    return struct.unpack_from(">I", value)[0]
    except ValueError:  # truncated
        return None
    return None
