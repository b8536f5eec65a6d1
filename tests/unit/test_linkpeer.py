"""Unit tests for daemon/host/linkpeer.py: the RTM_GETLINK / RTM_GETNSID requests it builds, the
replies it parses, and PeerReader's checks, against a fake socket (no root, no netlink)."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from dpwatch.daemon.host import linkpeer as lp


def attr(kind: int, payload: bytes) -> bytes:
    return lp._attr(kind, payload)


def newlink(index: int, name: str = "eth0", mtu: int = 1500, kind: str | None = "veth", link: int | None = 7,
            link_nsid: int | None = 0, target: int | None = 3, flags: int = lp.IFF_UP, ifi_type: int = 1) -> bytes:
    body = lp._IFINFOMSG.pack(0, ifi_type, index, flags, 0)
    body += attr(lp.IFLA_IFNAME, name.encode() + b"\0") + attr(lp.IFLA_MTU, struct.pack("=I", mtu))
    if link is not None:
        body += attr(lp.IFLA_LINK, struct.pack("=I", link))
    if kind is not None:  # IFLA_LINKINFO is nested: NLA_F_NESTED must be masked off
        body += attr(lp.IFLA_LINKINFO | 0x8000, attr(lp.IFLA_INFO_KIND, kind.encode() + b"\0"))
    if link_nsid is not None:
        body += attr(lp.IFLA_LINK_NETNSID, struct.pack("=i", link_nsid))
    if target is not None:
        body += attr(lp.IFLA_TARGET_NETNSID, struct.pack("=i", target))
    return body


def message(kind: int, seq: int, payload: bytes) -> bytes:
    return lp._NLMSGHDR.pack(lp._NLMSGHDR.size + len(payload), kind, 0, seq, 0) + payload


def error(seq: int, err: int) -> bytes:
    return message(lp.NLMSG_ERROR, seq, struct.pack("=i", -err) + b"\0" * 16)


def test_getlink_request_carries_the_target_nsid():
    raw = lp.build_getlink(9, index=7, nsid=3)
    ((kind, seq, payload),) = lp.parse_messages(raw)
    assert (kind, seq) == (lp.RTM_GETLINK, 9)
    assert struct.unpack_from("=HH", raw, 4) == (lp.RTM_GETLINK, lp.NLM_F_REQUEST)  # a get, not a dump
    family, _type, index, _flags, _change = lp._IFINFOMSG.unpack_from(payload)
    assert (family, index) == (0, 7)
    attrs = lp.parse_attrs(payload[lp._IFINFOMSG.size:])
    assert struct.unpack("=i", attrs[46]) == (3,)           # IFLA_TARGET_NETNSID, s32
    assert struct.unpack("=I", attrs[lp.IFLA_EXT_MASK]) == (lp.RTEXT_FILTER_SKIP_STATS,)


def test_getnsid_request_by_fd():
    raw = lp.build_getnsid(4, fd=12)
    ((kind, seq, payload),) = lp.parse_messages(raw)
    assert (kind, seq) == (lp.RTM_GETNSID, 4)
    assert payload[:4] == b"\0\0\0\0"  # struct rtgenmsg, AF_UNSPEC, aligned
    assert struct.unpack("=I", lp.parse_attrs(payload[4:])[lp.NETNSA_FD]) == (12,)


def test_parse_link_record():
    rec = lp.parse_link(newlink(5, "eth0", 1400, link=7, link_nsid=2, target=3))
    assert rec == {"index": 5, "name": "eth0", "kind": "veth", "mtu": 1400, "up": True, "master": None,
                   "link": 7, "link_netnsid": 2, "lower": None, "family": None, "target_netnsid": 3}
    lo = lp.parse_link(newlink(1, "lo", 65536, kind=None, link=None, link_nsid=None, target=None,
                               flags=0, ifi_type=lp.ARPHRD_LOOPBACK))
    assert (lo["kind"], lo["up"], lo["link"], lo["target_netnsid"]) == ("loopback", False, None, None)
    with pytest.raises(lp.PeerError):
        lp.parse_link(b"\0" * 8)


def test_truncated_attributes_and_messages_are_dropped():
    whole = attr(lp.IFLA_MTU, struct.pack("=I", 1500))
    assert lp.parse_attrs(whole + struct.pack("=HH", 40, lp.IFLA_IFNAME) + b"eth") == {
        lp.IFLA_MTU: struct.pack("=I", 1500)}
    msg = message(lp.RTM_NEWLINK, 1, newlink(5))
    assert [m[1] for m in lp.parse_messages(msg + msg[:20])] == [1]


def test_parse_nsid_and_errors():
    assert lp.parse_nsid(b"\0" * 4 + attr(lp.NETNSA_NSID, struct.pack("=i", 4))) == 4
    assert lp.parse_nsid(b"\0" * 4 + attr(lp.NETNSA_NSID, struct.pack("=i", -1))) is None  # not assigned
    assert lp.error_of(struct.pack("=i", -errno.EACCES)) == errno.EACCES
    assert lp.describe(lp.PeerError(errno.EACCES, "Permission denied")) == "EACCES: Permission denied"


class FakeSock:
    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    def send(self, data):
        self.sent.append(data)

    def recv(self, _n):
        return self.replies.pop(0)


def reader(replies) -> lp.PeerReader:
    r = lp.PeerReader.__new__(lp.PeerReader)
    r.sock, r._seq = FakeSock(replies), 0
    return r


def test_reader_skips_stale_replies_and_returns_the_peer():
    r = reader([error(0, errno.ENODEV),  # an earlier request's late answer
                message(lp.RTM_NEWLINK, 1, newlink(5, target=3))])
    rec = r.get_link(5, 3)
    assert (rec["name"], rec["mtu"], rec["link"]) == ("eth0", 1500, 7)
    assert lp.parse_messages(r.sock.sent[0])[0][1] == 1


@pytest.mark.parametrize("reply,err", [
    (error(1, errno.EACCES), errno.EACCES),                         # no CAP_NET_ADMIN over it
    (error(1, errno.EINVAL), errno.EINVAL),                         # no such nsid
    (message(lp.RTM_NEWLINK, 1, newlink(5, target=None)), errno.EOPNOTSUPP),  # attribute ignored
    (message(lp.RTM_NEWLINK, 1, newlink(6, target=3)), errno.EOPNOTSUPP),     # someone else's link
])
def test_reader_refusals(reply, err):
    with pytest.raises(lp.PeerError) as exc:
        reader([reply]).get_link(5, 3)
    assert exc.value.errno == err


def test_name_nsids_matches_openable_files_once(tmp_path, monkeypatch):
    files = {name: tmp_path / name for name in ("a", "b", "c")}
    for p in files.values():
        p.write_text("")
    link = tmp_path / "b-again"
    os.link(files["b"], link)  # the same inode under another name is asked once
    order = [str(files["a"]), str(tmp_path / "gone"), str(files["b"]), str(link), str(files["c"])]
    monkeypatch.setattr(lp, "netns_paths", lambda: iter(order))
    nsid_of = {os.stat(files["a"]).st_ino: None, os.stat(files["b"]).st_ino: 4, os.stat(files["c"]).st_ino: 9}
    asked = []

    class R:
        def get_nsid(self, fd):
            ino = os.fstat(fd).st_ino
            asked.append(ino)
            return nsid_of[ino]

    found = lp.name_nsids(R(), {4}, own_inode=None)
    assert found == {4: (os.stat(files["b"]).st_ino, str(files["b"]))}
    assert len(asked) == 2  # stops once every wanted nsid is named: c is never opened
    assert lp.name_nsids(R(), {4, 9}, own_inode=os.stat(files["c"]).st_ino) == found  # own netns skipped
