"""Unit tests of the node findings (probes/node/findings.py, one pure function per finding id)
and the node probe's window logic: each finding's info/warning/none decisions and computed
values over hand-built Facts, the listen-overflow finding over fake listener rows (backlog 1
not capped, a capped one, no names). The audit that reads the Facts is tested in
tests/unit/test_nodeaudit.py and tests/kernel/test_nodeaudit_kernel.py."""

from __future__ import annotations

import pytest

from dpwatch.daemon.config import Config
from dpwatch.probes.base import Window
from dpwatch.probes.node import findings as fd
from dpwatch.probes.node.culprits import ListenWindow
from dpwatch.probes.node.facts import Facts
from dpwatch.probes.node.listeners import Listener, ListenSample
from dpwatch.probes.node.probe import NodeProbe


def facts(**sysctls) -> Facts:
    base = {"net.ipv4.ip_local_port_range": "32768\t60999", "net.core.somaxconn": "4096",
            "net.ipv4.tcp_tw_reuse": "2", "net.core.netdev_max_backlog": "1000",
            "net.core.rmem_max": str(16 << 20), "net.core.wmem_max": str(16 << 20),
            "net.ipv4.tcp_congestion_control": "bbr", "net.core.default_qdisc": "fq",
            "net.ipv4.tcp_available_congestion_control": "reno cubic bbr",
            "fs.inotify.max_user_watches": "524288", "fs.inotify.max_user_instances": "8192",
            "net.netfilter.nf_conntrack_max": "262144", "net.netfilter.nf_conntrack_count": "10"}
    base.update({k.replace("__", "."): v for k, v in sysctls.items()})
    return Facts(cpus=4, mem_bytes=8 << 30, sysctls=base, bbr="available",
                    netfilter={"total_rules": 0}, inotify={"instances_in_use": 3, "watches_in_use": 40})


def ids(results) -> dict[str, fd.Result]:
    return {r.id: r for r in results}

def test_tuned_node_gives_no_finding():
    assert fd.check(facts()) == []


def test_conntrack_max_info_warning_and_memory_cap():
    r = ids(fd.check(facts(net__netfilter__nf_conntrack_max="65536")))["node.conntrack_max_low"]
    assert r.severity == "info" and r.evidence["recommended_max"] == 131072  # 4 CPUs x 32768
    assert r.remediation[0].startswith("sysctl -w net.netfilter.nf_conntrack_max=131072   # about 40 MiB")
    r = ids(fd.check(facts(net__netfilter__nf_conntrack_max="65536"), conntrack_peak=60000))["node.conntrack_max_low"]
    assert r.severity == "warning" and r.evidence["peak_fill_percent"] == 91.6
    assert r.evidence["recommended_max"] == 131072
    # Drops in the window make it a warning whatever the peak; impact = drops.
    r = ids(fd.check(facts(), conntrack_drops=7))["node.conntrack_max_low"]
    assert r.severity == "warning" and r.impact == 7
    # 256 MiB of memory: 5% holds 41943 entries, so no advice above that.
    f = facts(net__netfilter__nf_conntrack_max="65536")
    f.mem_bytes = 256 << 20
    assert "node.conntrack_max_low" not in ids(fd.check(f))
    assert fd.conntrack_max_low(Facts(sysctls={}), None, 0) is None  # nf_conntrack not loaded


def listen_window(rows, somaxconn=4096, seconds=10.0, overflows=0, drops=None, passive_opens=0,
                  socket_drops=None, owners=None, tracked=None) -> ListenWindow:
    return ListenWindow(seconds, overflows, overflows if drops is None else drops, passive_opens,
                           socket_drops or {}, ListenSample(rows, somaxconn, tracked or {}, owners or {}))


