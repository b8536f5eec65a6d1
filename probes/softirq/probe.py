"""softirq: where each CPU's time goes on packets (softirq time per vector), how long raised
softirqs wait, the softnet backlog (processed, dropped, time squeezes), NAPI polls that use
their whole budget, and CPU steal.

Kernel side (bpf/softirq.c, its constants in bpf/softirq.h): irq:softirq_entry/exit/raise (raw
tracepoints or tracepoints, whichever the bench measured cheaper; --softirq-hooks picks one)
and napi:napi_poll. User side: /proc/net/softnet_stat and /proc/stat (procfs.py), read in
every mode; when the irq tracepoints are missing the probe runs on those files alone (mode
procfs, degraded: no per-vector time, no latency, and saturation judged from /proc/stat's
softirq column).

Vector names come from the running kernel: the __print_symbolic list of softirq_entry's
format, or else the row names of /proc/softirqs (the same order, the kernel's own table).

The rest of the probe's folder: load.py (one window per CPU), findings.py (one function per
finding id), facts.py (what the findings need from the node, read here in collect),
histogram.py (the latency slots).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from dpwatch.daemon.host import paths
from dpwatch.probes.softirq import params as params_mod
from dpwatch.probes.softirq import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window
from dpwatch.probes.cdefs import defines
from dpwatch.probes.softirq.facts import FactsReader, NodeFacts
from dpwatch.probes.softirq.findings import analyse
from dpwatch.probes.softirq.histogram import HIST_SLOTS, prometheus_buckets
from dpwatch.probes.softirq.load import NET_VECTORS, NO_DEVICE, OVERFLOW_DEVICE
from dpwatch.probes.softirq.procfs import ProcCounters, load_vector_names, vector_name

_H = defines("softirq.h")
NVEC_DEFAULT, NVEC_MAX = _H["SOFTIRQ_NVEC_DEFAULT"], _H["SOFTIRQ_NVEC_MAX"]
IRQ_EVENTS = ("softirq_entry", "softirq_exit", "softirq_raise")  # attach order: raise last
PROCFS_HOOKS = (Hook("procfs", paths.proc("net", "softnet_stat")), Hook("procfs", paths.proc("stat")))


class SoftirqProbe(Probe):
    name = "softirq"
    bpf_source = "softirq.c"
    description = ("softirq time per CPU and vector, raise-to-run latency, softnet backlog drops and "
                   "time squeezes, NAPI budget exhaustion, CPU steal")
    finding_ids = ("softirq.cpu_saturated", "softirq.imbalance", "softnet.backlog_drops",
                   "softnet.time_squeeze", "softirq.latency_high", "cpu.steal")
    chart_series = charts.SERIES
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    modes = (
        Mode("raw_tracepoint",
             tuple(Hook("raw_tracepoint", f"irq:{e}") for e in IRQ_EVENTS)
             + (Hook("tracepoint", "napi:napi_poll"),) + PROCFS_HOOKS,
             "raw tracepoints irq:softirq_entry/exit/raise, tracepoint napi:napi_poll, "
             "softnet_stat and /proc/stat"),
        Mode("tracepoint",
             tuple(Hook("tracepoint", f"irq:{e}") for e in IRQ_EVENTS)
             + (Hook("tracepoint", "napi:napi_poll"),) + PROCFS_HOOKS,
             "tracepoints irq:softirq_entry/exit/raise and napi:napi_poll, softnet_stat and /proc/stat"),
        Mode("procfs", PROCFS_HOOKS,
             "softnet_stat and /proc/stat only (no irq tracepoints): no per-vector time, no "
             "raise latency, no NAPI budget counts", degraded=True, bpf=False),
    )
    error_slots = {"SOFTIRQ_ERR_VEC": "softirq_vec", "SOFTIRQ_ERR_NAPI": "softirq_napi"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.names: dict[int, str] = {}
        self.name_source = ""
        self.nvec = 0
        self.clk_tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.proc = ProcCounters()
        self.facts = FactsReader()

    # -- selection ----------------------------------------------------------------------
    def choose_mode(self, features) -> tuple[Mode | None, str]:
        choice = getattr(self.config, "softirq_hooks", "auto")
        if choice == "auto":
            return super().choose_mode(features)
        wanted = [m for m in self.modes if m.name == choice]
        saved, self.modes = self.modes, tuple(wanted)
        try:
            mode, why = super().choose_mode(features)
        finally:
            self.modes = saved
        return mode, (f"--softirq-hooks {choice}: {why}")

    def fallback_modes(self, features) -> list[Mode]:
        if getattr(self.config, "softirq_hooks", "auto") not in ("auto", "procfs"):
            return []  # a forced hook kind must not quietly become another
        return super().fallback_modes(features)

    def cflags(self, features) -> list[str]:
        self.names, self.name_source = load_vector_names(features.tracefs)
        self.nvec = max(1, min(NVEC_MAX, max(self.names) + 1)) if self.names else NVEC_DEFAULT
        return [f"-DSOFTIRQ_RAW={1 if self.mode and self.mode.name == 'raw_tracepoint' else 0}",
                f"-DSOFTIRQ_NVEC={self.nvec}",
                f"-DSOFTIRQ_NAPI_MAX={int(self.config.softirq_napi_devices)}",
                f"-DSOFTIRQ_SAMPLE={int(self.config.softirq_sample)}"]

    def attach(self, module) -> None:
        if not self.names:  # user-space mode: cflags() was not called
            self.names, self.name_source = load_vector_names()
        super().attach(module)

    @property
    def bpf_active(self) -> bool:
        return self.module is not None and self.mode is not None and self.mode.bpf

    # -- collection -----------------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        counters: dict[str, dict] = {"softnet": self.proc.softnet(), "cpu_ticks": self.proc.cpu_ticks()}
        if self.bpf_active:
            counters.update(self._collect_bpf())
        devices = [d for (d,) in counters.get("napi_exhausted", {}) if d not in (NO_DEVICE, OVERFLOW_DEVICE)]
        return {"counters": counters, "gauges": {}, "info": {"node": self.facts.read(devices)}}

    def _collect_bpf(self) -> dict[str, dict]:
        out: dict[str, dict] = {"softirq_ns": {}, "softirq_entries": {}, "latency": {},
                                "net_latency": {}, "latency_sum_ns": {}}
        table = self.table("softirq_vec")
        for vec in range(self.nvec):
            self._read_vector(vector_name(self.names, vec), table[table.Key(vec)], out)
        napi = {(k.name.decode(errors="replace"),): int(v.value) for k, v in self.table("softirq_napi").items()}
        over = int(sum(self.table("softirq_napi_over")[0]))
        if over:
            napi[(OVERFLOW_DEVICE,)] = over
        out["napi_exhausted"] = napi
        return out

    @staticmethod
    def _read_vector(vname: str, per_cpu, out: dict[str, dict]) -> None:
        """One softirq_vec row (a struct softirq_vec_stat per CPU) into the reading's groups."""
        hist, total_sum = out["latency"], 0
        for cpu, st in enumerate(per_cpu):
            if st.entries:
                out["softirq_entries"][(cpu, vname)] = int(st.entries)
                out["softirq_ns"][(cpu, vname)] = int(st.ns)
            if not st.lat_count:
                continue
            total_sum += int(st.lat_ns)
            for slot in range(HIST_SLOTS):
                n = int(st.hist[slot])
                if n:
                    hist[(vname, slot)] = hist.get((vname, slot), 0) + n
                    if vname in NET_VECTORS:
                        out["net_latency"][(cpu, vname, slot)] = n
        if total_sum:
            out["latency_sum_ns"][(vname,)] = total_sum

    # -- metrics ----------------------------------------------------------------------------
    def metrics(self, reading: Reading) -> Iterable:
        c = reading["counters"]
        if "softirq_ns" in c:
            yield from self._bpf_metrics(c)
        yield from self._softnet_metrics(c)
        steal = CounterMetricFamily("dpwatch_cpu_steal_seconds", "Time the hypervisor ran something "
                                    "else while this vCPU wanted to run (/proc/stat steal).", labels=["cpu"])
        for (cpu, fname), v in sorted(c["cpu_ticks"].items()):
            if fname == "steal":
                steal.add_metric([str(cpu)], v / self.clk_tck)
        yield steal

    @staticmethod
    def _bpf_metrics(c: dict[str, dict]) -> Iterable:
        secs = CounterMetricFamily("dpwatch_softirq_seconds", "Time spent in softirq handlers, "
                                   "per CPU and vector (irq:softirq_entry to exit; one run in "
                                   "--softirq-sample timed, weighted).",
                                   labels=["cpu", "vector"])
        for (cpu, vec), v in sorted(c["softirq_ns"].items()):
            secs.add_metric([str(cpu), vec], v / 1e9)
        yield secs
        lat = HistogramMetricFamily("dpwatch_softirq_raise_latency_seconds", "Time from a "
                                    "softirq's first raise to its handler starting, per vector "
                                    "(log2 buckets; one run in --softirq-sample measured, "
                                    "weighted).", labels=["vector"])
        by_vec: dict[str, dict[int, int]] = {}
        for (vec, slot), n in c["latency"].items():
            by_vec.setdefault(vec, {})[slot] = n
        for vec in sorted(by_vec):
            lat.add_metric([vec], prometheus_buckets(by_vec[vec]), c["latency_sum_ns"].get((vec,), 0) / 1e9)
        yield lat
        napi = CounterMetricFamily("dpwatch_napi_budget_exhausted", "NAPI polls that used their "
                                   f"whole budget, per device ({NO_DEVICE}: the per-CPU backlog; "
                                   f"{OVERFLOW_DEVICE}: devices beyond --softirq-napi-devices).",
                                   labels=["device"])
        for (dev,), v in sorted(c["napi_exhausted"].items()):
            napi.add_metric([dev], v)
        yield napi

    @staticmethod
    def _softnet_metrics(c: dict[str, dict]) -> Iterable:
        fams = {
            "processed": CounterMetricFamily("dpwatch_softnet_processed", "Packets processed by "
                                             "the CPU's softnet (/proc/net/softnet_stat).", labels=["cpu"]),
            "dropped": CounterMetricFamily("dpwatch_softnet_dropped", "Packets dropped because the "
                                           "CPU's backlog was full (netdev_max_backlog).", labels=["cpu"]),
            "time_squeeze": CounterMetricFamily("dpwatch_softnet_time_squeeze", "NET_RX runs that "
                                                "stopped with work left (netdev_budget or "
                                                "netdev_budget_usecs used up).", labels=["cpu"]),
        }
        for (cpu, fname), v in sorted(c["softnet"].items()):
            fams[fname].add_metric([str(cpu)], v)
        yield from fams.values()

    def info(self) -> dict[str, Any]:
        return {"vectors": [vector_name(self.names, v) for v in sorted(self.names)],
                "vector_name_source": self.name_source,
                "napi_devices": int(self.config.softirq_napi_devices),
                "latency_buckets": HIST_SLOTS, "timed_runs": f"1 in {int(self.config.softirq_sample)}",
                "malformed_lines": dict(self.proc.malformed), "read_errors": dict(self.proc.read_errors)}

    # -- findings -------------------------------------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        if window.old is None or window.seconds < 1.0:
            return []  # no baseline yet: cumulative /proc counters are not a window
        facts = window.new.get("info", {}).get("node") or NodeFacts()
        return analyse(window, self.config, self.clk_tck, facts)
