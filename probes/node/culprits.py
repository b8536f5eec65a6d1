"""Which listeners overflowed in a report window (pure): the window's view of the listen queues
(``ListenWindow``) and the listeners it names (``Culprit``), for node.listen_queue_overflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpwatch.probes.node.listeners import Listener, ListenSample


@dataclass
class ListenWindow:
    """A report window's view of the listen queues: the netns counters' deltas (TcpExt
    ListenOverflows and ListenDrops, Tcp PassiveOpens), each socket's drops in the window
    ({inode: n}, from the reading's counters) and the fresh sample."""
    seconds: float
    overflows: int = 0
    drops: int = 0
    passive_opens: int = 0
    socket_drops: dict[int, int] = field(default_factory=dict)
    sample: ListenSample | None = None

    @property
    def somaxconn(self) -> int | None:
        return self.sample.somaxconn if self.sample else None


@dataclass
class Culprit:
    listener: Listener
    drops_in_window: int
    tracked: dict[str, Any]
    owners: list[tuple[int, str]] | None   # None: not looked up (yet)
    capped: bool | None                    # None: somaxconn unknown
    basis: str                             # "socket drops" | "seen full"

    def who(self) -> str:
        """'198.18.0.1:80 (nginx, pids 10, 11)': the endpoint and, when known, its owners."""
        if not self.owners:
            return self.listener.endpoint
        by_comm: dict[str, list[int]] = {}
        for pid, comm in self.owners:
            by_comm.setdefault(comm, []).append(pid)
        names = "; ".join(f"{comm}, pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"
                          for comm, pids in by_comm.items())
        return f"{self.listener.endpoint} ({names})"

    def evidence(self) -> dict[str, Any]:
        x, t = self.listener, self.tracked
        ev: dict[str, Any] = {"listener": x.endpoint, "process": None}
        if self.owners:
            ev["process"] = {"pid": self.owners[0][0], "comm": self.owners[0][1]}
            if len(self.owners) > 1:
                ev["other_pids"] = [pid for pid, _ in self.owners[1:]]
        ev.update({
            "effective_backlog": x.backlog, "queue_now": x.queue, "full_now": x.full,
            "capped_by_somaxconn": self.capped, "socket_drops_in_window": self.drops_in_window,
            "attributed_by": self.basis, "queue_peak_seen": max(t.get("queue_peak", 0), x.queue),
            "last_full_seconds_ago": 0.0 if x.full else t.get("last_full_seconds_ago"),
        })
        return ev


def culprits(lw: ListenWindow) -> list[Culprit]:
    """The listeners whose queues overflowed in the window, likeliest first: those whose own
    drop counter grew (exact attribution); when none did (the socket closed since, or the
    kernel gives no SKMEMINFO), those a sample found full in the window or that are full now."""
    s = lw.sample
    if s is None:
        return []

    def make(x: Listener, basis: str) -> Culprit:
        capped = None if s.somaxconn is None else x.backlog == s.somaxconn
        return Culprit(x, int(lw.socket_drops.get(x.inode, 0)), s.tracked.get(x.inode, {}),
                       s.owners.get(x.inode), capped, basis)

    dropped = [make(x, "socket drops") for x in s.listeners if lw.socket_drops.get(x.inode, 0) > 0]
    if dropped:
        return sorted(dropped, key=lambda c: (-c.drops_in_window, c.listener.endpoint))

    def seen_full(x: Listener) -> bool:
        age = s.tracked.get(x.inode, {}).get("last_full_seconds_ago")
        return x.full or (age is not None and age <= lw.seconds)
    full = [make(x, "seen full") for x in s.listeners if seen_full(x)]
    return sorted(full, key=lambda c: (not c.listener.full, -c.listener.queue, c.listener.endpoint))
