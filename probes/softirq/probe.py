"""softirq: where each CPU's time goes on packets (softirq time per vector), how long raised
softirqs wait, the softnet backlog (processed, dropped, time squeezes), NAPI polls that use
their whole budget, and CPU steal.

Kernel side (bpf/softirq.c): irq:softirq_entry/exit/raise (raw tracepoints or tracepoints,
whichever the bench measured cheaper; --softirq-hooks picks one) and napi:napi_poll. User
side: /proc/net/softnet_stat and /proc/stat (daemon/host/procnet.py), read in every mode; when the
irq tracepoints are missing the probe runs on those files alone (mode procfs, degraded: no
per-vector time, no latency, and saturation judged from /proc/stat's softirq column).

Vector names come from the running kernel: the __print_symbolic list of softirq_entry's
format, or else the row names of /proc/softirqs (the same order, the kernel's own table).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from dpwatch.daemon.host import procnet
from dpwatch.daemon.host import sysctl
from dpwatch.daemon.host import tracefs
from dpwatch.probes.softirq import params as params_mod
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window
from dpwatch.probes.sample import p_value, share_exceeds

NET_VECTORS = ("NET_RX", "NET_TX")
HIST_SLOTS = 32          # slot s holds latencies below 2^s ns (bpf/softirq.c)
LE_SLOTS = range(8, HIST_SLOTS - 1)  # exported bucket bounds: 2^8 ns (256 ns) .. 2^30 ns (~1.07 s)
COUNTER_WRAP = 1 << 32   # softnet_stat prints 32-bit counters
IMBALANCE_MIN_SHARE = 0.10   # the busiest CPU must spend this share in net softirqs to call a skew
STEAL_CRITICAL_FACTOR = 4    # steal at 4x the threshold is critical
STEAL_MIN_SECONDS = 1.0      # and at least this much stolen from the CPU: a short window's blip is not steal
SATURATED_CRITICAL = 0.90
BACKLOG_CRITICAL_SHARE = 0.01  # backlog drops at 1% of the packets the CPUs processed
BACKLOG_MAX = 1 << 18
NO_DEVICE = "(no_device)"    # napi_poll's name for the per-CPU backlog (no net_device)
OVERFLOW_DEVICE = "(overflow)"
HOOK_CHOICES = ("auto", "raw_tracepoint", "tracepoint", "procfs")
IRQ_EVENTS = ("softirq_entry", "softirq_exit", "softirq_raise")  # attach order: raise last
PROCFS_HOOKS = (Hook("procfs", procnet.SOFTNET_STAT), Hook("procfs", procnet.PROC_STAT))


def load_vector_names(tracefs_path: str | None = None) -> tuple[dict[int, str], str]:
    """Vector number -> name from the running kernel, and where the names came from."""
    fmt = tracefs.read_format("irq", "softirq_entry", tracefs_path)
    if fmt is not None:
        names = fmt.symbolic("vec")
        if names:
            return names, "tracefs:irq/softirq_entry/format"
    text = procnet.read_text(procnet.PROC_SOFTIRQS)
    if text:
        parsed = procnet.parse_softirqs(text)
        if parsed.extra:
            return dict(enumerate(parsed.extra)), "/proc/softirqs row order"
    return {}, "none (vectors shown as numbers)"


def vector_name(names: dict[int, str], vec: int) -> str:
    return names.get(vec) or f"VEC_{vec}"


def slot_bounds(slot: int) -> tuple[float, float]:
    """Seconds [low, high) of a log2 slot: slot s holds latencies of 2^(s-1) to 2^s - 1 ns."""
    return ((1 << (slot - 1)) / 1e9 if slot > 0 else 0.0), (1 << slot) / 1e9


def p99_slot(hist: dict[int, float]) -> int | None:
    """The slot holding the 99th percentile of a {slot: count} histogram."""
    total = sum(hist.values())
    if total <= 0:
        return None
    rank = math.ceil(0.99 * total)
    seen = 0.0
    for slot in sorted(hist):
        seen += hist[slot]
        if seen >= rank:
            return slot
    return max(hist)


def backlog_suggestion(current: int | None, worst_cpu_drops_per_s: float) -> int:
    """New netdev_max_backlog: room for one second of the worst CPU's drops on top of the
    current size, as a power of two, at least double the current value, at most 2^18."""
    cur = current if current and current > 0 else 1000
    want = 1 << max(0, math.ceil(cur + worst_cpu_drops_per_s) - 1).bit_length()
    return min(BACKLOG_MAX, max(want, 2 * cur))


def budget_suggestion(budget: int | None, usecs: int | None) -> tuple[int, int]:
    """netdev_budget and netdev_budget_usecs doubled (kernel defaults when unreadable),
    capped at 4800 packets and 32000 us."""
    b = budget if budget and budget > 0 else 300
    u = usecs if usecs and usecs > 0 else 2000
    return min(2 * b, 4800), min(2 * u, 32000)


class SoftirqProbe(Probe):
    name = "softirq"
    bpf_source = "softirq.c"
    description = ("softirq time per CPU and vector, raise-to-run latency, softnet backlog drops and "
                   "time squeezes, NAPI budget exhaustion, CPU steal")
    finding_ids = ("softirq.cpu_saturated", "softirq.imbalance", "softnet.backlog_drops",
                   "softnet.time_squeeze", "softirq.latency_high", "cpu.steal")
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
        self._softnet_raw: dict[tuple[int, str], int] = {}
        self._softnet_acc: dict[tuple[int, str], int] = {}
        self.malformed: dict[str, int] = {}
        self.read_errors: dict[str, int] = {}

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
        self.nvec = max(1, min(64, max(self.names, default=9) + 1))
        return [f"-DSOFTIRQ_RAW={1 if self.mode and self.mode.name == 'raw_tracepoint' else 0}",
                f"-DSOFTIRQ_NVEC={self.nvec}", f"-DSOFTIRQ_HIST_SLOTS={HIST_SLOTS}",
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
    def _read(self, path: str, parser) -> procnet.Parsed | None:
        text = procnet.read_text(path)
        if text is None:
            self.read_errors[path] = self.read_errors.get(path, 0) + 1
            return None
        parsed = parser(text)
        if parsed.bad:
            self.malformed[path] = self.malformed.get(path, 0) + parsed.bad
        return parsed

    def _softnet(self) -> dict[tuple[int, str], int]:
        parsed = self._read(procnet.SOFTNET_STAT, procnet.parse_softnet_stat)
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

    def _cpu_ticks(self) -> dict[tuple[int, str], int]:
        parsed = self._read(procnet.PROC_STAT, procnet.parse_proc_stat)
        if parsed is None:
            return {}
        return {(cpu, f): v for cpu, row in parsed.data.items() for f, v in row.items()}

    def collect(self, inputs=None) -> Reading:
        counters: dict[str, dict] = {"softnet": self._softnet(), "cpu_ticks": self._cpu_ticks()}
        if self.bpf_active:
            counters.update(self._collect_bpf())
        return {"counters": counters, "gauges": {}}

    def _collect_bpf(self) -> dict[str, dict]:
        ns: dict[tuple[int, str], int] = {}
        entries: dict[tuple[int, str], int] = {}
        hist: dict[tuple[str, int], int] = {}
        net_hist: dict[tuple[int, str, int], int] = {}
        lat_sum: dict[tuple[str], int] = {}
        table = self.table("softirq_vec")
        for vec in range(self.nvec):
            vname = vector_name(self.names, vec)
            total_sum = 0
            for cpu, st in enumerate(table[table.Key(vec)]):
                if st.entries:
                    entries[(cpu, vname)] = int(st.entries)
                    ns[(cpu, vname)] = int(st.ns)
                if not st.lat_count:
                    continue
                total_sum += int(st.lat_ns)
                for slot in range(HIST_SLOTS):
                    n = int(st.hist[slot])
                    if n:
                        hist[(vname, slot)] = hist.get((vname, slot), 0) + n
                        if vname in NET_VECTORS:
                            net_hist[(cpu, vname, slot)] = n
            if total_sum:
                lat_sum[(vname,)] = total_sum
        napi = {(k.name.decode(errors="replace"),): int(v.value) for k, v in self.table("softirq_napi").items()}
        over = int(sum(self.table("softirq_napi_over")[0]))
        if over:
            napi[(OVERFLOW_DEVICE,)] = over
        return {"softirq_ns": ns, "softirq_entries": entries, "latency": hist,
                "net_latency": net_hist, "latency_sum_ns": lat_sum, "napi_exhausted": napi}

    # -- metrics ----------------------------------------------------------------------------
    def metrics(self, reading: Reading) -> Iterable:
        c = reading["counters"]
        if "softirq_ns" in c:
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
                slots = by_vec[vec]
                buckets = []
                for s in LE_SLOTS:  # slot k holds values below 2^k ns: all of them are <= 2^s ns
                    cum = sum(n for k, n in slots.items() if k <= s)
                    buckets.append((repr((1 << s) / 1e9), cum))
                buckets.append(("+Inf", sum(slots.values())))
                lat.add_metric([vec], buckets, c["latency_sum_ns"].get((vec,), 0) / 1e9)
            yield lat
            napi = CounterMetricFamily("dpwatch_napi_budget_exhausted", "NAPI polls that used their "
                                       f"whole budget, per device ({NO_DEVICE}: the per-CPU backlog; "
                                       f"{OVERFLOW_DEVICE}: devices beyond --softirq-napi-devices).",
                                       labels=["device"])
            for (dev,), v in sorted(c["napi_exhausted"].items()):
                napi.add_metric([dev], v)
            yield napi
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
        steal = CounterMetricFamily("dpwatch_cpu_steal_seconds", "Time the hypervisor ran something "
                                    "else while this vCPU wanted to run (/proc/stat steal).", labels=["cpu"])
        for (cpu, fname), v in sorted(c["cpu_ticks"].items()):
            if fname == "steal":
                steal.add_metric([str(cpu)], v / self.clk_tck)
        yield steal

    def info(self) -> dict[str, Any]:
        return {"vectors": [vector_name(self.names, v) for v in sorted(self.names)],
                "vector_name_source": self.name_source,
                "napi_devices": int(self.config.softirq_napi_devices),
                "latency_buckets": HIST_SLOTS, "timed_runs": f"1 in {int(self.config.softirq_sample)}",
                "malformed_lines": dict(self.malformed), "read_errors": dict(self.read_errors)}

    # -- findings -------------------------------------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        if window.old is None or window.seconds < 1.0:
            return []  # no baseline yet: cumulative /proc counters are not a window
        return analyse(window, self.config, self.name, self.clk_tck, _NodeFacts())


class _NodeFacts:
    """What remediation text reads from the node (a class so unit tests can pass their own)."""

    def sysctl(self, key: str) -> int | None:
        return sysctl.read_int(key)

    def cpu_count(self) -> int:
        return os.cpu_count() or 1

    def default_device(self) -> str | None:
        text = procnet.read_text(procnet.PROC_NET_ROUTE)
        return procnet.default_route_device(text) if text else None

    def rx_queues(self, dev: str) -> int:
        try:
            return sum(1 for q in os.listdir(f"/sys/class/net/{dev}/queues") if q.startswith("rx-")) or 1
        except OSError:
            return 1

    def ksoftirqd(self) -> dict[int, int]:
        return procnet.ksoftirqd_pids()

    def node(self) -> str:
        from dpwatch.daemon.triage import node_name
        return node_name()


def _by_cpu(delta: dict, field: str | None = None, vectors: tuple[str, ...] | None = None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, v in delta.items():
        cpu, name = key[0], key[1]
        if (field is None or name == field) and (vectors is None or name in vectors):
            out[cpu] = out.get(cpu, 0) + v
    return out


def _pct(x: float) -> float:
    return round(100 * x, 2)


def analyse(window: Window, cfg, probe: str, clk_tck: int, facts) -> list[Finding]:
    """Every finding of the probe over one window (pure apart from ``facts``)."""
    secs = window.seconds
    softnet = window.delta("softnet")
    ticks = window.delta("cpu_ticks")
    processed = _by_cpu(softnet, "processed")
    findings: list[Finding] = []
    ncpu = max(facts.cpu_count(), 1 + max((k[0] for k in window.new["counters"].get("cpu_ticks", {})), default=0))
    all_cpus = list(range(ncpu))

    bpf = "softirq_ns" in window.new["counters"]
    if bpf:
        ns = window.delta("softirq_ns")
        net_s = {cpu: v / 1e9 for cpu, v in _by_cpu(ns, vectors=NET_VECTORS).items()}
        rx_s = {cpu: v / 1e9 for cpu, v in _by_cpu(ns, "NET_RX").items()}
        tx_s = {cpu: v / 1e9 for cpu, v in _by_cpu(ns, "NET_TX").items()}
        basis = "NET_RX + NET_TX handler time (irq:softirq_entry/exit)"
    else:
        net_s = {cpu: v / clk_tck for cpu, v in _by_cpu(ticks, "softirq").items()}
        rx_s = tx_s = {}
        basis = "softirq time of all vectors (/proc/stat; no irq tracepoints on this kernel)"
    share = {cpu: min(1.0, s / secs) for cpu, s in net_s.items()}

    dev = _busiest_device(window) or facts.default_device() or "<nic>"

    def spread_steps(busy: list[int]) -> list[str]:
        others = [c for c in all_cpus if c not in busy] or all_cpus
        mask = procnet.cpu_mask(others)
        nq = facts.rx_queues(dev) if dev != "<nic>" else 1
        flows = 32768
        return [
            f"echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus   # RPS: steer packet "
            f"processing to CPU(s) {','.join(map(str, others))} (repeat for every rx-* queue)",
            f"sysctl -w net.core.rps_sock_flow_entries={flows}   # RFS, with "
            f"echo {flows // nq} > /sys/class/net/{dev}/queues/rx-0/rps_flow_cnt ({nq} rx queue(s))",
            f"ethtool -L {dev} combined {ncpu}   # RSS: one hardware queue per CPU, if the NIC has them",
            "systemctl enable --now irqbalance   # spread NIC interrupts (check: grep . /proc/irq/*/smp_affinity_list)",
        ]

    # softirq.cpu_saturated -----------------------------------------------------------------
    limit = cfg.softirq_saturated_percent / 100.0
    hot = sorted(cpu for cpu, s in share.items() if s >= limit)
    if hot:
        pps = sum(processed.get(c, 0) for c in hot) / secs
        per_cpu = {str(c): {"net_softirq_percent": _pct(share[c]),
                            "net_rx_seconds": round(rx_s.get(c, 0.0), 4),
                            "net_tx_seconds": round(tx_s.get(c, 0.0), 4),
                            "packets_per_second": round(processed.get(c, 0) / secs, 1)}
                   for c in hot}
        worst = max(share[c] for c in hot)
        findings.append(Finding(
            id="softirq.cpu_saturated", probe=probe,
            severity="critical" if worst >= SATURATED_CRITICAL else "warning",
            title="A CPU is saturated by packet processing",
            summary=(f"CPU {', '.join(map(str, hot))} spent {_pct(worst)}% of the last {secs:.0f}s in "
                     f"network softirqs (threshold {cfg.softirq_saturated_percent:g}%). Packets that "
                     "land on a saturated CPU queue up and are squeezed or dropped while the other CPUs "
                     "idle: spread receive processing."),
            evidence={"basis": basis, "window_seconds": round(secs, 1),
                      "threshold_percent": cfg.softirq_saturated_percent, "per_cpu": per_cpu},
            remediation=spread_steps(hot), impact=pps or 100 * worst))

    # softirq.imbalance -----------------------------------------------------------------------
    total = sum(net_s.values())
    if ncpu > 1 and total > 0:
        busiest = max(net_s, key=lambda c: net_s[c])
        mean = total / ncpu
        ratio = net_s[busiest] / mean
        if ratio >= cfg.softirq_imbalance_ratio and share.get(busiest, 0) >= IMBALANCE_MIN_SHARE:
            # A skew is a problem when the busy CPU pays for it: it drops or squeezes packets.
            # Without that it is how one big flow looks (RSS and RPS hash per flow, so a bulk
            # transfer lands on one CPU whatever the steering): a note, not a warning.
            hurt = {k: int(_by_cpu(softnet, k).get(busiest, 0)) for k in ("dropped", "time_squeeze")}
            harmful = any(hurt.values())
            findings.append(Finding(
                id="softirq.imbalance", probe=probe, severity="warning" if harmful else "info",
                title="Network softirq load is skewed across CPUs",
                summary=(f"CPU {busiest} carries {100 * net_s[busiest] / total:.0f}% of the node's network "
                         f"softirq time ({ratio:.2f}x the mean over {ncpu} CPUs, threshold "
                         f"{cfg.softirq_imbalance_ratio:g}x); it is {_pct(share[busiest])}% busy with it. "
                         + (f"It dropped {hurt['dropped']} packets from its backlog and ran out of budget "
                            f"{hurt['time_squeeze']} times: one queue or one interrupt takes the packets."
                            if harmful else
                            "It drops nothing and keeps up: one queue, one interrupt or a few big flows "
                            "(each flow stays on one CPU whatever the steering). Spread it only if the "
                            "traffic is many flows.")),
                evidence={"basis": basis, "window_seconds": round(secs, 1), "busiest_cpu": busiest,
                          "ratio_to_mean": round(ratio, 3), "threshold_ratio": cfg.softirq_imbalance_ratio,
                          "busiest_cpu_backlog_drops": hurt["dropped"],
                          "busiest_cpu_time_squeezes": hurt["time_squeeze"],
                          "per_cpu_percent": {str(c): _pct(min(1.0, net_s.get(c, 0) / secs)) for c in all_cpus}},
                remediation=spread_steps([busiest]),
                impact=processed.get(busiest, 0) / secs if harmful else 0.0))

    # softnet.backlog_drops ---------------------------------------------------------------------
    dropped = _by_cpu(softnet, "dropped")
    ndrop = sum(dropped.values())
    if ndrop > 0:
        current = facts.sysctl("net.core.netdev_max_backlog")
        worst_cpu = max(dropped, key=lambda c: dropped[c])
        want = backlog_suggestion(current, dropped[worst_cpu] / secs)
        seen = ndrop + sum(processed.values())
        if current is not None:
            held, now = f"net.core.netdev_max_backlog={current} packets", f"now {current}"
        else:  # a global sysctl: only the host's netns has it
            held = "net.core.netdev_max_backlog; global, not readable from this netns"
            now = "global: readable only in the host's netns"
        steps = [f"sysctl -w net.core.netdev_max_backlog={want}   # {now}; persist it in /etc/sysctl.d/"]
        if ncpu > 1 and dropped[worst_cpu] >= 0.8 * ndrop:
            steps += spread_steps([worst_cpu])[:1]
        findings.append(Finding(
            id="softnet.backlog_drops", probe=probe,
            severity="critical" if seen and ndrop / seen >= BACKLOG_CRITICAL_SHARE else "warning",
            title="Packets dropped: the per-CPU backlog is full",
            summary=(f"{int(ndrop)} packets were dropped in {secs:.0f}s ({ndrop / secs:.1f}/s) because a "
                     f"CPU's input backlog was full ({held}). Packets enqueued by netif_rx (veth, "
                     "loopback, RPS, tunnels) arrive faster than that CPU's NET_RX softirq drains them."),
            evidence={"drops": int(ndrop), "drops_per_second": round(ndrop / secs, 3),
                      "window_seconds": round(secs, 1), "net.core.netdev_max_backlog": current,
                      "per_cpu_drops": {str(c): int(v) for c, v in sorted(dropped.items()) if v},
                      "per_cpu_processed": {str(c): int(v) for c, v in sorted(processed.items()) if v}},
            remediation=steps, impact=ndrop / secs))

    # softnet.time_squeeze ------------------------------------------------------------------------
    squeeze = _by_cpu(softnet, "time_squeeze")
    nsq = sum(squeeze.values())
    if nsq > 0 and nsq / secs >= cfg.softirq_squeeze_rate:
        budget = facts.sysctl("net.core.netdev_budget")
        usecs = facts.sysctl("net.core.netdev_budget_usecs")
        want_b, want_u = budget_suggestion(budget, usecs)
        ev = {"squeezes": int(nsq), "squeezes_per_second": round(nsq / secs, 3),
              "threshold_per_second": cfg.softirq_squeeze_rate, "window_seconds": round(secs, 1),
              "net.core.netdev_budget": budget, "net.core.netdev_budget_usecs": usecs,
              "per_cpu_squeezes": {str(c): int(v) for c, v in sorted(squeeze.items()) if v}}
        napi = {d: int(n) for (d,), n in window.delta("napi_exhausted").items()}
        if napi:
            ev["budget_exhausted_polls"] = dict(sorted(napi.items(), key=lambda kv: -kv[1])[:8])
        findings.append(Finding(
            id="softnet.time_squeeze", probe=probe, severity="warning",
            title="NET_RX runs out of budget with packets left",
            summary=(f"NET_RX stopped with work left {int(nsq)} times in {secs:.0f}s ({nsq / secs:.1f}/s): "
                     f"its budget (netdev_budget={budget} packets or netdev_budget_usecs={usecs} us) was "
                     "used up. The rest waits for the next run or for ksoftirqd, which adds latency and "
                     "leads to ring and backlog drops under load."),
            evidence=ev,
            remediation=[f"sysctl -w net.core.netdev_budget={want_b}",
                         f"sysctl -w net.core.netdev_budget_usecs={want_u}",
                         "if one CPU squeezes, spread the load instead (RSS/RPS, see softirq.imbalance)"],
            impact=nsq / secs))

    # softirq.latency_high ------------------------------------------------------------------------
    if bpf:
        findings += _latency(window, cfg, probe, secs, facts)

    # cpu.steal -------------------------------------------------------------------------------------
    steal = {cpu: v / clk_tck / secs for cpu, v in _by_cpu(ticks, "steal").items()}
    slimit = cfg.softirq_steal_percent / 100.0
    # Steal comes in bursts of 10 ms ticks: over a window of a few seconds (a daemon just
    # started) 0.2 s of it reads 5%. The share must also be a second of CPU time or more.
    stolen = sorted(c for c, s in steal.items() if s >= slimit and s * secs >= STEAL_MIN_SECONDS)
    if stolen:
        worst = max(steal[c] for c in stolen)
        findings.append(Finding(
            id="cpu.steal", probe=probe,
            severity="critical" if worst >= STEAL_CRITICAL_FACTOR * slimit else "warning",
            title="The hypervisor steals CPU time",
            summary=(f"CPU {', '.join(map(str, stolen))} lost up to {_pct(worst)}% of the last {secs:.0f}s "
                     f"to steal (threshold {cfg.softirq_steal_percent:g}%): the host ran other guests while "
                     "this node wanted the CPU. Softirqs stall with it, so latency jitters and bursts drop "
                     "although nothing on the node looks busy."),
            evidence={"window_seconds": round(secs, 1), "threshold_percent": cfg.softirq_steal_percent,
                      "per_cpu_steal_percent": {str(c): _pct(steal.get(c, 0.0)) for c in all_cpus}},
            remediation=[f"kubectl drain {facts.node()} --ignore-daemonsets   # move the workloads to a "
                         "node on a less loaded host, then replace this one",
                         "use instances with dedicated vCPUs (no burstable/shared-core types) for nodes that "
                         "carry latency-sensitive traffic"],
            impact=100 * worst))
    return findings


def _busiest_device(window: Window) -> str | None:
    napi = {d: n for (d,), n in window.delta("napi_exhausted").items()
            if d not in (NO_DEVICE, OVERFLOW_DEVICE)}
    return max(napi, key=lambda d: napi[d]) if napi else None


def _latency(window: Window, cfg, probe: str, secs: float, facts) -> list[Finding]:
    hist = window.delta("latency")
    net_hist = window.delta("net_latency")
    threshold = cfg.softirq_latency_threshold
    per_vec: dict[str, dict] = {}
    slow_rate = 0.0
    for vec in NET_VECTORS:
        h = {slot: n for (v, slot), n in hist.items() if v == vec}
        count = sum(h.values())
        slot = p99_slot(h)
        if slot is None:
            continue
        low, high = slot_bounds(slot)
        # The histogram is weighted: each timed run stands for --softirq-sample runs. The
        # sample-size rule counts timed runs, so N raises tell no more than N/sample do.
        weight = max(1, int(getattr(cfg, "softirq_sample", 1)))
        slow = sum(n for s, n in h.items() if slot_bounds(s)[0] >= threshold)
        if low < threshold or not share_exceeds(slow / weight, count / weight, 0.01):
            continue
        per_cpu = {}
        for cpu in sorted({c for (c, v, _s) in net_hist if v == vec}):
            ch = {s: n for (c, v, s), n in net_hist.items() if c == cpu and v == vec}
            cs = p99_slot(ch)
            if cs is not None:
                per_cpu[str(cpu)] = {"raises": int(sum(ch.values())),
                                     "p99_seconds_from": slot_bounds(cs)[0], "p99_seconds_below": slot_bounds(cs)[1]}
        slow_rate += slow / secs
        per_vec[vec] = {"raises": int(count), "p99_seconds_from": low, "p99_seconds_below": high,
                        "raises_over_threshold": int(slow), "timed_raises": int(count // weight),
                        "p_value_if_p99_were_below": p_value(slow / weight, count / weight, 0.01),
                        "per_cpu": per_cpu}
    if not per_vec:
        return []
    worst_cpu = None
    best = -1.0
    for v in per_vec.values():
        for cpu, row in v["per_cpu"].items():
            if row["p99_seconds_from"] > best:
                best, worst_cpu = row["p99_seconds_from"], int(cpu)
    pid = facts.ksoftirqd().get(worst_cpu) if worst_cpu is not None else None
    who = f"ksoftirqd/{worst_cpu}" if worst_cpu is not None else "ksoftirqd"
    steps = [
        f"ps -o pid,psr,pcpu,rtprio,comm -p {pid}   # is {who} busy? deferred softirqs wait for it"
        if pid else f"ps -eo pid,psr,pcpu,rtprio,comm | grep {who}   # deferred softirqs wait for it",
        (f"chrt -f -p 1 {pid}   # let {who} preempt ordinary threads" if pid
         else f"chrt -f -p 1 $(pgrep -x {who})   # let it preempt ordinary threads"),
        f"move CPU-bound threads off CPU {worst_cpu if worst_cpu is not None else 'N'} "
        "(taskset / Kubernetes CPU manager) and look for long bh-disabled sections: "
        "perf record -e irq:softirq_raise,irq:softirq_entry -C <cpu> -- sleep 5",
    ]
    return [Finding(
        id="softirq.latency_high", probe=probe, severity="warning",
        title="Raised network softirqs wait long before they run",
        summary=(f"The p99 time from raising {', '.join(per_vec)} to its handler running is at least "
                 f"{min(v['p99_seconds_from'] for v in per_vec.values()) * 1e3:.3g} ms (threshold "
                 f"{threshold * 1e3:g} ms, log2 buckets). Packets wait that long on the node before the "
                 "stack sees them: the softirq was deferred to ksoftirqd, which competes with user "
                 "threads, or bottom halves were disabled for long."),
        evidence={"window_seconds": round(secs, 1), "threshold_seconds": threshold, "vectors": per_vec,
                  "raises_over_threshold": int(sum(v["raises_over_threshold"] for v in per_vec.values()))},
        claims=("raises_over_threshold",),
        remediation=steps, impact=slow_rate)]