def test_listen_overflow_names_a_listener_that_somaxconn_does_not_cap():
    """The issue's case: listen(1), 200 connection attempts. The listener is named with its
    backlog; raising somaxconn (4096) would change nothing, so it is not advised."""
    server = Listener("ipv4", "198.18.0.1", 9641, 4242, 2, 1, 792)
    lw = listen_window([server, Listener("ipv4", "0.0.0.0", 22, 11, 0, 128, 0)], overflows=792,
                       passive_opens=2, socket_drops={4242: 792}, owners={4242: [(77, "python3")]})
    found = ids(fd.check(facts(), listen=lw))
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
    capped = Listener("ipv4", "198.18.0.1", 9642, 5, 17, 16, 40)
    free = Listener("ipv6", "::", 9643, 6, 0, 8, 3)
    lw = listen_window([capped, free], somaxconn=16, overflows=43, passive_opens=100,
                       socket_drops={5: 40, 6: 3}, owners={5: [], 6: []})
    found = ids(fd.check(facts(net__core__somaxconn="16"), listen=lw))
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
    assert fd.listen_queue_overflow(listen_window([], seconds=60, overflows=30)).severity == "warning"
    # Nothing counted, nothing refused: no finding.
    assert fd.listen_queue_overflow(listen_window([])) is None
    assert fd.listen_queue_overflow(None) is None
    # Counters only (the listeners could not be read): counted, generic fix, no somaxconn.
    lw = ListenWindow(10.0, overflows=50, drops=60, passive_opens=10,
                         sample=ListenSample(ok=False, error="OSError: no sock_diag"))
    r = fd.listen_queue_overflow(lw)
    assert r.severity == "critical" and r.evidence["listeners"] == [] and r.impact == 60.0
    assert r.evidence["read_error"] == "OSError: no sock_diag"
    assert "10 more were dropped before reaching the accept queue" in r.summary
    assert r.remediation[0].startswith("ss -ltnp | awk")
    assert not any("somaxconn" in step for step in r.remediation)
    # Read, but no listener dropped or filled in the window: said so.
    r = fd.listen_queue_overflow(listen_window([Listener("ipv4", "0.0.0.0", 22, 1, 0, 128, 0)],
                                               overflows=5, passive_opens=100))
    assert "No listener of this netns counted drops or was seen full" in r.summary
    # SYNs dropped with no accept queue full.
    r = fd.listen_queue_overflow(listen_window([], overflows=0, drops=7, passive_opens=100))
    assert r.summary.startswith("7 connection attempts were dropped before reaching a listener's accept queue")
    assert r.title == "Listeners drop connection attempts" and r.claims == ("listen_drops_in_window",)


def test_somaxconn_ports_and_tw_reuse():
    r = ids(fd.check(facts(net__core__somaxconn="128")))["node.somaxconn_low"]
    assert (r.severity, r.evidence["recommended"]) == ("info", 4096)
    assert "listeners_capped_by_somaxconn" not in r.evidence  # no listeners read
    r = ids(fd.check(facts(net__core__somaxconn="128"), listen=listen_window([], somaxconn=128)))
    assert "No listener here is capped by it now" in r["node.somaxconn_low"].summary

    f = facts(net__ipv4__ip_local_port_range="40000 40999", net__ipv4__tcp_tw_reuse="0")
    f.busiest_destination = {"destination": "10.0.0.1:443", "sockets": 600}
    f.tcp_states = {"TIME_WAIT": 600, "LISTEN": 1}
    found = ids(fd.check(f))
    p = found["node.port_range_small"]
    assert p.severity == "warning" and p.evidence["range_size"] == 1000
    assert p.remediation[0] == "sysctl -w net.ipv4.ip_local_port_range='32768 65535'"
    assert "ip_local_reserved_ports=30000-32767" in p.remediation[1]
    t = found["node.tcp_tw_reuse_off"]
    assert t.severity == "warning" and t.evidence["time_wait_share_of_range_percent"] == 60.0
    assert t.remediation[0].startswith("sysctl -w net.ipv4.tcp_tw_reuse=1")
    f.busiest_destination = {"destination": "10.0.0.1:443", "sockets": 100}
    f.tcp_states = {"TIME_WAIT": 100}
    found = ids(fd.check(f))
    assert found["node.port_range_small"].severity == "info"  # small range, not busy
    assert found["node.tcp_tw_reuse_off"].severity == "info"  # 10% of the range


