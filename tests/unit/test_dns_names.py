"""Unit tier: probes/dns/names.py, the DNS probe's protocol side without a kernel: the
reference decoder the kernel parser mirrors, names and their labels, privacy modes,
resolv.conf search lists, search-path detection and histogram buckets and quantiles."""

from __future__ import annotations

import struct

import pytest

from dpwatch.probes.dns import names as dn

HDR_Q = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]


def q(name: str, qtype: int = 1) -> bytes:
    return HDR_Q + dn.text_to_wire(name) + struct.pack("!HH", qtype, 1)


# -- decoder ----------------------------------------------------------------------------

def test_parse_query_and_response():
    m = dn.parse(q("www.Example.com", 28))
    assert (m.id, m.qr, m.rcode, m.qtype, m.name) == (0xBEEF, 0, 0, 28, "www.example.com")
    resp = struct.pack("!HHHHHH", 7, 0x8183, 1, 0, 0, 0) + dn.text_to_wire("nx.test") + b"\x00\x01\x00\x01"
    m = dn.parse(resp, sport=53, dport=40000)
    assert (m.qr, m.rcode, m.name) == (1, 3, "nx.test")
    # a response without a question (FORMERR style) is still a response
    assert dn.parse(struct.pack("!HHHHHH", 7, 0x8001, 0, 0, 0, 0), sport=53, dport=1).qdcount == 0
    # the root name
    assert dn.parse(HDR_Q + b"\x00\x00\x02\x00\x01").name == "."


@pytest.mark.parametrize("payload,why", [
    (b"", "12-byte"),
    (HDR_Q[:11], "12-byte"),
    (HDR_Q + b"\xc0\x0c\x00\x01\x00\x01", "compression pointer"),
    (HDR_Q + b"\x01a\xc0\x0e\x00\x01\x00\x01", "compression pointer"),
    (HDR_Q + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "label length 64"),
    (HDR_Q + b"\x80abc\x00\x00\x01\x00\x01", "label length 128"),
    (HDR_Q + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "longer than 255"),
    (HDR_Q + b"\x05abc", "runs past"),
    (HDR_Q + b"\x03abc\x00\x00\x01", "cut off"),
    (struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0), "qdcount 0"),
    (struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + b"\x00" * 10, "qdcount 2"),
])
def test_parse_rejects(payload, why):
    with pytest.raises(dn.Malformed, match=why):
        dn.parse(payload)


def test_name_of_exactly_255_bytes_is_accepted_and_256_is_not():
    # 3 labels of 63 + one of 61: 4*1 + 63*3 + 61 + 1 (root) = 255
    ok = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(dn.text_to_wire(ok)) == 255
    assert dn.parse(q(ok)).name == ok
    bad = ".".join(["a" * 63] * 3 + ["b" * 62])
    with pytest.raises(dn.Malformed, match="255"):
        dn.parse(q(bad))


def test_ports_decide_direction():
    with pytest.raises(dn.Malformed, match="query to a port"):
        dn.parse(q("a.test"), sport=53, dport=40000)
    resp = struct.pack("!HHHHHH", 7, 0x8180, 1, 0, 0, 0) + dn.text_to_wire("a") + b"\x00\x01\x00\x01"
    with pytest.raises(dn.Malformed, match="response from a port"):
        dn.parse(resp, sport=40000, dport=53)
    assert dn.parse(q("a.test"), dport=5353, ports=(53, 5353)).name == "a.test"


def test_wire_to_text_escapes_and_truncation():
    assert dn.wire_to_text(b"\x03a.b\x03com\x00") == "a\\046b.com"
    assert dn.wire_to_text(b"\x03ABC\x00") == "abc"
    assert dn.wire_to_text(b"") == "."
    # the kernel keeps 128 bytes of a longer name
    long = dn.text_to_wire(".".join(["x" * 40] * 5))
    assert dn.wire_to_text(long[:128], len(long)).endswith("...")
    assert dn.wire_to_text(b"\x05ab") == "ab..."


def test_qtype_and_rcode_labels_are_bounded():
    assert dn.qtype_name(1) == "A" and dn.qtype_name(28) == "AAAA" and dn.qtype_name(65) == "HTTPS"
    assert dn.qtype_name(200) == "200" and dn.qtype_name(dn.QTYPE_OTHER_SLOT) == "other"
    assert dn.rcode_name(3) == "NXDOMAIN" and dn.rcode_name(15) == "15"


