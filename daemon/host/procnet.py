"""Parsers for the kernel's per-CPU networking and CPU-time files:

- /proc/net/softnet_stat: per CPU, packets processed, backlog drops and time squeezes;
- /proc/stat: per-CPU time (steal, softirq), in USER_HZ ticks;
- /proc/softirqs: per-CPU, per-vector softirq counts (the kernel's own accounting);
- /proc/net/route: the device of the default route (for remediation text).

Every parser is a pure function of text that never raises on bad content: a malformed line
is skipped and counted in the result's ``bad`` field, so a reading degrades instead of
failing. (The files are global: softnet_stat, stat and softirqs look the same from every
netns.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dpwatch.daemon.host import paths

# procnet.SOFTNET_STAT, PROC_STAT, PROC_SOFTIRQS, PROC_NET_ROUTE: each file's path under the
# proc root in force when the name is read (a test may point the root at a fixture tree).
__getattr__ = paths.lazy_paths(
    __name__,
    SOFTNET_STAT=lambda: paths.proc("net", "softnet_stat"),
    PROC_STAT=lambda: paths.proc("stat"),
    PROC_SOFTIRQS=lambda: paths.proc("softirqs"),
    PROC_NET_ROUTE=lambda: paths.proc("net", "route"),
)

# softnet_stat columns (hex): 0 processed, 1 dropped (backlog full), 2 time_squeeze, ...,
# 12 the CPU's index (kernels that print it; older ones print one row per online CPU in
# order, which skips offline CPUs, so the row number is only a fallback).
SOFTNET_FIELDS = ("processed", "dropped", "time_squeeze")
SOFTNET_CPU_COLUMN = 12
# /proc/stat "cpuN" columns after the name: user nice system idle iowait irq softirq steal ...
STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass
class Parsed:
    """A parse result: ``data`` keyed as each parser documents, ``bad`` malformed lines."""
    data: dict = field(default_factory=dict)
    bad: int = 0
    extra: list = field(default_factory=list)


def parse_softnet_stat(text: str) -> Parsed:
    """{cpu: {"processed": n, "dropped": n, "time_squeeze": n}} (32-bit counters as printed)."""
    out = Parsed()
    for row, line in enumerate(text.splitlines()):
        cols = line.split()
        if not cols:
            continue
        try:
            values = [int(c, 16) for c in cols]
        except ValueError:
            out.bad += 1
            continue
        if len(values) < 3:
            out.bad += 1
            continue
        cpu = values[SOFTNET_CPU_COLUMN] if len(values) > SOFTNET_CPU_COLUMN else row
        if cpu in out.data or cpu > 65535:
            out.bad += 1
            continue
        out.data[cpu] = dict(zip(SOFTNET_FIELDS, values[:3]))
    return out


def parse_proc_stat(text: str) -> Parsed:
    """{cpu: {"steal": ticks, "softirq": ticks, "total": ticks}} from the "cpuN" lines (the
    aggregate "cpu" line is skipped). Ticks are USER_HZ (os.sysconf("SC_CLK_TCK"))."""
    out = Parsed()
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        cols = line.split()
        name = cols[0]
        if name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            values = [int(v) for v in cols[1:]]
        except ValueError:
            out.bad += 1
            continue
        if len(values) < len(STAT_COLUMNS) or cpu in out.data or any(v < 0 for v in values):
            out.bad += 1
            continue
        named = dict(zip(STAT_COLUMNS, values))
        # guest and guest_nice (columns 9 and 10) are already counted in user and nice.
        out.data[cpu] = {"steal": named["steal"], "softirq": named["softirq"],
                         "total": sum(values[:len(STAT_COLUMNS)])}
    return out


def parse_softirqs(text: str) -> Parsed:
    """{(cpu, vector): count}; ``extra`` holds the vector names in the file's order (the
    kernel's softirq_to_name order, i.e. vector numbers)."""
    out = Parsed()
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    cpus: list[int] = []
    for name in head:
        try:
            if not name.startswith("CPU"):
                raise ValueError(name)
            cpus.append(int(name[3:]))
        except ValueError:
            out.bad += 1
            return out  # without a header nothing below can be attributed to a CPU
    if not cpus:
        out.bad += 1 if lines else 0
        return out
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not line.strip():
            continue
        try:
            counts = [int(v) for v in rest.split()]
        except ValueError:
            counts = []
        if not sep or not name or len(counts) != len(cpus) or name in out.extra:
            out.bad += 1
            continue
        out.extra.append(name)
        for cpu, n in zip(cpus, counts):
            out.data[(cpu, name)] = n
    return out


def default_route_device(text: str) -> str | None:
    """The interface of the first IPv4 default route in /proc/net/route text, or None."""
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            return cols[0]
    return None


def cpu_mask(cpus) -> str:
    """The kernel's CPU bitmap text (as rps_cpus and smp_affinity take it): hex, in 32-bit
    groups separated by commas, most significant first. cpu_mask([0, 1, 2, 3]) == "f"."""
    bits = 0
    for cpu in cpus:
        bits |= 1 << int(cpu)
    if not bits:
        return "0"
    groups = []
    while bits:
        groups.append(bits & 0xFFFFFFFF)
        bits >>= 32
    groups.reverse()
    return ",".join([f"{groups[0]:x}"] + [f"{g:08x}" for g in groups[1:]])


def read_text(path: str) -> str | None:
    """The file's text, or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("ascii", errors="replace")
    except OSError:
        return None


def ksoftirqd_pids(proc: str | None = None) -> dict[int, int]:
    """{cpu: pid} of the ksoftirqd/N kernel threads (for remediation text); ``proc`` defaults
    to the proc root."""
    out: dict[int, int] = {}
    proc = proc or paths.proc()
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        comm = read_text(os.path.join(proc, entry, "comm"))
        if comm and comm.startswith("ksoftirqd/"):
            try:
                out[int(comm.strip().split("/", 1)[1])] = int(entry)
            except ValueError:
                continue
    return out
