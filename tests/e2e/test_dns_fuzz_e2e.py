"""End-to-end: Hypothesis sends random and malformed DNS datagrams from a pod to the node's
port 53, through the real kernel filter of the real daemon (`dpwatch run --probes dns`), one
datagram per example, and checks the counters after each one exactly:

- a valid query (built by dnspython, any name and qtype) adds exactly 1 to
  dpwatch_dns_queries_total (for its qtype) and 0 to dpwatch_dns_malformed_packets_total;
- a malformed datagram (too short, qdcount 0 or > 1, the response bit from a client port, a
  compression pointer or reserved label type in the question, a label > 63, a name > 255
  bytes, a question cut short) adds exactly 1 to malformed and 0 to queries;
- random bytes are classified by `expected()`, a reference written from the rules documented
  in bpf/dns.c, and must be counted exactly as it says.

Each datagram comes from a new socket (a new source port), so no two are the same query or the
same malformed datagram.
"""

from __future__ import annotations

import itertools
import random
import socket
import struct
import time

import dns.message
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netlab import Lab, in_netns
from test_daemon_e2e import DaemonProc, metric

# The same parser runs on every kernel (the guest runs the malformed cases of test_dns_kernel.py): host only, for time.
pytestmark = pytest.mark.host_only

PORT = 9461
COUNT = {"sent": 0, "valid": 0, "malformed": 0}
QTYPES = ["A", "AAAA", "MX", "TXT", "SRV", "PTR", "NS", "CNAME", "SOA", "CAA", "HTTPS", "SVCB"]


def expected(payload: bytes) -> str:
    """'query' or 'malformed' for a datagram from a client port to port 53 (bpf/dns.c rules)."""
    dlen = len(payload)
    if dlen < 12:
        return "malformed"
    qr = payload[2] >> 7
    qdcount = struct.unpack("!H", payload[4:6])[0]
    if qdcount > 1 or (qr == 0 and qdcount == 0):
        return "malformed"
    if qr == 1:  # a response bit from a client port
        return "malformed"
    pos, done = 12, False
    for _ in range(128):
        if pos >= dlen:
            break
        length = payload[pos]
        if length == 0:
            done = True
            break
        if length & 0xC0:
            break
        pos += length + 1
        if pos - 12 + 1 > 255:
            break
    if not done or pos + 1 + 4 > dlen:
        return "malformed"
    return "query"


# ---- strategies -------------------------------------------------------------------------------

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63)
names = st.lists(label, min_size=1, max_size=6).map(lambda ls: ".".join(ls) + ".").filter(
    lambda n: len(n) <= 253)


@st.composite
def valid_query(draw):
    q = dns.message.make_query(draw(names), draw(st.sampled_from(QTYPES)),
                               use_edns=draw(st.booleans()))
    q.id = draw(st.integers(0, 0xFFFF))
    return q.to_wire(), "query", q.question[0].rdtype


