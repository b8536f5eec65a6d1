"""The explicit probe registry: every probe dpwatch knows, in load order.

Adding a probe means adding bpf/<name>.c (if it has a kernel side), probes/<name>.py, and
one line here. Nothing registers itself at import time.
"""

from __future__ import annotations

from .base import Probe
from .conntrack import ConntrackProbe
from .dns import DnsProbe
from .drops import DropsProbe
from .frag import FragProbe
from .mtu import MtuProbe
from .node import NodeProbe
from .softirq import SoftirqProbe

# Order matters: a probe may use an earlier probe's data (conntrack's correlated mode reads
# the drops probe's NETFILTER_DROP count), so providers come first.
PROBES: tuple[type[Probe], ...] = (
    DropsProbe,
    ConntrackProbe,
    FragProbe,
    MtuProbe,
    DnsProbe,
    SoftirqProbe,
    NodeProbe,
)


def probe_names() -> list[str]:
    return [p.name for p in PROBES]
