"""bpf/conntrack.h is the one place of the constants the conntrack probe's C and Python
sides share: Python reads them from it and bpf/conntrack.c defines none of them itself."""

from __future__ import annotations

import re

from dpwatch.daemon.config import Config
from dpwatch.probes import cdefs
from dpwatch.probes.conntrack.probe import EVENTS, ConntrackProbe

# -- constants shared with bpf/conntrack.c (bpf/conntrack.h) ------------------------------------

def test_events_come_from_the_header():
    d = cdefs.defines("conntrack.h")
    assert EVENTS == ("table_full", "early_drop")
    assert (d["CT_EV_TABLE_FULL"], d["CT_EV_EARLY_DROP"], d["CT_EVENTS"]) == (0, 1, len(EVENTS))
    assert d["CT_INFLIGHT_MAX"] == 4096


def test_the_c_source_defines_no_header_constant():
    c_text = cdefs.header_text("conntrack.c")
    for name in cdefs.defines("conntrack.h"):
        assert not re.search(rf"#\s*define\s+{name}\b", c_text), f"{name} is defined in conntrack.c too"
        assert re.search(rf"\b{name}\b", c_text), f"{name} is not used by conntrack.c"
    source = ConntrackProbe(Config()).source_text()
    assert source.startswith(cdefs.header_text("conntrack.h"))
