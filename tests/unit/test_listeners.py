"""Unit tests of the listener reading (probes/node/listeners.py) and its pure logic (culprits.py,
remedies.py, thresholds.py): inet_diag messages built by hand in the kernel's layout (pyroute2's
decoder as the reference), a fake /proc for the owner scan, the tracker's bounds, and the
ranking and remediation over fake listener rows. The real kernel is exercised in tests/kernel/test_nodeaudit_kernel.py."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from pyroute2.netlink.diag import inet_diag_msg, inet_diag_req

from dpwatch.daemon.host import paths
from dpwatch.probes.node import listeners as ls
from dpwatch.probes.node import remedies, thresholds
from dpwatch.probes.node.culprits import Culprit, ListenWindow, culprits
from dpwatch.probes.node.listeners import Listener, ListenSample


def L(port: int, queue: int, backlog: int, drops: int | None = 0, inode: int | None = None,
      family: str = "ipv4", address: str = "198.18.0.1") -> Listener:
    return Listener(family, address, port, inode if inode is not None else port, queue, backlog, drops)


def diag_message(family: int, state: int, address: str, port: int, rqueue: int, wqueue: int,
                 inode: int, meminfo: bytes | None) -> bytes:
    """A SOCK_DIAG_BY_FAMILY answer as the kernel writes it: nlmsghdr, struct inet_diag_msg
    (ports and addresses in network order), then the INET_DIAG_SKMEMINFO rtattr."""
    addr = socket.inet_pton(family, address).ljust(16, b"\0")
    body = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", port, 0) + addr + b"\0" * 16
            + struct.pack("=IQIIIII", 0, 1, 0, rqueue, wqueue, 0, inode))
    attr = b""
    if meminfo is not None:
        attr = struct.pack("=HH", 4 + len(meminfo), ls.INET_DIAG_SKMEMINFO) + meminfo
        attr += b"\0" * ((4 - len(attr) % 4) % 4)
    return struct.pack("=IHHII", 16 + len(body) + len(attr), 20, 2, 1, 0) + body + attr


def parse(*messages: bytes) -> list[Listener]:
    out: list[Listener] = []
    assert ls.parse_diag_messages(b"".join(messages) + struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4, out)
    return out


def test_parse_diag_messages_reads_queue_backlog_drops_and_address():
    mem = struct.pack("=9I", 0, 131072, 0, 16384, 0, 0, 0, 0, 792)  # sk_drops is the 9th
    m4 = diag_message(socket.AF_INET, 10, "198.18.0.1", 9641, 2, 1, 4242, mem)
    m6 = diag_message(socket.AF_INET6, 10, "fd00:d9::1", 80, 3, 4, 7, None)
    est = diag_message(socket.AF_INET, 1, "198.18.0.1", 80, 0, 0, 8, mem)  # not listening
    short = diag_message(socket.AF_INET, 10, "0.0.0.0", 22, 0, 128, 9, mem[:16])
    v4, v6, sh = parse(m4, m6, est, short)
    assert v4 == Listener("ipv4", "198.18.0.1", 9641, 4242, 2, 1, 792)
    assert v4.endpoint == "198.18.0.1:9641" and v4.full  # 2 > 1: listen(1) holds two
    assert v6.endpoint == "[fd00:d9::1]:80" and v6.drops is None and not v6.full
    assert sh.drops is None and sh.backlog == 128  # a meminfo too short to hold sk_drops
    # pyroute2's own decoder reads the same bytes the same way.
    ref = inet_diag_msg(m4)
    ref.decode()
    assert (ref["idiag_src"], ref["idiag_sport"], ref["idiag_rqueue"], ref["idiag_wqueue"],
            ref["idiag_inode"]) == ("198.18.0.1", 9641, 2, 1, 4242)
    out: list[Listener] = []
    assert not ls.parse_diag_messages(m4, out) and len(out) == 1  # no NLMSG_DONE yet
    with pytest.raises(OSError):
        ls.parse_diag_messages(struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -95) + b"\0" * 16, [])
    with pytest.raises(ValueError, match="truncated"):
        ls.parse_diag_messages(m4[:40], [])


def test_dump_request_asks_for_tcp_listeners_with_meminfo():
    req = ls.dump_request(socket.AF_INET6)
    length, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert (length, mtype, flags) == (len(req), 20, 0x301) and len(req) == 16 + 56
    ref = inet_diag_req(req)
    ref.decode()
    assert ref["sdiag_family"] == socket.AF_INET6 and ref["sdiag_protocol"] == socket.IPPROTO_TCP
    assert ref["idiag_states"] == 1 << 10 and ref["idiag_ext"] == 1 << 6


def _fake_proc(tmp_path, procs: dict[int, tuple[str, list[str]]]) -> str:
    for pid, (comm, links) in procs.items():
        fd = tmp_path / str(pid) / "fd"
        fd.mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        for n, target in enumerate(links):
            os.symlink(target, fd / str(n))
    (tmp_path / "self").mkdir()  # not a pid: skipped
    return str(tmp_path)


def test_socket_owners_scans_fd_links_bounded(tmp_path):
    proc = _fake_proc(tmp_path, {
        10: ("nginx", ["/dev/null", "socket:[500]"]), 11: ("nginx", ["socket:[500]"]),
        12: ("nginx", ["socket:[500]"]), 13: ("nginx", ["socket:[500]", "socket:[600]"]),
        20: ("sshd", ["socket:[700]", "pipe:[1]"])})
    found, scanned, truncated = ls.socket_owners([500, 700, 999], proc=proc)
    assert found[500] == [(10, "nginx"), (11, "nginx"), (12, "nginx")]  # lowest pids, 3 at most
    assert found[700] == [(20, "sshd")] and found[999] == []
    assert not truncated and scanned == 8
    found, scanned, truncated = ls.socket_owners([700], proc=proc, max_fds=3)
    assert truncated and scanned == 3 and found[700] == []
    assert ls.socket_owners([], proc=proc) == ({}, 0, False)
    with paths.roots(proc_root=proc):  # the default /proc is paths.proc()
        assert ls.socket_owners([700])[0][700] == [(20, "sshd")]
    c = Culprit(L(80, 2, 1), 5, {}, [(10, "nginx"), (11, "nginx"), (20, "sshd")], False, "socket drops")
    assert c.who() == "198.18.0.1:80 (nginx, pids 10, 11; sshd, pid 20)"


def test_tracker_remembers_full_listeners_bounded():
    t = ls.Tracker(cap=2, horizon=100.0)
    # First sample: drops counted before it are the baseline, not news.
    assert t.observe(0.0, [L(80, 0, 128, drops=50), L(81, 0, 1)]) == set()
    assert set(t.tracks) == {80}  # idle and never dropping: not remembered
    assert t.observe(5.0, [L(80, 0, 128, drops=50), L(81, 2, 1), L(82, 1, 4)]) == {81}  # full now
    assert t.untracked == 1  # 82 would be a third
    assert t.observe(10.0, [L(80, 3, 128, drops=51), L(81, 0, 1)]) == {80}  # its drops grew
    assert t.untracked == 0  # counted per sample, not summed
    v = t.view(12.0)
    assert v[81] == {"queue_peak": 2, "queue_peak_seconds_ago": 7.0, "last_full_seconds_ago": 7.0,
                     "full_samples": 1}
    assert v[80]["last_full_seconds_ago"] is None and v[80]["queue_peak"] == 3
    # A closed socket goes; one idle for longer than the horizon goes.
    t.observe(20.0, [L(81, 0, 1)])
    assert set(t.tracks) == {81}
    t.observe(200.0, [L(81, 0, 1)])
    assert t.tracks == {}


def test_drop_counters_keep_the_biggest():
    rows = [L(80, 0, 1, drops=5), L(81, 0, 1, drops=0), L(82, 0, 1, drops=None), L(83, 0, 1, drops=9)]
    assert ls.drop_counters(rows) == {(80,): 5, (83,): 9}
    assert ls.drop_counters(rows, cap=1) == {(83,): 9}


def sample(rows, somaxconn=4096, tracked=None, owners=None) -> ListenSample:
    return ListenSample(rows, somaxconn, tracked or {}, owners or {})


def test_culprits_by_socket_drops_then_seen_full():
    rows = [L(80, 0, 511), L(9641, 2, 1), L(443, 129, 128), L(22, 0, 128)]
    lw = ListenWindow(30.0, overflows=300, drops=300, socket_drops={9641: 200, 443: 100},
                      sample=sample(rows, owners={9641: [(7, "python3")]}))
    found = culprits(lw)
    assert [c.listener.port for c in found] == [9641, 443]
    assert all(c.basis == "socket drops" for c in found)
    ev = found[0].evidence()
    assert ev["listener"] == "198.18.0.1:9641" and ev["effective_backlog"] == 1
    assert ev["queue_now"] == 2 and ev["full_now"] and ev["socket_drops_in_window"] == 200
    assert ev["capped_by_somaxconn"] is False and ev["process"] == {"pid": 7, "comm": "python3"}
    assert found[1].evidence()["process"] is None
    # No socket counted drops (the kernel gives no SKMEMINFO): full now, or full in the window.
    tracked = {80: {"last_full_seconds_ago": 12.0, "queue_peak": 512},
               22: {"last_full_seconds_ago": 45.0, "queue_peak": 129}}
    lw = ListenWindow(30.0, overflows=5, sample=sample(rows, tracked=tracked))
    assert [(c.listener.port, c.basis) for c in culprits(lw)] == [
        (443, "seen full"), (9641, "seen full"), (80, "seen full")]  # 22 was full before the window
    assert culprits(lw)[2].evidence()["queue_peak_seen"] == 512
    assert culprits(ListenWindow(30.0, overflows=5)) == []
    # Capped: the backlog equals somaxconn (the application asked for at least that).
    lw = ListenWindow(30.0, overflows=5, socket_drops={443: 5}, sample=sample(rows, somaxconn=128))
    assert culprits(lw)[0].capped is True
    lw = ListenWindow(30.0, overflows=5, socket_drops={443: 5}, sample=sample(rows, somaxconn=None))
    assert culprits(lw)[0].capped is None


def test_recommended_backlog_and_somaxconn():
    assert thresholds.recommended_backlog(1, 4096) == 128       # at least 128
    assert thresholds.recommended_backlog(50, 4096) == 256      # 4 x 51 = 204 -> 256
    assert thresholds.recommended_backlog(128, 4096) == 1024    # 4 x 129 = 516 -> 1024
    assert thresholds.recommended_backlog(2000, 4096) == 4096   # no more than somaxconn allows
    assert thresholds.recommended_backlog(1, None) == 128
    assert thresholds.recommended_somaxconn(16) == 4096 and thresholds.recommended_somaxconn(4096) == 8192


def test_remediation_names_the_right_knob():
    free = Culprit(L(9641, 2, 1), 200, {}, [(7, "python3")], False, "socket drops")
    fix = remedies.listen_overflow([free], 4096)
    assert fix[0].startswith("198.18.0.1:9641 (python3, pid 7): raise its listen() backlog from 1 to 128")
    assert "somaxconn=4096 does not cap it, no sysctl helps" in fix[0]
    assert not any(f.startswith("sysctl") for f in fix)
    assert fix[1] == "ss -ltnp 'sport = :9641'   # Recv-Q above Send-Q: its accept queue is full"
    capped = Culprit(L(8080, 17, 16), 50, {}, None, True, "socket drops")
    fix = remedies.listen_overflow([capped, free], 16)
    assert fix[0] == "sysctl -w net.core.somaxconn=4096"
    assert fix[1].startswith("198.18.0.1:8080: its backlog 16 is capped by somaxconn; after the sysctl "
                             "it must call listen() again with a backlog of 4096")
    assert fix[2].startswith("198.18.0.1:9641 (python3, pid 7): raise its listen() backlog from 1 to 16")
    # somaxconn lowered after listen(): the backlog is above it, and no backlog advice helps.
    above = Culprit(L(8080, 4001, 4000), 5, {}, None, False, "socket drops")
    assert remedies.listen_overflow([above], 1024)[0] == (
        "198.18.0.1:8080: its backlog 4000 is already at or above what somaxconn=1024 allows; make it "
        "accept() faster (more workers, nothing slow on the accept path)")
    generic = remedies.listen_overflow([], 4096)
    assert generic[0].startswith("ss -ltnp | awk") and not any("somaxconn" in f for f in generic)
