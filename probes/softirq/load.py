"""What one window of softirq readings says per CPU (``Load``): the deltas the findings judge,
and each CPU's time in network softirqs, measured by the irq tracepoints when they ran or
derived from /proc/stat's softirq ticks (all vectors) in the procfs mode.

Reading layout (SoftirqProbe.collect): counters "softnet" {(cpu, field): packets},
"cpu_ticks" {(cpu, field): USER_HZ ticks}, and with BPF "softirq_ns" and "softirq_entries"
{(cpu, vector): n}, "latency" {(vector, slot): raises}, "net_latency" {(cpu, vector, slot):
raises}, "latency_sum_ns" {(vector,): ns}, "napi_exhausted" {(device,): polls}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpwatch.probes.base import Window

NET_VECTORS = ("NET_RX", "NET_TX")
NO_DEVICE = "(no_device)"    # napi_poll's name for the per-CPU backlog (no net_device)
OVERFLOW_DEVICE = "(overflow)"

BASIS_BPF = "NET_RX + NET_TX handler time (irq:softirq_entry/exit)"
BASIS_PROCFS = "softirq time of all vectors (/proc/stat; no irq tracepoints on this kernel)"


def by_cpu(delta: dict, field_name: str | None = None,
           vectors: tuple[str, ...] | None = None) -> dict[int, float]:
    """Sum a {(cpu, name, ...): n} delta per CPU, keeping one field or some vectors."""
    out: dict[int, float] = {}
    for key, v in delta.items():
        cpu, name = key[0], key[1]
        if (field_name is None or name == field_name) and (vectors is None or name in vectors):
            out[cpu] = out.get(cpu, 0) + v
    return out


@dataclass
class Load:
    secs: float
    cpus: list[int]                    # 0 .. ncpu - 1
    bpf: bool                          # the irq tracepoints ran (not the procfs mode)
    basis: str                         # how net_s was measured
    net_s: dict[int, float]            # seconds in network softirqs per CPU
    rx_s: dict[int, float]
    tx_s: dict[int, float]
    share: dict[int, float]            # net_s over the window, at most 1
    softnet: dict = field(default_factory=dict)      # delta of "softnet"
    ticks: dict = field(default_factory=dict)        # delta of "cpu_ticks"
    napi: dict[str, int] = field(default_factory=dict)  # device -> polls that used their budget
    latency: dict = field(default_factory=dict)      # delta of "latency"
    net_latency: dict = field(default_factory=dict)  # delta of "net_latency"
    clk_tck: int = 100

    @property
    def ncpu(self) -> int:
        return len(self.cpus)

    def per_cpu(self, field_name: str) -> dict[int, float]:
        """A softnet field ("processed", "dropped", "time_squeeze") per CPU."""
        return by_cpu(self.softnet, field_name)

    def busiest_device(self) -> str | None:
        """The device whose NAPI polls used their budget most (not the backlog, not overflow)."""
        napi = {d: n for d, n in self.napi.items() if d not in (NO_DEVICE, OVERFLOW_DEVICE)}
        return max(napi, key=lambda d: napi[d]) if napi else None


def derive(window: Window, clk_tck: int, cpus: int) -> Load:
    """The Load of a window; ``cpus`` is the node's CPU count (the highest CPU /proc/stat
    lists counts too)."""
    secs = window.seconds
    ticks = window.delta("cpu_ticks")
    new = window.new["counters"]
    ncpu = max(cpus, 1 + max((k[0] for k in new.get("cpu_ticks", {})), default=0))
    bpf = "softirq_ns" in new
    if bpf:
        ns = window.delta("softirq_ns")
        net_s = {cpu: v / 1e9 for cpu, v in by_cpu(ns, vectors=NET_VECTORS).items()}
        rx_s = {cpu: v / 1e9 for cpu, v in by_cpu(ns, "NET_RX").items()}
        tx_s = {cpu: v / 1e9 for cpu, v in by_cpu(ns, "NET_TX").items()}
    else:
        net_s = {cpu: v / clk_tck for cpu, v in by_cpu(ticks, "softirq").items()}
        rx_s, tx_s = {}, {}
    return Load(secs=secs, cpus=list(range(ncpu)), bpf=bpf, basis=BASIS_BPF if bpf else BASIS_PROCFS,
                net_s=net_s, rx_s=rx_s, tx_s=tx_s,
                share={cpu: min(1.0, s / secs) for cpu, s in net_s.items()},
                softnet=window.delta("softnet"), ticks=ticks,
                napi={d: int(n) for (d,), n in window.delta("napi_exhausted").items()},
                latency=window.delta("latency") if bpf else {},
                net_latency=window.delta("net_latency") if bpf else {}, clk_tck=clk_tck)
