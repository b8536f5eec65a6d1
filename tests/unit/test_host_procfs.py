"""The /proc readers of daemon/host on the fixture tree tests/unit/fixtures/proc.

The tree is a two-CPU node's /proc (captured from a 6.18 kernel, counters edited where a test
wants them non-zero): global files (stat, softirqs, kallsyms, sys/...), and the daemon as pid
4242 with its net/ files. As in the kernel, net -> self/net and self -> 4242; thread-self
points at 4242 as well (the kernel's 4242/task/4242 is left out). Namespace files (ns/net)
are empty regular files: one inode per netns; the ksoftirqd threads' ns is pid 1's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dpwatch.daemon.host import kallsyms, linkpeer, netns, paths, procnet, snmp, sysctl

PROC = str(Path(__file__).parent / "fixtures" / "proc")


@pytest.fixture
def proc():
    with paths.roots(proc_root=PROC):
        yield PROC


@pytest.fixture
def proc_copy(tmp_path):
    """A writable copy of the tree (symlinks kept), in force for the test."""
    root = tmp_path / "proc"
    shutil.copytree(PROC, root, symlinks=True)
    with paths.roots(proc_root=str(root)):
        yield root


def test_sysctl_reads_the_tree(proc):
    assert sysctl.path_of("net.core.somaxconn") == f"{PROC}/sys/net/core/somaxconn"
    assert sysctl.read_int("net.core.somaxconn") == 4096
    assert sysctl.read_int("net.netfilter.nf_conntrack_max") == 262144
    assert sysctl.read("net.ipv4.ip_local_port_range") == "32768\t60999"
    assert sysctl.read_int("net.ipv4.ip_local_port_range") == 32768  # the first number
    assert sysctl.read("net.ipv4.tcp_congestion_control") == "bbr"
    assert sysctl.read_int("net.ipv4.tcp_congestion_control") is None
    assert sysctl.read("net.ipv4.ip_local_reserved_ports") == ""
    assert sysctl.read_int("net.ipv4.ip_local_reserved_ports") is None
    assert sysctl.read("net.core.no_such_key") is None and sysctl.read_int("net.core.no_such_key") is None


def test_softnet_stat_of_the_tree(proc):
    parsed = procnet.parse_softnet_stat(procnet.read_text(procnet.SOFTNET_STAT))
    assert parsed.bad == 0 and sorted(parsed.data) == [0, 1]  # column 12 names the CPU
    assert parsed.data[0] == {"processed": 0x0145E8B2, "dropped": 6001, "time_squeeze": 8}
    assert parsed.data[1]["dropped"] == 0xEA60 and parsed.data[1]["time_squeeze"] == 5


def test_proc_stat_and_softirqs_of_the_tree(proc):
    stat = procnet.parse_proc_stat(procnet.read_text(procnet.PROC_STAT))
    assert stat.bad == 0 and sorted(stat.data) == [0, 1]
    assert stat.data[0] == {"steal": 19823, "softirq": 5804,
                            "total": 546008 + 43 + 52246 + 1087856 + 356 + 0 + 5804 + 19823}
    irqs = procnet.parse_softirqs(procnet.read_text(procnet.PROC_SOFTIRQS))
    assert irqs.bad == 0
    assert irqs.extra == ["HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED",
                          "HRTIMER", "RCU"]
    assert irqs.data[(0, "NET_RX")] > irqs.data[(1, "NET_RX")] > 0


def test_default_route_and_ksoftirqd_of_the_tree(proc):
    assert procnet.default_route_device(procnet.read_text(procnet.PROC_NET_ROUTE)) == "eth0"
    assert procnet.ksoftirqd_pids() == {0: 14, 1: 22}
    assert procnet.ksoftirqd_pids(PROC) == {0: 14, 1: 22}
    assert procnet.read_text(paths.proc("no", "such", "file")) is None


def test_snmp_files_of_the_calling_thread(proc_copy):
    files = snmp.SnmpFiles()
    try:
        v4, v6 = files.read()
        assert v4["Ip"]["FragCreates"] == 10 and v4["Ip"]["ReasmFails"] == 1
        assert v4["Udp"]["NoPorts"] == 600 and v4["Tcp"]["MaxConn"] == -1
        assert v6["Ip6FragCreates"] == 6 and v6["Ip6ReasmFails"] == 1
        # The file stays open and is read again from offset 0: a rewrite in place is seen.
        path = proc_copy / "4242" / "net" / "snmp"
        path.write_text(path.read_text().replace("Ip: 2 64 ", "Ip: 1 64 ", 1))
        assert files.read()[0]["Ip"]["Forwarding"] == 1
    finally:
        files.close()


def test_snmp_files_without_ipv6(proc_copy):
    (proc_copy / "4242" / "net" / "snmp6").unlink()
    files = snmp.SnmpFiles()
    try:
        assert files.read()[1] == {}
    finally:
        files.close()


def test_kallsyms_resolves_against_the_proc_root(proc):
    resolver = kallsyms.KallsymsResolver()
    assert resolver.path == f"{PROC}/kallsyms"
    names = resolver.resolve([0xFFFFFFFF82094EB0 + 0x2A, 0xFFFFFFFFC0A41010 + 0x5, 0xFFFFFFFF82400010])
    assert names[0xFFFFFFFF82094EDA] == "tcp_v4_rcv+0x2a"
    assert names[0xFFFFFFFFC0A41015] == "nf_conntrack_in+0x5 [nf_conntrack]"
    # The D symbol at 0xffffffff82400000 is data: the text symbol below it is the answer.
    assert names[0xFFFFFFFF82400010] == f"udp_queue_rcv_one_skb+0x{0xFFFFFFFF82400010 - 0xFFFFFFFF820A71D0:x}"


def test_own_netns_and_enumeration_under_the_root(proc):
    own = os.stat(f"{PROC}/4242/ns/net").st_ino
    host = os.stat(f"{PROC}/1/ns/net").st_ino
    assert netns.own_path() == f"{PROC}/thread-self/ns/net" and netns.own_inode() == own
    found, skipped = netns.enumerate_netns(1000)
    ours = {ino: path for ino, path in found.items() if path.startswith(PROC)}  # /run/netns is the host's
    assert ours == {own: f"{PROC}/thread-self/ns/net", host: f"{PROC}/1/ns/net"}
    assert list(found)[0] == own and skipped == 0  # the own netns first; pid 14, 22 and 4242 add nothing


def test_enumeration_limit_counts_the_rest(proc):
    found, skipped = netns.enumerate_netns(1)
    assert list(found) == [netns.own_inode()] and skipped >= 1


def test_linkpeer_walks_the_pids_of_the_root(proc):
    walked = [p for p in linkpeer.netns_paths() if p.startswith(PROC)]
    assert walked == [f"{PROC}/{pid}/ns/net" for pid in (1, 14, 22, 4242)]


def test_capabilities_and_perf_paranoid_of_the_tree(proc):
    from dpwatch.daemon import notrack
    assert notrack.has_cap(notrack.CAP_NET_ADMIN) and not notrack.has_cap(21)
    from dpwatch.daemon.manager import perf_paranoid_hint  # the tree: paranoid 3, no CAP_SYS_ADMIN
    assert "kernel.perf_event_paranoid=3" in perf_paranoid_hint()


def test_perf_paranoid_hint_is_empty_where_it_is_not_the_cause(proc_copy):
    from dpwatch.daemon.manager import perf_paranoid_hint
    (proc_copy / "sys" / "kernel" / "perf_event_paranoid").write_text("2\n")
    assert perf_paranoid_hint() == ""
    (proc_copy / "4242" / "status").unlink()
    assert perf_paranoid_hint() == ""


def test_watched_sysctls_share_one_dict_until_a_value_changes(tmp_path):
    tree = tmp_path / "proc"
    shutil.copytree(PROC, tree, symlinks=True)
    with paths.roots(proc_root=str(tree)):
        w = sysctl.Watched(["net.core.somaxconn", "net.no.such"])
        first = w.read()
        assert first == {"net.core.somaxconn": 4096, "net.no.such": None}
        assert w.read() is first  # unchanged: the same object (the ring keeps one)
        (tree / "sys" / "net" / "core" / "somaxconn").write_text("128\n")
        second = w.read()
        assert second == {"net.core.somaxconn": 128, "net.no.such": None} and second is not first
