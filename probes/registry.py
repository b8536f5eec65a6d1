"""The explicit probe registry: every probe dpwatch knows, in load order.

Adding a probe means adding bpf/<name>.c (if it has a kernel side), probes/<name>.py, and
one line here. Nothing registers itself at import time.
"""

from __future__ import annotations

from .base import Probe
from .drops import DropsProbe

PROBES: tuple[type[Probe], ...] = (
    DropsProbe,
)


def probe_names() -> list[str]:
    return [p.name for p in PROBES]
