"""What the softirq findings need from the node besides the counters (``NodeFacts``), read in
collect() and carried in the reading's "info" (fresh readings only: the snapshot ring drops
it), so the findings never read the node themselves.

The sysctls are read at every collect (their values are evidence). The rest only shapes
remediation text and costs more (ksoftirqd's pids are a scan of /proc), so it is read again
at most every SLOW_REFRESH_SECONDS.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from dpwatch.daemon.host import node
from dpwatch.daemon.host import paths
from dpwatch.daemon.host import procnet
from dpwatch.daemon.host import sysctl

SYSCTLS = ("net.core.netdev_max_backlog", "net.core.netdev_budget", "net.core.netdev_budget_usecs")
SLOW_REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class NodeFacts:
    """A value that could not be read is None (sysctls outside the host's netns) or missing."""
    cpus: int = 1
    sysctls: dict[str, int | None] = field(default_factory=dict)
    default_device: str | None = None
    rx_queues: dict[str, int] = field(default_factory=dict)   # device -> rx-* queues
    ksoftirqd: dict[int, int] = field(default_factory=dict)   # cpu -> pid
    node: str = "<node>"

    def sysctl(self, key: str) -> int | None:
        return self.sysctls.get(key)

    def queues(self, dev: str) -> int:
        return self.rx_queues.get(dev) or 1


def rx_queue_count(dev: str) -> int:
    """The device's rx-* queues under /sys/class/net (1 when they cannot be listed)."""
    try:
        return sum(1 for q in os.listdir(paths.sys("class", "net", dev, "queues")) if q.startswith("rx-")) or 1
    except OSError:
        return 1


def default_device() -> str | None:
    text = procnet.read_text(paths.proc("net", "route"))
    return procnet.default_route_device(text) if text else None


class FactsReader:
    """Reads NodeFacts for collect(): sysctls each time, the rest cached for ``refresh`` s."""

    def __init__(self, refresh: float = SLOW_REFRESH_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.refresh, self.clock = refresh, clock
        self._at: float | None = None
        self._slow: dict = {}
        self._queues: dict[str, int] = {}   # bounded: emptied at every slow refresh

    def _refresh_slow(self) -> None:
        now = self.clock()
        if self._at is not None and now - self._at < self.refresh:
            return
        self._at = now
        self._queues = {}
        self._slow = {"cpus": os.cpu_count() or 1, "default_device": default_device(),
                      "ksoftirqd": procnet.ksoftirqd_pids(), "node": node.node_name()}

    def read(self, devices: Iterable[str] = ()) -> NodeFacts:
        """The facts, with the rx queue counts of ``devices`` and of the default device."""
        self._refresh_slow()
        wanted = set(devices)
        if self._slow["default_device"]:
            wanted.add(self._slow["default_device"])
        for dev in wanted - self._queues.keys():
            self._queues[dev] = rx_queue_count(dev)
        return NodeFacts(sysctls={k: sysctl.read_int(k) for k in SYSCTLS},
                         rx_queues={d: self._queues[d] for d in sorted(wanted)}, **self._slow)
