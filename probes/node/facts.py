"""What one node audit read (``Facts``), and the small readers of its raw values.

The audit (probes/node/audit.py) fills a Facts in the netns it audits; the findings
(probes/node/findings.py) judge from it and never read the node themselves. A value that
could not be read is None (or missing) and the finding that needs it is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The sysctls the audit reads, in the daemon's netns (net.* keys are per netns where the
# kernel makes them so; the others are global).
SYSCTLS = (
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_count",
    "net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_timestamps", "net.core.netdev_max_backlog",
    "net.core.rmem_max", "net.core.wmem_max", "net.ipv4.tcp_congestion_control",
    "net.ipv4.tcp_available_congestion_control", "net.core.default_qdisc",
    "fs.inotify.max_user_watches", "fs.inotify.max_user_instances",
)


@dataclass
class Facts:
    cpus: int = 1
    mem_bytes: int | None = None
    sysctls: dict[str, str | None] = field(default_factory=dict)
    tcp_states: dict[str, int] = field(default_factory=dict)
    ephemeral_ports_in_use: int = 0        # distinct local ports in the range, not listening
    busiest_destination: dict[str, Any] | None = None  # {"destination", "sockets"}
    netfilter: dict[str, Any] = field(default_factory=dict)
    inotify: dict[str, Any] = field(default_factory=dict)
    overlays: list[dict[str, Any]] = field(default_factory=list)
    fastest_link_mbps: int | None = None
    bbr: str = "absent"                    # available | module | absent
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sysctl_int(self, key: str) -> int | None:
        """A sysctl's first field as an int; None when unread or not a number."""
        return as_int(self.sysctls.get(key))

    def port_range(self) -> tuple[int, int] | None:
        return port_range(self.sysctls.get("net.ipv4.ip_local_port_range"))


def as_int(value: str | None) -> int | None:
    try:
        return int(str(value).split()[0])
    except (TypeError, ValueError, IndexError):
        return None


def port_range(value: str | None) -> tuple[int, int] | None:
    """'32768\\t60999' -> (32768, 60999); None when it is not two ordered numbers."""
    parts = (value or "").split()
    if len(parts) != 2:
        return None
    try:
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return (lo, hi) if lo <= hi else None
