"""DNS in user space: names and numbers from the protocol, the reference decoder of what the
kernel side (bpf/dns.c) accepts, name privacy, resolv.conf search lists, search-path
amplification, and histogram quantiles.

No kernel or BCC here: the DNS probe and the tests (and a fuzzer holding the kernel parser
to this decoder) import it freely.
"""

from __future__ import annotations

import hashlib
import math
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Iterable

from dpwatch.probes.cdefs import defines

# RFC 1035 and later registrations (IANA "Resource Record (RR) TYPEs"): protocol constants.
QTYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
    17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV",
    35: "NAPTR", 36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS",
    44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID",
    50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS",
    60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS",
    99: "SPF", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR", 255: "ANY", 256: "URI",
    257: "CAA",
}
# RFC 1035, 2136, 6895: the 4-bit header rcode (extended rcodes need EDNS and are not read).
RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI",
}
# The sizes the kernel side uses, from the header both sides read (bpf/dns.h).
_H = defines("dns.h")
HEADER_LEN = _H["DNS_HDR"]           # 12
QTYPE_SLOTS = _H["DNS_QTYPES"]       # values 0..258 by value, 259 = larger ones
QTYPE_OTHER_SLOT = QTYPE_SLOTS - 1
RCODES = _H["DNS_RCODES"]            # 16
BUCKETS = _H["DNS_BUCKETS"]          # 16 finite buckets and the overflow
BUCKET_NS = _H["DNS_BUCKET_NS"]      # 250 us: the first bucket's bound
BUCKET_BOUNDS = tuple(BUCKET_NS / 1e9 * 2 ** b for b in range(BUCKETS - 1))  # seconds: 0.25 ms .. 8.192 s
NAME_WIRE_MAX = _H["DNS_NAME_WIRE_MAX"]  # 255
MAX_LABELS = _H["DNS_MAX_LABELS"]    # the label loop's bound: 127 one-byte labels fill 255 bytes
LABEL_MAX = 63
NAME_KEEP = _H["DNS_NAME_LEN"]       # 128 wire bytes of a name kept in the names LRU
PRIVACY_MODES = ("full", "suffix", "hashed", "off")


def qtype_name(value: int) -> str:
    """Label for a qtype slot: the RFC name, the number, or "other" for the overflow slot."""
    if value >= QTYPE_OTHER_SLOT:
        return "other"
    return QTYPE_NAMES.get(value, str(value))


def rcode_name(value: int) -> str:
    return RCODE_NAMES.get(value, str(value))


# -- the reference decoder ----------------------------------------------------------------

class Malformed(ValueError):
    pass


@dataclass(frozen=True)
class Message:
    id: int
    qr: int          # 0 query, 1 response
    opcode: int
    rcode: int
    qdcount: int
    qtype: int | None
    name_wire: bytes  # the question name on the wire, with its terminating zero (b"" if none)

    @property
    def name(self) -> str:
        return wire_to_text(self.name_wire)


def parse(payload: bytes, sport: int = 12345, dport: int = 53, ports: Iterable[int] = (53,)) -> Message:
    """What bpf/dns.c makes of one UDP payload between ``sport`` and ``dport``: a Message, or
    Malformed with the rule that rejected it. The kernel applies exactly these rules."""
    ports = set(ports)
    if len(payload) < HEADER_LEN:
        raise Malformed(f"shorter than the {HEADER_LEN}-byte header")
    ident, flags, qdcount = struct.unpack("!HHH", payload[:6])
    qr, opcode, rcode = flags >> 15, (flags >> 11) & 0xF, flags & 0xF
    if qdcount > 1 or (qr == 0 and qdcount == 0):
        raise Malformed(f"qdcount {qdcount}")
    if qr == 0 and dport not in ports:
        raise Malformed("a query to a port that is not a DNS port")
    if qr == 1 and sport not in ports:
        raise Malformed("a response from a port that is not a DNS port")
    if qdcount == 0:
        return Message(ident, qr, opcode, rcode, 0, None, b"")
    pos = HEADER_LEN
    for _ in range(MAX_LABELS):
        if pos >= len(payload):
            raise Malformed("the name runs past the datagram")
        n = payload[pos]
        if n == 0:
            break
        if n & 0xC0:
            raise Malformed("compression pointer or reserved label type in the question"
                            if n & 0xC0 == 0xC0 else f"label length {n} > 63")
        pos += n + 1
        if pos - HEADER_LEN + 1 > NAME_WIRE_MAX:
            raise Malformed("name longer than 255 bytes")
    else:
        raise Malformed("more than 127 labels")
    if pos + 5 > len(payload):
        raise Malformed("qtype/qclass cut off")
    qtype = struct.unpack("!H", payload[pos + 1:pos + 3])[0]
    return Message(ident, qr, opcode, rcode, 1, qtype, payload[HEADER_LEN:pos + 1])


