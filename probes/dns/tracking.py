"""What the DNS probe keeps in user space between readings: the per-server labels and
counters (folded into at most --dns-top-servers labels plus "other"), the timeout sweep of the
pending-queries LRU, and the history of name counts that /diagnose windows read.

Each part takes the kernel tables (or their contents) as arguments and holds its own lock;
nothing here reads a file.
"""

from __future__ import annotations

import collections
import ipaddress
import threading
import time

from dpwatch.probes.base import counter_delta
from dpwatch.probes.dns import names as dn

ANSWERED_KEEP_NS = 1_000_000_000  # answered entries are swept after this (well past DNS_DEDUP_NS)
NAME_HISTORY_MAX = 20_000  # (interval, name) counts kept for windows (~500 B each, ~10 MiB); oldest dropped first


def addr_text(raw: bytes, family: int) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(bytes(raw[12:16])))
    return str(ipaddress.IPv6Address(bytes(raw)))


def server_label(raw: bytes, port: int, family: int) -> str:
    a = addr_text(raw, family)
    if port == 53:
        return a
    return f"{a}:{port}" if family == 4 else f"[{a}]:{port}"


def _server_key(raw: bytes, port: int, family: int) -> bytes:
    return raw + port.to_bytes(2, "big") + bytes([family])


class ServerFolding:
    """Per-server counters under stable labels: the first ``top`` servers seen (the busiest
    of a pass first) get their own label, every later one is "other"."""

    def __init__(self, top: int, entries: int):
        self.top = int(top)
        self.entries = int(entries)   # the kernel LRU's size: bounds the last values kept
        self._lock = threading.Lock()
        self._label: dict[bytes, str] = {}
        self._last: dict[bytes, tuple] = {}
        self._acc: dict[str, dict] = {}

    def label_for(self, raw: bytes, port: int, family: int) -> str:
        k = _server_key(raw, port, family)
        with self._lock:
            label = self._label.get(k)
            if label is None and len(set(self._label.values())) < self.top:
                label = self._label[k] = server_label(raw, port, family)
            return label or "other"

    def fold(self, table) -> None:
        """Add what the per-CPU dns_servers LRU counted since the last pass."""
        rows = []
        for key, per_cpu in table.items():
            q = sum(int(v.queries) for v in per_cpu)
            lat = sum(int(v.latency_ns) for v in per_cpu)
            rc = tuple(sum(int(v.rcodes[i]) for v in per_cpu) for i in range(dn.RCODES))
            rows.append((bytes(key.addr), int(key.port), int(key.family), q, lat, rc))
        rows.sort(key=lambda r: -r[3])  # busiest first: they get the free labels
        for raw, port, family, q, lat, rc in rows:
            self._add(raw, port, family, q, lat, rc)
        if len(self._last) > 4 * self.entries:
            with self._lock:  # keys long gone from the LRU: forget their last values
                present = {_server_key(r[0], r[1], r[2]) for r in rows}
                self._last = {k: v for k, v in self._last.items() if k in present}

    def _add(self, raw: bytes, port: int, family: int, q: int, lat: int, rc: tuple) -> None:
        k = _server_key(raw, port, family)
        label = self.label_for(raw, port, family)
        with self._lock:
            last = self._last.get(k)
            if last is None or q < last[0] or lat < last[1]:
                last = (0, 0, (0,) * dn.RCODES)  # new, or evicted from the LRU and re-added
            acc = self._acc.setdefault(label, {"queries": 0, "latency": 0,
                                               "rcodes": [0] * dn.RCODES})
            acc["queries"] += q - last[0]
            acc["latency"] += lat - last[1]
            for i in range(dn.RCODES):
                acc["rcodes"][i] += max(0, rc[i] - last[2][i])
            self._last[k] = (q, lat, rc)

    def counters(self) -> tuple[dict, dict, dict]:
        """(queries by label, latency seconds by label, responses by (label, rcode name))."""
        with self._lock:
            srv_q = {lab: a["queries"] for lab, a in self._acc.items()}
            srv_lat = {lab: a["latency"] / 1e9 for lab, a in self._acc.items()}
            srv_r = {(lab, dn.rcode_name(i)): n for lab, a in self._acc.items()
                     for i, n in enumerate(a["rcodes"]) if n}
        return srv_q, srv_lat, srv_r


class TimeoutSweep:
    """Queries unanswered after --dns-timeout are timeouts: counted per server label and
    deleted from the pending LRU; answered entries are deleted once no second sighting of
    their response can come."""

    def __init__(self, timeout_seconds: float, servers: ServerFolding):
        self.limit_ns = int(timeout_seconds * 1e9)
        self.servers = servers
        self.total = 0
        self.swept_answered = 0
        self.last_sweep = 0.0
        self._by_server: dict[str, int] = {}
        self._lock = threading.Lock()   # the sampler's pass and a report's fresh reading

    def sweep(self, table, now_ns: int | None = None) -> int:
        """One pass over dns_pending; returns the number of timeouts found."""
        with self._lock:  # two sweeps at once would count one query twice
            now = time.monotonic_ns() if now_ns is None else now_ns
            found, dead = 0, []
            for key, val in table.items():
                if val.answered_ns:
                    if now - int(val.answered_ns) > ANSWERED_KEEP_NS:
                        dead.append(key)
                    continue
                if now - int(val.ts) >= self.limit_ns:
                    dead.append(key)
                    label = self.servers.label_for(bytes(key.server), int(key.sport), int(key.family))
                    self._by_server[label] = self._by_server.get(label, 0) + 1
                    self.total += 1
                    found += 1
            for key in dead:
                try:
                    del table[key]
                except KeyError:
                    pass
            self.swept_answered += len(dead) - found
            self.last_sweep = time.monotonic()
            return found

    def by_server(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_server)


class NameHistory:
    """Per-interval deltas of the names LRU's cumulative counts, for windows up to
    ``max_window`` seconds, at most NAME_HISTORY_MAX (interval, name) counts (oldest
    intervals dropped first)."""

    def __init__(self, max_window: float):
        self.max_window = float(max_window)
        self.intervals: collections.deque = collections.deque()   # (monotonic time, {key: delta})
        self.size = 0
        self._last: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def record(self, current: dict[tuple, int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            d = {k: v for k, v in counter_delta(self._last, current).items() if v}
            self._last = current
            if d:
                self.intervals.append((now, d))
                self.size += len(d)
            horizon = now - self.max_window - 10
            while self.intervals and (self.intervals[0][0] < horizon or self.size > NAME_HISTORY_MAX):
                _, old = self.intervals.popleft()
                self.size -= len(old)

    def in_window(self, current: dict[tuple, int], seconds: float) -> dict[tuple, int]:
        """Counts over the last ``seconds``: the recorded intervals plus what ``current`` (the
        LRU read now) adds since the last record."""
        since = time.monotonic() - seconds
        out: dict[tuple, int] = {}
        with self._lock:
            for at, d in self.intervals:
                if at >= since:
                    for k, v in d.items():
                        out[k] = out.get(k, 0) + v
            for k, v in counter_delta(self._last, current).items():
                if v:
                    out[k] = out.get(k, 0) + v
        return out
