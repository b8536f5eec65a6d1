"""Unit tier: bpf/dns.h, the constants bpf/dns.c and probes/dns/ share: Python reads them
from the header (no copies), the C file defines none of them again, and the names the readings
have always used come out of it unchanged."""

from __future__ import annotations

import re
from importlib import resources

from dpwatch.probes.cdefs import defines
from dpwatch.probes.dns import names as dn
from dpwatch.probes.dns import probe as dns_probe

H = defines("dns.h")
C_SOURCE = resources.files("dpwatch.bpf").joinpath("dns.c").read_text(encoding="utf-8")


def test_stats_names_and_slots():
    # The reading's "stats" keys (and /probes' info) are these names, in slot order.
    assert dns_probe.STATS == ("queries", "responses", "unmatched", "malformed", "duplicate_queries",
                               "duplicate_responses", "retransmits", "packets", "unreadable",
                               "duplicate_malformed")
    assert len(dns_probe.STATS) <= H["DNS_STATS"]
    assert all(H[f"DNS_ST_{name.upper()}"] == i for i, name in enumerate(dns_probe.STATS))


def test_python_sizes_are_the_headers():
    assert (dn.HEADER_LEN, dn.QTYPE_SLOTS, dn.RCODES, dn.BUCKETS, dn.NAME_KEEP, dn.NAME_WIRE_MAX,
            dn.MAX_LABELS) == (H["DNS_HDR"], H["DNS_QTYPES"], H["DNS_RCODES"], H["DNS_BUCKETS"],
                               H["DNS_NAME_LEN"], H["DNS_NAME_WIRE_MAX"], H["DNS_MAX_LABELS"])
    assert dn.BUCKET_BOUNDS[0] * 1e9 == H["DNS_BUCKET_NS"] and len(dn.BUCKET_BOUNDS) == dn.BUCKETS - 1
    assert dns_probe.DEDUP_NS == H["DNS_DEDUP_NS"] == 100_000_000


def test_dns_c_defines_none_of_the_header_constants():
    redefined = set(re.findall(r"^\s*#\s*define\s+(\w+)", C_SOURCE, re.M)) & set(H)
    assert not redefined, f"bpf/dns.c defines {sorted(redefined)} again: they live in bpf/dns.h"


def test_every_stats_slot_dns_c_counts_is_in_the_header():
    used = set(re.findall(r"\bDNS_ST_\w+", C_SOURCE))
    assert used and used <= set(H), sorted(used - set(H))
