"""The explicit probe registry: every probe dpwatch knows, in load order.

Adding a probe means adding bpf/<name>.c (if it has a kernel side), probes/<name>.py, and
one line here. Nothing registers itself at import time.
"""

from __future__ import annotations

from dpwatch.probes.base import Probe
from dpwatch.probes.conntrack.probe import ConntrackProbe
from dpwatch.probes.dns.probe import DnsProbe
from dpwatch.probes.drops.probe import DropsProbe
from dpwatch.probes.frag.probe import FragProbe
from dpwatch.probes.mtu.probe import MtuProbe
from dpwatch.probes.node.probe import NodeProbe
from dpwatch.probes.softirq.probe import SoftirqProbe

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
