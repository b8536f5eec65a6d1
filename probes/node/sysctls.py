"""The node audit's sysctls (read in the calling thread's netns), whether tcp_bbr exists, and
the node's memory: the settings and sizes the findings weigh."""

from __future__ import annotations

import glob
import os

from dpwatch.daemon.host import paths, sysctl
from dpwatch.probes.node.facts import SYSCTLS, Facts


def bbr_state(available: str | None) -> str:
    """available (tcp_available_congestion_control lists it), module (a tcp_bbr.ko for this
    kernel) or absent."""
    if "bbr" in (available or "").split():
        return "available"
    release = os.uname().release
    if glob.glob(f"/lib/modules/{release}/kernel/net/ipv4/tcp_bbr.ko*"):
        return "module"
    return "absent"


def meminfo_bytes() -> int | None:
    """MemTotal of /proc/meminfo in bytes."""
    try:
        with open(paths.proc("meminfo")) as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gather_sysctls(facts: Facts) -> None:
    facts.sysctls = {k: sysctl.read(k) for k in SYSCTLS}
    hidden = [k for k, v in facts.sysctls.items() if v is None and k.startswith("net.core.")]
    if hidden:  # global keys that only the initial netns shows (the daemon runs with hostNetwork)
        facts.errors["sysctl"] = f"not visible in this netns: {', '.join(hidden)}"
    facts.bbr = bbr_state(facts.sysctls.get("net.ipv4.tcp_available_congestion_control"))
