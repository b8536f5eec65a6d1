"""The softirq probe's procfs side: /proc/net/softnet_stat and /proc/stat read into the
cumulative counters of a reading (every mode reads them; the procfs mode reads nothing else),
and the softirq vector names of the running kernel.

The parsers are daemon/host/procnet.py's; this module keeps what the probe needs across
readings: softnet_stat's 32-bit counters unwrapped into 64-bit totals, and per file the
read errors and malformed lines (shown in /probes). Paths are under the proc root
(daemon/host/paths.py), so a unit test reads a fixture tree.
"""

from __future__ import annotations

from typing import Callable

from dpwatch.daemon.host import paths
from dpwatch.daemon.host import procnet
from dpwatch.daemon.host import tracefs

COUNTER_WRAP = 1 << 32   # softnet_stat prints 32-bit counters


def softnet_stat_path() -> str:
    return paths.proc("net", "softnet_stat")


def stat_path() -> str:
    return paths.proc("stat")


def softirqs_path() -> str:
    return paths.proc("softirqs")


class ProcCounters:
    """softnet_stat and /proc/stat as cumulative reading groups, for one probe instance:
    ``softnet`` {(cpu, field): packets}, ``cpu_ticks`` {(cpu, field): USER_HZ ticks}."""

    def __init__(self) -> None:
        self._softnet_raw: dict[tuple[int, str], int] = {}
        self._softnet_acc: dict[tuple[int, str], int] = {}
        self.malformed: dict[str, int] = {}    # path -> malformed lines seen
        self.read_errors: dict[str, int] = {}  # path -> reads that failed

    def _read(self, path: str, parser: Callable[[str], procnet.Parsed]) -> procnet.Parsed | None:
        text = procnet.read_text(path)
        if text is None:
            self.read_errors[path] = self.read_errors.get(path, 0) + 1
            return None
        parsed = parser(text)
        if parsed.bad:
            self.malformed[path] = self.malformed.get(path, 0) + parsed.bad
        return parsed

    def softnet(self) -> dict[tuple[int, str], int]:
        """Packets processed, dropped and time-squeezed per CPU, unwrapped: a file that cannot
        be read keeps the last totals."""
        parsed = self._read(softnet_stat_path(), procnet.parse_softnet_stat)
        if parsed is not None:
            for cpu, row in parsed.data.items():
                for fname, raw in row.items():
                    key = (cpu, fname)
                    last = self._softnet_raw.get(key)
                    if last is None:
                        self._softnet_acc[key] = raw
                    else:  # 32-bit counters: unwrap into a 64-bit total
                        self._softnet_acc[key] += (raw - last) % COUNTER_WRAP
                    self._softnet_raw[key] = raw
        return dict(self._softnet_acc)

    def cpu_ticks(self) -> dict[tuple[int, str], int]:
        """steal, softirq and total ticks per CPU ({} when /proc/stat cannot be read)."""
        parsed = self._read(stat_path(), procnet.parse_proc_stat)
        if parsed is None:
            return {}
        return {(cpu, f): v for cpu, row in parsed.data.items() for f, v in row.items()}


def load_vector_names(tracefs_path: str | None = None) -> tuple[dict[int, str], str]:
    """Vector number -> name from the running kernel, and where the names came from: the
    __print_symbolic list of irq:softirq_entry's format, else the row names of /proc/softirqs
    (the same order, the kernel's own table)."""
    fmt = tracefs.read_format("irq", "softirq_entry", tracefs_path)
    if fmt is not None:
        names = fmt.symbolic("vec")
        if names:
            return names, "tracefs:irq/softirq_entry/format"
    text = procnet.read_text(softirqs_path())
    if text:
        parsed = procnet.parse_softirqs(text)
        if parsed.extra:
            return dict(enumerate(parsed.extra)), "/proc/softirqs row order"  # host-path: ok a label
    return {}, "none (vectors shown as numbers)"


def vector_name(names: dict[int, str], vec: int) -> str:
    return names.get(vec) or f"VEC_{vec}"