def wire_to_text(wire: bytes, full_len: int | None = None) -> str:
    """Wire-format name -> dotted text ("." for the root). Bytes outside printable ASCII and
    dots inside labels are escaped as \\DDD. A name cut at ``len(wire)`` bytes (the kernel keeps
    the first 128) whose full length was ``full_len`` ends in "...". Never raises."""
    if not wire:
        return "."
    labels, pos, cut = [], 0, False
    while pos < len(wire):
        n = wire[pos]
        if n == 0:
            break
        label = wire[pos + 1:pos + 1 + n]
        labels.append(_escape(label))
        if n > LABEL_MAX or len(label) < n:
            cut = True
            break
        pos += n + 1
    else:
        cut = True  # no terminating zero: the kernel kept only the first bytes
    if full_len is not None and full_len > len(wire):
        cut = True
    text = ".".join(labels) if labels else "."
    return text + "..." if cut else text


def _escape(label: bytes) -> str:
    out = []
    for b in label:
        c = chr(b)
        if 0x21 <= b <= 0x7E and c not in ".\\":
            out.append(c.lower())
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def text_to_wire(name: str) -> bytes:
    """Dotted name -> wire format (for tests and tools; no escapes)."""
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            data = label.encode()
            out += bytes([len(data)]) + data
    return out + b"\x00"


# -- privacy ------------------------------------------------------------------------------

class Privacy:
    """Applied to every name before it leaves the daemon (the /diagnose report).

    full: the name as seen; suffix: its last two labels ("*.example.com"); hashed: a keyed
    hash (HMAC-SHA256 with a per-process random key, 12 hex digits), stable for the process's
    life so one name can be followed through a report; off: no names at all (the kernel keeps
    none)."""

    def __init__(self, mode: str, key: bytes | None = None):
        if mode not in PRIVACY_MODES:
            raise ValueError(f"privacy mode {mode!r} is not one of {', '.join(PRIVACY_MODES)}")
        self.mode = mode
        self._key = key if key is not None else os.urandom(16)

    def __call__(self, name: str) -> str | None:
        if self.mode == "off":
            return None
        if self.mode == "full":
            return name
        if self.mode == "suffix":
            labels = [x for x in name.rstrip(".").split(".") if x]
            if len(labels) <= 2:
                return ".".join(labels) or "."
            return "*." + ".".join(labels[-2:])
        digest = hmac.new(self._key, name.lower().encode(), hashlib.sha256).hexdigest()[:12]
        return f"h:{digest}"


# -- search lists and amplification --------------------------------------------------------

def read_search_list(path: str = "/etc/resolv.conf") -> list[str]:
    """The `search` (or older `domain`) domains of a resolv.conf; [] when it is missing. The
    last search/domain line wins, as in glibc."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("search", "domain"):
            found = [p.rstrip(".").lower() for p in parts[1:] if p.strip(".")]
    return found[:32]


def cluster_suffixes(name: str, cluster_domain: str, search: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Every (base, suffix) split of ``name`` where suffix is a search suffix:
    <ns>.svc.<cluster domain>, svc.<cluster domain>, <cluster domain>, or one of the node's
    ``search`` domains. A name can split several ways (api.example.svc.cluster.local is
    api.example under svc.cluster.local, or api under the namespace "example");
    find_amplification picks the split its neighbours agree on."""
    n = name.rstrip(".").lower()
    cd = cluster_domain.strip(".").lower()
    cands = {s.strip(".").lower() for s in search if s.strip(".")}
    cands.update({f"svc.{cd}", cd})
    labels = n.split(".")
    ns_tail = ["svc"] + cd.split(".")
    if len(labels) > len(ns_tail) + 1 and labels[-len(ns_tail):] == ns_tail:
        cands.add(".".join(labels[-len(ns_tail) - 1:]))  # <ns>.svc.<cluster domain>
    out = []
    for suf in cands:
        if n.endswith("." + suf) and len(n) > len(suf) + 1:
            out.append((n[: -len(suf) - 1], suf))
    return sorted(out, key=lambda bs: -len(bs[1]))