def header(qid, flags, qd, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


@st.composite
def malformed(draw):
    base = dns.message.make_query(draw(names), "A", use_edns=False).to_wire()
    kind = draw(st.sampled_from(["short", "qd0", "qd2", "qr", "pointer", "reserved", "long_label",
                                 "long_name", "cut"]))
    qid = draw(st.integers(0, 0xFFFF))
    if kind == "short":
        wire = draw(st.binary(max_size=11))
    elif kind == "qd0":
        wire = header(qid, 0x0100, 0) + base[12:]
    elif kind == "qd2":
        wire = header(qid, 0x0100, draw(st.integers(2, 0xFFFF))) + base[12:]
    elif kind == "qr":
        wire = header(qid, 0x8180, draw(st.integers(0, 1))) + base[12:]
    elif kind == "pointer":
        wire = header(qid, 0x0100, 1) + b"\x03abc\xc0\x0c" + b"\x00\x01\x00\x01"
    elif kind == "reserved":
        wire = header(qid, 0x0100, 1) + bytes([draw(st.sampled_from([0x40, 0x7F, 0x80, 0xBF]))]) + b"x" * 70 + b"\x00\x00\x01\x00\x01"
    elif kind == "long_label":
        n = draw(st.integers(64, 191))  # a length byte above 63 has a reserved type bit set
        wire = header(qid, 0x0100, 1) + bytes([n]) + b"a" * n + b"\x00\x00\x01\x00\x01"
    elif kind == "long_name":
        wire = header(qid, 0x0100, 1) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01"
    else:  # the question cut short anywhere
        wire = base[: draw(st.integers(12, len(base) - 1))]
    return wire, "malformed", None


random_bytes = st.binary(min_size=0, max_size=600).map(lambda b: (b, expected(b), None))
# Random header + question-shaped bytes: these reach the label walk far more often.
shaped = st.tuples(st.integers(0, 0xFFFF), st.sampled_from([0x0100, 0x0000, 0x8180]),
                   st.integers(0, 2), st.binary(max_size=300)).map(
    lambda t: (header(t[0], t[1], t[2]) + t[3], expected(header(t[0], t[1], t[2]) + t[3]), None))


# ---- the daemon and the counters ----------------------------------------------------------------

@pytest.fixture(scope="module")
def dns_daemon(dpwatch_bin):
    with Lab(pods=1) as lab:
        d = DaemonProc(dpwatch_bin, lab.node, PORT, "--probes", "dns")
        try:
            d.wait_ready()
            yield lab, d
        finally:
            assert d.stop() == 0


IDS = itertools.cycle(range(1, 0x10000))


def counters(d) -> tuple[float, float, str]:
    text = d.get("/metrics")[2]
    return (metric(text, "dpwatch_dns_queries_total"), metric(text, "dpwatch_dns_malformed_packets_total"),
            text)


def send(lab, payload: bytes, v6: bool) -> None:
    fam, dst = (socket.AF_INET6, lab.pod.node_ip6) if v6 else (socket.AF_INET, lab.pod.node_ip4)

    def go():
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.sendto(payload, (dst, 53))
        finally:
            s.close()
    in_netns(lab.pod.ns, go)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=st.one_of(valid_query(), malformed(), random_bytes, shaped), v6=st.booleans())
def _fuzz_one(dns_daemon_box, case, v6):
    lab, d = dns_daemon_box
    payload, want, rdtype = case
    assert expected(payload) == want, (payload, want)  # the generator and the reference agree
    # A fresh DNS id for every datagram sent: the kernel counts a second sighting of the same
    # (client, server, id) within 100 ms once (it is the same query seen on another interface),
    # and Hypothesis replays an example back to back while it shrinks. The id never decides
    # whether a message is malformed; the reference is asked again all the same.
    if len(payload) >= 2:
        payload = next(IDS).to_bytes(2, "big") + payload[2:]
        want = expected(payload)
    q0, m0, text0 = counters(d)
    send(lab, payload, v6)
    deadline = time.monotonic() + 2
    while True:
        q1, m1, text1 = counters(d)
        if q1 + m1 > q0 + m0 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    COUNT["sent"] += 1
    COUNT["valid" if want == "query" else "malformed"] += 1
    if want == "query":
        assert (q1 - q0, m1 - m0) == (1, 0), payload
        name = dns.rdatatype.to_text(rdtype) if rdtype is not None else None
        if name in QTYPES:
            assert (metric(text1, "dpwatch_dns_queries_total", qtype=name)
                    - metric(text0, "dpwatch_dns_queries_total", qtype=name)) == 1
    else:
        assert (q1 - q0, m1 - m0) == (0, 1), payload


def test_random_and_malformed_dns_through_the_kernel_filter(dns_daemon):
    _fuzz_one(dns_daemon)
    print(f"\nDNS datagrams fuzzed through the kernel: {COUNT['sent']} "
          f"({COUNT['valid']} valid queries, {COUNT['malformed']} malformed)")
    assert COUNT["sent"] >= 100 and COUNT["valid"] and COUNT["malformed"]


def test_reference_agrees_with_dnspython_on_valid_queries():
    rng = random.Random(7)
    for _ in range(200):
        name = ".".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 20)))
                        for _ in range(rng.randint(1, 5))) + "."
        assert expected(dns.message.make_query(name, rng.choice(QTYPES)).to_wire()) == "query"