def test_backlog_buffers_congestion_inotify():
    f = facts(net__core__rmem_max="212992")
    f.fastest_link_mbps = 25000
    found = ids(fd.check(f))
    assert found["node.netdev_max_backlog_low"].evidence["recommended"] == 32768
    b = found["node.socket_buffers_small"]
    assert b.severity == "info" and b.evidence["recommended"] == 32 << 20  # 25 Gbit/s x 10 ms
    found = ids(fd.check(facts(), backlog_drops=50, buffer_errors=3))
    assert found["node.netdev_max_backlog_low"].severity == "warning"
    assert found["node.netdev_max_backlog_low"].evidence["recommended"] == 2000
    assert found["node.socket_buffers_small"].severity == "warning"

    c = ids(fd.check(facts(net__ipv4__tcp_congestion_control="cubic", net__core__default_qdisc="fq_codel")))
    assert c["node.congestion_control"].remediation[-1] == "sysctl -w net.ipv4.tcp_congestion_control=bbr"
    f = facts(net__ipv4__tcp_congestion_control="cubic")
    f.bbr = "module"
    assert fd.check(f)[0].remediation[0].startswith("modprobe tcp_bbr")
    f.bbr = "absent"
    assert not any("tcp_congestion_control=bbr" in s for s in fd.check(f)[0].remediation)

    f = facts(fs__inotify__max_user_instances="128")
    f.inotify = {"instances_in_use": 120, "watches_in_use": 1000}
    i = ids(fd.check(f))["node.inotify_limits_low"]
    assert i.severity == "warning" and "fs.inotify.max_user_instances=8192" in i.remediation[1]


def test_netfilter_rule_count_and_overlays():
    f = facts()
    f.netfilter = {"total_rules": 12000, "nft_rules": 12000, "kube_svc_chains": 900,
                   "kube_proxy_rules": 11000, "top_chains": []}
    r = ids(fd.check(f))["netfilter.rule_count_high"]
    assert r.severity == "warning" and r.evidence["kube_svc_chains"] == 900
    assert "Cilium kube-proxy replacement" in r.remediation[0] and "Calico eBPF" in r.remediation[0]
    f.netfilter = {"total_rules": 12000, "kube_svc_chains": 0}
    assert "nft sets" in ids(fd.check(f))["netfilter.rule_count_high"].remediation[0]
    assert "netfilter.rule_count_high" not in ids(fd.check(f, netfilter_threshold=20000))
    f.overlays = [{"name": "vxlan0", "kind": "vxlan", "mtu": 1450, "up": True, "overhead": 50},
                  {"name": "tunl0", "kind": "ipip", "mtu": 1480, "up": False, "overhead": 20}]
    o = ids(fd.check(f))["node.overlay_in_use"]
    assert o.severity == "info" and o.evidence["overhead_bytes"] == 50
    assert [d["name"] for d in o.evidence["overlay_devices"]] == ["vxlan0"]


def test_node_probe_diagnose_uses_window_deltas():
    probe = NodeProbe(Config())
    f = facts(net__core__somaxconn="128")
    server = Listener("ipv4", "198.18.0.1", 9641, 4242, 2, 1, 25)
    old = {"counters": {"limits": {("listen_overflows",): 10, ("listen_drops",): 10, ("passive_opens",): 5},
                        "listener_drops": {(4242,): 5}},
           "gauges": {"conntrack_peak": {(): 0}}}
    new = {"counters": {"limits": {("listen_overflows",): 30, ("listen_drops",): 30, ("passive_opens",): 7},
                        "listener_drops": {(4242,): 25}},
           "gauges": {"conntrack_peak": {(): 5}},
           "info": {"facts": f, "listen": ListenSample([server], 128)}}
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
    new["info"] = {"listen": ListenSample([server], 128)}
    assert [x.id for x in probe.diagnose(Window(10.0, old, new))] == ["node.listen_queue_overflow"]


@pytest.mark.parametrize("fid", NodeProbe.finding_ids)
def test_one_function_per_finding_id(fid):
    """Each declared id has its function in findings.py, named after the id."""
    assert callable(getattr(fd, fid.split(".", 1)[1]))


def test_findings_read_nothing_from_the_node(monkeypatch):
    """The findings judge from the Facts alone: with every file open refused they still answer."""
    import builtins

    def refuse(*_a, **_k):
        raise AssertionError("a finding opened a file")
    f = facts(net__core__somaxconn="128", net__netfilter__nf_conntrack_max="65536")
    lw = ListenWindow(10.0, 5, 5, 1, {}, ListenSample([Listener("ipv4", "0.0.0.0", 22, 1, 0, 128, 0)], 128))
    monkeypatch.setattr(builtins, "open", refuse)
    assert {r.id for r in fd.check(f, listen=lw)} == {"node.conntrack_max_low", "node.somaxconn_low",
                                                     "node.listen_queue_overflow"}