@dataclass
class Amplification:
    base: str
    suffixes: dict[str, int]   # suffix -> NXDOMAIN answers in the window
    nxdomain: int


def find_amplification(nx_counts: dict[str, float], cluster_domain: str, search: Iterable[str],
                       min_nxdomain: int) -> list[Amplification]:
    """Bases whose NXDOMAIN answers in a window come from two or more search suffixes (the
    resolver walked its search list: ndots), when these walks add up to at least
    ``min_nxdomain``. The sum is over every walked base, not per base: a pod resolving ten
    external names once each wastes as many queries as one resolving one name ten times.

    Each name goes to the base whose candidate group spans the most suffixes (then the most
    answers), so a walk over default.svc.., svc.. and cluster.local is one group even though
    "<name>.svc.cluster.local" alone also reads as a namespace."""
    search = list(search)
    splits = {name: cluster_suffixes(name, cluster_domain, search) for name in nx_counts}
    cand: dict[str, dict[str, int]] = {}
    for name, opts in splits.items():
        for base, suf in opts:
            cand.setdefault(base, {})
            cand[base][suf] = cand[base].get(suf, 0) + int(nx_counts[name])

    def rank(base: str) -> tuple[int, int]:
        return (len(cand[base]), sum(cand[base].values()))

    groups: dict[str, dict[str, int]] = {}
    for name, opts in splits.items():
        if not opts:
            continue
        base, suf = max(opts, key=lambda bs: rank(bs[0]))
        groups.setdefault(base, {})
        groups[base][suf] = groups[base].get(suf, 0) + int(nx_counts[name])
    out = []
    for base, sufs in groups.items():
        if len(sufs) >= 2:
            out.append(Amplification(base, dict(sorted(sufs.items(), key=lambda kv: (-kv[1], kv[0]))),
                                     sum(sufs.values())))
    if sum(a.nxdomain for a in out) < min_nxdomain:
        return []
    out.sort(key=lambda a: (-a.nxdomain, a.base))
    return out


# -- histograms -------------------------------------------------------------------------

def quantile(buckets: list[float], q: float) -> float | None:
    """Quantile (0..1) of a log2 latency histogram (counts per bucket, BUCKETS of them), in
    seconds, interpolated inside the bucket as Prometheus' histogram_quantile does. The
    overflow bucket answers with its lower bound (8.192 s). None when empty."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(BUCKET_BOUNDS):
                return BUCKET_BOUNDS[-1]
            lo = BUCKET_BOUNDS[i - 1] if i else 0.0
            hi = BUCKET_BOUNDS[i]
            return lo + (hi - lo) * ((rank - seen) / n)
        seen += n
    return BUCKET_BOUNDS[-1]


def count_above(buckets: list[float], seconds: float) -> float:
    """How many latencies of a log2 histogram exceed ``seconds``: every bucket above it, and
    the share of the bucket that holds it above it (linear inside the bucket, as quantile()
    interpolates). The overflow bucket is all above its lower bound."""
    total = 0.0
    for i, n in enumerate(buckets):
        if not n:
            continue
        lo = BUCKET_BOUNDS[i - 1] if i else 0.0
        hi = BUCKET_BOUNDS[i] if i < len(BUCKET_BOUNDS) else math.inf
        if lo >= seconds:
            total += n
        elif hi > seconds:
            total += n * (hi - seconds) / (hi - lo)
    return round(total, 6)  # 16 * 56/128 is 7, not 6.999...


def bucket_of(seconds: float) -> int:
    """The bucket the kernel puts a latency in (the first with seconds <= bound)."""
    ns = int(round(seconds * 1e9))
    if ns <= BUCKET_NS:
        return 0
    return min(((ns - 1) // BUCKET_NS).bit_length(), BUCKETS - 1)
