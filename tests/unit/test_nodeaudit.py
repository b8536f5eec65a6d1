"""Unit tests of the node audit's readers (probes/node/audit.py and the modules it calls:
sockets.py, iptlegacy.py, nftables.py, sysctls.py, counters.py). Inputs are built by hand in
the kernel's formats (/proc/net/tcp lines, an iptables-legacy entry blob, nfnetlink messages)
or laid out as a fixture /proc and /sys tree read through dpwatch.daemon.host.paths; the real
kernel is exercised in tests/kernel/test_nodeaudit_kernel.py. The findings are tested in
tests/unit/test_node_findings.py."""

from __future__ import annotations

import os
import struct

import pytest

from dpwatch.daemon.host import paths
from dpwatch.probes.node import audit, counters, iptlegacy, nftables, sockets, sysctls
from dpwatch.probes.node.facts import Facts

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
   2: 0100007F:9C42 0100007F:1F90 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
   3: 0100007F:9C43 0200007F:0050 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000
   4: 0100007F:0050 0200007F:9C44 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000
   5: garbage
"""

def test_parse_proc_tcp_states_ports_and_busiest_destination():
    states, ports, dests = {}, set(), {}
    sockets.parse_proc_tcp(TCP, (40000, 40003), states, ports, dests)
    assert states == {"LISTEN": 1, "TIME_WAIT": 2, "ESTABLISHED": 2}
    assert ports == {0x9C41, 0x9C42, 0x9C43}  # 40001..40003; the listener and port 80 are not ephemeral
    assert dests == {"0100007F:1F90": 2, "0200007F:0050": 1}
    assert sockets.hexaddr_text("0100007F:1F90") == "127.0.0.1:8080"
    v6 = "00000000000000000000000001000000:0035"  # ::1 in /proc's word order
    assert sockets.hexaddr_text(v6) == "[::1]:53"


def _entry(target: str, payload: bytes = b"", errname: str = "", v6: bool = False) -> bytes:
    at = 140 if v6 else 88
    head = 168 if v6 else 112
    if target == "ERROR":
        data = errname.encode().ljust(32, b"\0")
    else:
        data = payload or struct.pack("=i", -1) + b"\0" * 4
    tsize = 32 + len(data)
    t = struct.pack("=H", tsize) + target.encode().ljust(29, b"\0") + b"\0" + data
    blob = bytearray(head)
    struct.pack_into("=HH", blob, at, head, head + len(t))
    return bytes(blob) + t


@pytest.mark.parametrize("v6", [False, True])
def test_parse_legacy_entries_counts_rules_per_chain(v6):
    # INPUT: 2 rules + policy; FORWARD: policy only; OUTPUT: 1 rule + policy;
    # KUBE-SVC-X: header, 3 rules, RETURN; final ERROR.
    seq = [("", "INPUT"), ("", "INPUT"), ("", "INPUT-policy"), ("", "FORWARD-policy"),
           ("", "OUTPUT"), ("", "OUTPUT-policy"),
           ("ERROR", "KUBE-SVC-X"), ("", "r"), ("", "r"), ("", "r"), ("", "return"),
           ("ERROR", "ERROR")]
    blob, offsets = b"", []
    for target, name in seq:
        offsets.append(len(blob))
        blob += _entry("ERROR" if target == "ERROR" else "", errname=name if target == "ERROR" else "", v6=v6)
    hook = [0, offsets[0], offsets[3], offsets[4], 0]
    under = [0, offsets[2], offsets[3], offsets[5], 0]
    valid = (1 << 1) | (1 << 2) | (1 << 3)
    rules = iptlegacy.parse_legacy_entries(blob, tuple(hook), tuple(under), valid, 140 if v6 else 88)
    assert rules == {"INPUT": 2, "FORWARD": 0, "OUTPUT": 1, "KUBE-SVC-X": 3}


def test_parse_legacy_entries_rejects_a_bad_blob():
    blob = bytearray(_entry(""))
    struct.pack_into("=HH", blob, 88, 112, 0)  # next_offset 0 would loop forever
    with pytest.raises(ValueError, match="bad entry"):
        iptlegacy.parse_legacy_entries(bytes(blob), (0,) * 5, (0,) * 5, 0, 88)


def _nlmsg(mtype: int, payload: bytes, flags: int = 2) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, 1, 0) + payload


def _attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * ((4 - len(raw) % 4) % 4)


def test_parse_nft_rule_messages():
    rule = (10 << 8) | 6
    msgs = b"".join(_nlmsg(rule, struct.pack("=BBH", fam, 0, 0) + _attr(1, t + b"\0") + _attr(2, c + b"\0"))
                    for fam, t, c in ((2, b"kube-proxy", b"KUBE-SVC-A"), (2, b"kube-proxy", b"KUBE-SVC-A"),
                                      (1, b"filter", b"input")))
    counts: dict = {}
    assert nftables.parse_nft_rule_messages(msgs, counts) == (False, False)
    assert counts == {("ip", "kube-proxy", "KUBE-SVC-A"): 2, ("inet", "filter", "input"): 1}
    assert nftables.parse_nft_rule_messages(_nlmsg(3, b"\0" * 4, flags=0x12), counts) == (True, True)
    with pytest.raises(OSError):
        nftables.parse_nft_rule_messages(_nlmsg(2, struct.pack("=i", -1) + b"\0" * 16), counts)
    with pytest.raises(ValueError, match="truncated"):
        nftables.parse_nft_rule_messages(msgs[:30], {})


def test_proc_parsers():
    assert counters.parse_softnet_dropped("00000010 00000002 00\n00000020 0000000a 00\n") == 12
    stat = "entries clashres found new invalid ignore delete delete_list insert insert_failed drop early_drop\n" \
           "00000001 0 0 0 0 0 0 0 0 0 00000003 0\n00000001 0 0 0 0 0 0 0 0 0 00000004 0\n"
    assert counters.parse_ct_drops(stat) == 7


# -- the early re-audit's cheap signature --------------------------------------------------------

def test_nft_generation_parsed_from_newgen():
    attr = struct.pack("=HH", 8, 1) + struct.pack(">I", 4242)           # NFTA_GEN_ID
    body = struct.pack("=BBH", 0, 0, 0) + attr
    msg = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, 1, 0) + body
    assert nftables.parse_nft_generation(msg) == 4242
    assert nftables.parse_nft_generation(msg[:18]) is None                # truncated
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + b"\0" * 16
    assert nftables.parse_nft_generation(err) is None                     # no nf_tables


def test_tcp_socket_count_from_sockstat():
    v4 = ("sockets: used 120\nTCP: inuse 40 orphan 0 tw 25 alloc 50 mem 3\nUDP: inuse 5 mem 1\n")
    v6 = "TCP6: inuse 7\nUDP6: inuse 2\n"
    assert sockets.tcp_socket_count(v4, v6) == 40 + 25 + 7
    assert sockets.tcp_socket_count("", "") == 0


@pytest.mark.parametrize("before,now,why", [
    (None, {"tcp_sockets": 5}, None),                                      # no audit yet
    ({"nft_generation": 3, "tcp_sockets": 10}, {"nft_generation": 3, "tcp_sockets": 70}, None),
    ({"nft_generation": 3, "tcp_sockets": 10}, {"nft_generation": 3, "tcp_sockets": 74}, "tcp_sockets"),
    ({"nft_generation": 3, "tcp_sockets": 1000}, {"nft_generation": 3, "tcp_sockets": 1200}, None),
    ({"nft_generation": 3, "tcp_sockets": 1000}, {"nft_generation": 3, "tcp_sockets": 750}, "tcp_sockets"),
    ({"nft_generation": 3, "tcp_sockets": 10}, {"nft_generation": 4, "tcp_sockets": 10}, "nft_generation"),
    ({"legacy_ipv4": (("filter", 6),), "tcp_sockets": 0},
     {"legacy_ipv4": (("filter", 9000),), "tcp_sockets": 0}, "legacy_ipv4"),
])
def test_audit_due(before, now, why):
    assert audit.audit_due(before, now) == why


# -- fixture trees: the readers go through paths.proc() / paths.sys() --------------------------

def test_gather_tcp_and_sockstat_from_a_fixture_proc(tmp_path):
    net = tmp_path / "thread-self" / "net"
    net.mkdir(parents=True)
    (net / "tcp").write_text(TCP)
    (net / "sockstat").write_text("sockets: used 9\nTCP: inuse 4 orphan 0 tw 2 alloc 5 mem 1\n")
    f = Facts(sysctls={"net.ipv4.ip_local_port_range": "40000 40003"})
    with paths.roots(proc_root=str(tmp_path)):
        sockets.gather_tcp(f)
        assert sockets.read_tcp_socket_count() == 6   # no sockstat6: counts nothing
    assert f.tcp_states == {"ESTABLISHED": 2, "LISTEN": 1, "TIME_WAIT": 2}
    assert f.ephemeral_ports_in_use == 3 and "tcp" not in f.errors  # no tcp6: not an error
    assert f.busiest_destination == {"destination": "127.0.0.1:8080", "sockets": 2}
    with paths.roots(proc_root=str(tmp_path / "missing")):
        g = Facts()
        sockets.gather_tcp(g)
    assert "tcp" in g.errors and g.tcp_states == {}


def test_meminfo_inotify_and_link_speed_from_fixture_trees(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "42" / "fd").mkdir(parents=True)
    (proc / "42" / "fdinfo").mkdir()
    (proc / "meminfo").write_text("MemTotal:        2048 kB\nMemFree: 1 kB\n")
    os.symlink("anon_inode:inotify", proc / "42" / "fd" / "3")
    os.symlink("/dev/null", proc / "42" / "fd" / "4")
    (proc / "42" / "fdinfo" / "3").write_text("pos: 0\ninotify wd:1 ino:2\ninotify wd:2 ino:3\n")
    for name, speed, device in (("eth0", "10000", True), ("veth0", "10", False), ("eth1", "-1", True)):
        (sys_ / "class" / "net" / name).mkdir(parents=True)
        (sys_ / "class" / "net" / name / "speed").write_text(speed + "\n")
        if device:
            (sys_ / "class" / "net" / name / "device").mkdir()
    f = Facts()
    with paths.roots(proc_root=str(proc), sys_root=str(sys_)):
        assert sysctls.meminfo_bytes() == 2048 * 1024
        audit.gather_inotify(f)
        assert audit.fastest_link_mbps() == 10000  # veth0 is virtual, eth1 reports no speed
    assert f.inotify["instances_in_use"] == 1 and f.inotify["watches_in_use"] == 2
    assert f.inotify["instances_busiest_uid"] == os.getuid() and f.inotify["fds_scanned"] == 2
