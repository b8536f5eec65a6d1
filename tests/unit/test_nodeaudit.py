"""Unit tests of the node audit's parsers and checks (probes/node/audit.py) and the node
probe's window logic. Inputs are built by hand in the kernel's formats (/proc/net/tcp lines,
an iptables-legacy entry blob, nfnetlink messages); the real kernel is exercised in
tests/kernel/test_nodeaudit_kernel.py."""

from __future__ import annotations

import struct

import pytest

from dpwatch.probes.node import listeners as ls
from dpwatch.probes.node import audit as na
from dpwatch.daemon.config import Config
from dpwatch.probes.base import Window
from dpwatch.probes.node.probe import NodeProbe, parse_ct_drops, parse_softnet_dropped

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
   2: 0100007F:9C42 0100007F:1F90 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
   3: 0100007F:9C43 0200007F:0050 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000
   4: 0100007F:0050 0200007F:9C44 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000
   5: garbage
"""


def facts(**sysctls) -> na.Facts:
    base = {"net.ipv4.ip_local_port_range": "32768\t60999", "net.core.somaxconn": "4096",
            "net.ipv4.tcp_tw_reuse": "2", "net.core.netdev_max_backlog": "1000",
            "net.core.rmem_max": str(16 << 20), "net.core.wmem_max": str(16 << 20),
            "net.ipv4.tcp_congestion_control": "bbr", "net.core.default_qdisc": "fq",
            "net.ipv4.tcp_available_congestion_control": "reno cubic bbr",
            "fs.inotify.max_user_watches": "524288", "fs.inotify.max_user_instances": "8192",
            "net.netfilter.nf_conntrack_max": "262144", "net.netfilter.nf_conntrack_count": "10"}
    base.update({k.replace("__", "."): v for k, v in sysctls.items()})
    return na.Facts(cpus=4, mem_bytes=8 << 30, sysctls=base, bbr="available",
                    netfilter={"total_rules": 0}, inotify={"instances_in_use": 3, "watches_in_use": 40})


def ids(results) -> dict[str, na.Result]:
    return {r.id: r for r in results}


def test_parse_proc_tcp_states_ports_and_busiest_destination():
    states, ports, dests = {}, set(), {}
    na.parse_proc_tcp(TCP, (40000, 40003), states, ports, dests)
    assert states == {"LISTEN": 1, "TIME_WAIT": 2, "ESTABLISHED": 2}
    assert ports == {0x9C41, 0x9C42, 0x9C43}  # 40001..40003; the listener and port 80 are not ephemeral
    assert dests == {"0100007F:1F90": 2, "0200007F:0050": 1}
    assert na._hexaddr_text("0100007F:1F90") == "127.0.0.1:8080"
    v6 = "00000000000000000000000001000000:0035"  # ::1 in /proc's word order
    assert na._hexaddr_text(v6) == "[::1]:53"


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
    rules = na.parse_legacy_entries(blob, tuple(hook), tuple(under), valid, 140 if v6 else 88)
    assert rules == {"INPUT": 2, "FORWARD": 0, "OUTPUT": 1, "KUBE-SVC-X": 3}


def test_parse_legacy_entries_rejects_a_bad_blob():
    blob = bytearray(_entry(""))
    struct.pack_into("=HH", blob, 88, 112, 0)  # next_offset 0 would loop forever
    with pytest.raises(ValueError, match="bad entry"):
        na.parse_legacy_entries(bytes(blob), (0,) * 5, (0,) * 5, 0, 88)


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
    assert na.parse_nft_rule_messages(msgs, counts) == (False, False)
    assert counts == {("ip", "kube-proxy", "KUBE-SVC-A"): 2, ("inet", "filter", "input"): 1}
    assert na.parse_nft_rule_messages(_nlmsg(3, b"\0" * 4, flags=0x12), counts) == (True, True)
    with pytest.raises(OSError):
        na.parse_nft_rule_messages(_nlmsg(2, struct.pack("=i", -1) + b"\0" * 16), counts)
    with pytest.raises(ValueError, match="truncated"):
        na.parse_nft_rule_messages(msgs[:30], {})


def test_tuned_node_gives_no_finding():
    assert na.check(facts()) == []


def test_conntrack_max_info_warning_and_memory_cap():
    r = ids(na.check(facts(net__netfilter__nf_conntrack_max="65536")))["node.conntrack_max_low"]
    assert r.severity == "info" and r.evidence["recommended_max"] == 131072  # 4 CPUs x 32768
    assert r.remediation[0].startswith("sysctl -w net.netfilter.nf_conntrack_max=131072   # about 40 MiB")
    r = ids(na.check(facts(net__netfilter__nf_conntrack_max="65536"), conntrack_peak=60000))["node.conntrack_max_low"]
    assert r.severity == "warning" and r.evidence["peak_fill_percent"] == 91.6
    assert r.evidence["recommended_max"] == 131072
    # Drops in the window make it a warning whatever the peak; impact = drops.
    r = ids(na.check(facts(), conntrack_drops=7))["node.conntrack_max_low"]
    assert r.severity == "warning" and r.impact == 7
    # 256 MiB of memory: 5% holds 41943 entries, so no advice above that.
    f = facts(net__netfilter__nf_conntrack_max="65536")
    f.mem_bytes = 256 << 20
    assert "node.conntrack_max_low" not in ids(na.check(f))
    assert na.check_conntrack(na.Facts(sysctls={}), None, 0) is None  # nf_conntrack not loaded


def listen_window(rows, somaxconn=4096, seconds=10.0, overflows=0, drops=None, passive_opens=0,
                  socket_drops=None, owners=None, tracked=None) -> ls.ListenWindow:
    return ls.ListenWindow(seconds, overflows, overflows if drops is None else drops, passive_opens,
                           socket_drops or {}, ls.ListenSample(rows, somaxconn, tracked or {}, owners or {}))


def test_listen_overflow_names_a_listener_that_somaxconn_does_not_cap():
    """The issue's case: listen(1), 200 connection attempts. The listener is named with its
    backlog; raising somaxconn (4096) would change nothing, so it is not advised."""
    server = ls.Listener("ipv4", "198.18.0.1", 9641, 4242, 2, 1, 792)
    lw = listen_window([server, ls.Listener("ipv4", "0.0.0.0", 22, 11, 0, 128, 0)], overflows=792,
                       passive_opens=2, socket_drops={4242: 792}, owners={4242: [(77, "python3")]})
    found = ids(na.check(facts(), listen=lw))
    assert "node.somaxconn_low" not in found
    r = found["node.listen_queue_overflow"]
    assert r.severity == "critical" and r.impact == 792.0  # 79/s, and far more refused than accepted
    assert "198.18.0.1:9641 (python3, pid 77) has a listen() backlog of 1" in r.summary
    assert "raising somaxconn changes nothing" in r.summary
    (named,) = r.evidence["listeners"]
    assert named["listener"] == "198.18.0.1:9641" and named["effective_backlog"] == 1
    assert named["capped_by_somaxconn"] is False and named["socket_drops_in_window"] == 792
    assert named["process"] == {"pid": 77, "comm": "python3"}
    assert r.evidence["listeners_full_now"] == 1 and r.evidence["listeners_read"] == 2
    assert not any("somaxconn=" in step and step.startswith("sysctl") for step in r.remediation)
    assert r.remediation[0].startswith("198.18.0.1:9641 (python3, pid 77): raise its listen() backlog from 1 to 128")


def test_listen_overflow_advises_somaxconn_only_when_it_caps():
    capped = ls.Listener("ipv4", "198.18.0.1", 9642, 5, 17, 16, 40)
    free = ls.Listener("ipv6", "::", 9643, 6, 0, 8, 3)
    lw = listen_window([capped, free], somaxconn=16, overflows=43, passive_opens=100,
                       socket_drops={5: 40, 6: 3}, owners={5: [], 6: []})
    found = ids(na.check(facts(net__core__somaxconn="16"), listen=lw))
    r = found["node.listen_queue_overflow"]
    assert r.severity == "warning"  # fewer refused than accepted
    assert [x["capped_by_somaxconn"] for x in r.evidence["listeners"]] == [True, False]
    assert "net.core.somaxconn=16 caps its backlog" in r.summary and "1 more listener(s)" in r.summary
    assert r.remediation[0] == "sysctl -w net.core.somaxconn=4096"
    assert r.remediation[1].startswith("198.18.0.1:9642: its backlog 16 is capped by somaxconn")
    assert r.remediation[2].startswith("[::]:9643: raise its listen() backlog from 8 to 16")
    assert "another pid namespace" in r.evidence["owner_note"]
    # The audit's own info stays, and says which listeners it caps.
    s = found["node.somaxconn_low"]
    assert s.severity == "info" and s.evidence["listeners_capped_by_somaxconn"] == 1
    assert s.evidence["capped_listeners"] == ["198.18.0.1:9642"]


def test_listen_overflow_severity_and_what_it_cannot_name():
    # Below 1/s: a warning even when nothing was accepted.
    assert na.check_listen_overflow(listen_window([], seconds=60, overflows=30)).severity == "warning"
    # Nothing counted, nothing refused: no finding.
    assert na.check_listen_overflow(listen_window([])) is None
    assert na.check_listen_overflow(None) is None
    # Counters only (the listeners could not be read): counted, generic fix, no somaxconn.
    lw = ls.ListenWindow(10.0, overflows=50, drops=60, passive_opens=10,
                         sample=ls.ListenSample(ok=False, error="OSError: no sock_diag"))
    r = na.check_listen_overflow(lw)
    assert r.severity == "critical" and r.evidence["listeners"] == [] and r.impact == 60.0
    assert r.evidence["read_error"] == "OSError: no sock_diag"
    assert "10 more were dropped before reaching the accept queue" in r.summary
    assert r.remediation[0].startswith("ss -ltnp | awk")
    assert not any("somaxconn" in step for step in r.remediation)
    # Read, but no listener dropped or filled in the window: said so.
    r = na.check_listen_overflow(listen_window([ls.Listener("ipv4", "0.0.0.0", 22, 1, 0, 128, 0)],
                                               overflows=5, passive_opens=100))
    assert "No listener of this netns counted drops or was seen full" in r.summary
    # SYNs dropped with no accept queue full.
    r = na.check_listen_overflow(listen_window([], overflows=0, drops=7, passive_opens=100))
    assert r.summary.startswith("7 connection attempts were dropped before reaching a listener's accept queue")
    assert r.title == "Listeners drop connection attempts" and r.claims == ("listen_drops_in_window",)


def test_somaxconn_ports_and_tw_reuse():
    r = ids(na.check(facts(net__core__somaxconn="128")))["node.somaxconn_low"]
    assert (r.severity, r.evidence["recommended"]) == ("info", 4096)
    assert "listeners_capped_by_somaxconn" not in r.evidence  # no listeners read
    r = ids(na.check(facts(net__core__somaxconn="128"), listen=listen_window([], somaxconn=128)))
    assert "No listener here is capped by it now" in r["node.somaxconn_low"].summary

    f = facts(net__ipv4__ip_local_port_range="40000 40999", net__ipv4__tcp_tw_reuse="0")
    f.busiest_destination = {"destination": "10.0.0.1:443", "sockets": 600}
    f.tcp_states = {"TIME_WAIT": 600, "LISTEN": 1}
    found = ids(na.check(f))
    p = found["node.port_range_small"]
    assert p.severity == "warning" and p.evidence["range_size"] == 1000
    assert p.remediation[0] == "sysctl -w net.ipv4.ip_local_port_range='32768 65535'"
    assert "ip_local_reserved_ports=30000-32767" in p.remediation[1]
    t = found["node.tcp_tw_reuse_off"]
    assert t.severity == "warning" and t.evidence["time_wait_share_of_range_percent"] == 60.0
    assert t.remediation[0].startswith("sysctl -w net.ipv4.tcp_tw_reuse=1")
    f.busiest_destination = {"destination": "10.0.0.1:443", "sockets": 100}
    f.tcp_states = {"TIME_WAIT": 100}
    found = ids(na.check(f))
    assert found["node.port_range_small"].severity == "info"  # small range, not busy
    assert found["node.tcp_tw_reuse_off"].severity == "info"  # 10% of the range


def test_backlog_buffers_congestion_inotify():
    f = facts(net__core__rmem_max="212992")
    f.fastest_link_mbps = 25000
    found = ids(na.check(f))
    assert found["node.netdev_max_backlog_low"].evidence["recommended"] == 32768
    b = found["node.socket_buffers_small"]
    assert b.severity == "info" and b.evidence["recommended"] == 32 << 20  # 25 Gbit/s x 10 ms
    found = ids(na.check(facts(), backlog_drops=50, buffer_errors=3))
    assert found["node.netdev_max_backlog_low"].severity == "warning"
    assert found["node.netdev_max_backlog_low"].evidence["recommended"] == 2000
    assert found["node.socket_buffers_small"].severity == "warning"

    c = ids(na.check(facts(net__ipv4__tcp_congestion_control="cubic", net__core__default_qdisc="fq_codel")))
    assert c["node.congestion_control"].remediation[-1] == "sysctl -w net.ipv4.tcp_congestion_control=bbr"
    f = facts(net__ipv4__tcp_congestion_control="cubic")
    f.bbr = "module"
    assert na.check(f)[0].remediation[0].startswith("modprobe tcp_bbr")
    f.bbr = "absent"
    assert not any("tcp_congestion_control=bbr" in s for s in na.check(f)[0].remediation)

    f = facts(fs__inotify__max_user_instances="128")
    f.inotify = {"instances_in_use": 120, "watches_in_use": 1000}
    i = ids(na.check(f))["node.inotify_limits_low"]
    assert i.severity == "warning" and "fs.inotify.max_user_instances=8192" in i.remediation[1]


def test_netfilter_rule_count_and_overlays():
    f = facts()
    f.netfilter = {"total_rules": 12000, "nft_rules": 12000, "kube_svc_chains": 900,
                   "kube_proxy_rules": 11000, "top_chains": []}
    r = ids(na.check(f))["netfilter.rule_count_high"]
    assert r.severity == "warning" and r.evidence["kube_svc_chains"] == 900
    assert "Cilium kube-proxy replacement" in r.remediation[0] and "Calico eBPF" in r.remediation[0]
    f.netfilter = {"total_rules": 12000, "kube_svc_chains": 0}
    assert "nft sets" in ids(na.check(f))["netfilter.rule_count_high"].remediation[0]
    assert "netfilter.rule_count_high" not in ids(na.check(f, netfilter_threshold=20000))
    f.overlays = [{"name": "vxlan0", "kind": "vxlan", "mtu": 1450, "up": True, "overhead": 50},
                  {"name": "tunl0", "kind": "ipip", "mtu": 1480, "up": False, "overhead": 20}]
    o = ids(na.check(f))["node.overlay_in_use"]
    assert o.severity == "info" and o.evidence["overhead_bytes"] == 50
    assert [d["name"] for d in o.evidence["overlay_devices"]] == ["vxlan0"]


def test_proc_parsers():
    assert parse_softnet_dropped("00000010 00000002 00\n00000020 0000000a 00\n") == 12
    stat = "entries clashres found new invalid ignore delete delete_list insert insert_failed drop early_drop\n" \
           "00000001 0 0 0 0 0 0 0 0 0 00000003 0\n00000001 0 0 0 0 0 0 0 0 0 00000004 0\n"
    assert parse_ct_drops(stat) == 7


def test_node_probe_diagnose_uses_window_deltas():
    probe = NodeProbe(Config())
    f = facts(net__core__somaxconn="128")
    server = ls.Listener("ipv4", "198.18.0.1", 9641, 4242, 2, 1, 25)
    old = {"counters": {"limits": {("listen_overflows",): 10, ("listen_drops",): 10, ("passive_opens",): 5},
                        "listener_drops": {(4242,): 5}},
           "gauges": {"conntrack_peak": {(): 0}}}
    new = {"counters": {"limits": {("listen_overflows",): 30, ("listen_drops",): 30, ("passive_opens",): 7},
                        "listener_drops": {(4242,): 25}},
           "gauges": {"conntrack_peak": {(): 5}},
           "info": {"facts": f, "listen": ls.ListenSample([server], 128)}}
    found = {x.id: x for x in probe.diagnose(Window(10.0, old, new))}
    o = found["node.listen_queue_overflow"]
    assert o.severity == "critical" and o.evidence["listen_overflows_in_window"] == 20
    assert o.evidence["passive_opens_in_window"] == 2
    assert o.evidence["listeners"][0]["socket_drops_in_window"] == 20
    assert o.impact == 2.0  # 20 refused in 10 s
    assert o.probe == "node"
    assert found["node.somaxconn_low"].severity == "info" and found["node.somaxconn_low"].impact == 0
    assert probe.diagnose(Window(10.0, old, {"counters": {}, "gauges": {}})) == []
    # Before the first audit the live check still stands on the counters.
    new["info"] = {"listen": ls.ListenSample([server], 128)}
    assert [x.id for x in probe.diagnose(Window(10.0, old, new))] == ["node.listen_queue_overflow"]


# -- the early re-audit's cheap signature --------------------------------------------------------

def test_nft_generation_parsed_from_newgen():
    attr = struct.pack("=HH", 8, 1) + struct.pack(">I", 4242)           # NFTA_GEN_ID
    body = struct.pack("=BBH", 0, 0, 0) + attr
    msg = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, 1, 0) + body
    assert na.parse_nft_generation(msg) == 4242
    assert na.parse_nft_generation(msg[:18]) is None                # truncated
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + b"\0" * 16
    assert na.parse_nft_generation(err) is None                     # no nf_tables


def test_tcp_socket_count_from_sockstat():
    v4 = ("sockets: used 120\nTCP: inuse 40 orphan 0 tw 25 alloc 50 mem 3\nUDP: inuse 5 mem 1\n")
    v6 = "TCP6: inuse 7\nUDP6: inuse 2\n"
    assert na.tcp_socket_count(v4, v6) == 40 + 25 + 7
    assert na.tcp_socket_count("", "") == 0


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
    assert na.audit_due(before, now) == why