# -- privacy ----------------------------------------------------------------------------

def test_privacy_modes():
    name = "api.payments.example.com"
    assert dn.Privacy("full")(name) == name
    assert dn.Privacy("suffix")(name) == "*.example.com"
    assert dn.Privacy("suffix")("example.com") == "example.com"
    h = dn.Privacy("hashed", key=b"k")
    assert h(name) == h(name.upper()) and h(name).startswith("h:") and "example" not in h(name)
    assert dn.Privacy("hashed", key=b"other")(name) != h(name)
    assert dn.Privacy("off")(name) is None
    with pytest.raises(ValueError):
        dn.Privacy("partial")


# -- search lists and amplification ---------------------------------------------------------

def test_read_search_list(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text("nameserver 10.96.0.10\ndomain old.example\n# search commented.out\n"
                 "search ns1.svc.cluster.local svc.cluster.local cluster.local ec2.internal.\n"
                 "options ndots:5\n")
    assert dn.read_search_list(str(p)) == ["ns1.svc.cluster.local", "svc.cluster.local",
                                           "cluster.local", "ec2.internal"]
    assert dn.read_search_list(str(tmp_path / "missing")) == []


def test_amplification_groups_a_search_walk():
    nx = {f"api.example.{s}": 5 for s in SEARCH}
    nx["other.example.cluster.local"] = 30       # one suffix only: a wrong name, not a walk
    nx["db.internal.corp"] = 50                  # under no search suffix
    amp = dn.find_amplification(nx, "cluster.local", [], 10)
    assert [(a.base, a.nxdomain, sorted(a.suffixes)) for a in amp] == [
        ("api.example", 15, sorted(SEARCH))]


def test_amplification_with_node_search_list_and_threshold():
    nx = {"redis.ec2.internal": 4, "redis.corp.example": 4, "redis.cluster.local": 4}
    assert dn.find_amplification(nx, "cluster.local", ["ec2.internal", "corp.example"], 12)[0].nxdomain == 12
    assert dn.find_amplification(nx, "cluster.local", ["ec2.internal", "corp.example"], 13) == []
    assert dn.find_amplification(nx, "cluster.local", [], 2) == []  # only one known suffix


def test_amplification_sums_walks_over_names():
    """Ten external names walked once each (3 NXDOMAIN apiece) waste as much as one name walked
    ten times: the threshold is on the walks together; a name seen under one suffix is no walk."""
    nx = {f"api{i}.example.{s}": 1 for i in range(4) for s in SEARCH}
    nx["kubernetes.default.default.svc.cluster.local"] = 40   # one suffix, then it answered
    amp = dn.find_amplification(nx, "cluster.local", [], 12)
    assert sorted((a.base, a.nxdomain) for a in amp) == [(f"api{i}.example", 3) for i in range(4)]
    assert dn.find_amplification(nx, "cluster.local", [], 13) == []


def test_namespace_suffix_for_another_cluster_domain():
    splits = dn.cluster_suffixes("web.shop.svc.k8s.example", "k8s.example")
    assert ("web", "shop.svc.k8s.example") in splits and ("web.shop", "svc.k8s.example") in splits


# -- histograms -------------------------------------------------------------------------

def test_buckets_match_the_kernel_rule():
    assert dn.BUCKET_BOUNDS[0] == 0.00025 and dn.BUCKET_BOUNDS[-1] == pytest.approx(8.192)
    assert dn.bucket_of(0.00025) == 0 and dn.bucket_of(0.000251) == 1
    assert dn.bucket_of(0.3) == 11 and dn.BUCKET_BOUNDS[11] == pytest.approx(0.512)
    assert dn.bucket_of(100) == dn.BUCKETS - 1


def test_quantile():
    b = [0] * dn.BUCKETS
    assert dn.quantile(b, 0.99) is None
    b[11] = 100
    assert dn.BUCKET_BOUNDS[10] < dn.quantile(b, 0.5) <= dn.BUCKET_BOUNDS[11]
    b[0] = 900
    assert dn.quantile(b, 0.5) <= dn.BUCKET_BOUNDS[0]
    assert dn.quantile(b, 0.99) > dn.BUCKET_BOUNDS[10]
