"""bpf/drops.h is the one place of the constants the drops probe's C and Python sides
share: Python reads them from it and bpf/drops.c defines none of them itself."""

from __future__ import annotations

import re

from dpwatch.daemon.config import Config
from dpwatch.probes import cdefs
from dpwatch.probes.drops import probe as drops_mod
from dpwatch.probes.drops.probe import DropsProbe, protocol_name

# -- constants shared with bpf/drops.c (bpf/drops.h) --------------------------------------------

def test_protocol_classes_and_loc_exact_come_from_the_header():
    d = cdefs.defines("drops.h")
    assert drops_mod.PROTOCOLS == ("ipv4", "ipv6", "arp", "other")
    assert len(drops_mod.PROTOCOLS) == d["DROPS_PCLASSES"]
    assert [d[f"DROPS_PCLASS_{p.upper()}"] for p in drops_mod.PROTOCOLS] == [0, 1, 2, 3]
    assert drops_mod.LOC_EXACT == d["DROPS_LOC_EXACT"] == 64
    assert [protocol_name(i) for i in range(6)] == ["ipv4", "ipv6", "arp", "other", "other", "other"]


def test_the_c_source_defines_no_header_constant():
    c_text = cdefs.header_text("drops.c")
    for name in cdefs.defines("drops.h"):
        assert not re.search(rf"#\s*define\s+{name}\b", c_text), f"{name} is defined in drops.c too"
        assert re.search(rf"\b{name}\b", c_text), f"{name} is not used by drops.c"
    assert DropsProbe(Config()).source_text().startswith(cdefs.header_text("drops.h"))
