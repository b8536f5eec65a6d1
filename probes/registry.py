"""The explicit probe registry: every probe dpwatch knows.

Adding a probe means its folder probes/<name>/ (and bpf/<name>.c, .h with a kernel side) and
one line here (docs/architecture.md walks through it). Nothing registers itself at import time.
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

# The order is that of --help groups and /probes. The manager attaches and collects in the
# order the probes' `needs` give (drops before conntrack and frag), whatever it is here.
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
