"""The softirq probe's findings: one pure function per finding id, over one window's Load
(probes/softirq/load.py), the probe's settings (``cfg.softirq_*``) and the NodeFacts read in
collect (probes/softirq/facts.py). None of them reads the node.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from dpwatch.daemon.host import procnet
from dpwatch.probes.base import Finding, Window
from dpwatch.probes.sample import p_value, share_exceeds
from dpwatch.probes.softirq.facts import NodeFacts
from dpwatch.probes.softirq.histogram import p99_slot, slot_bounds
from dpwatch.probes.softirq.load import NET_VECTORS, Load, by_cpu, derive

PROBE = "softirq"
IMBALANCE_MIN_SHARE = 0.10   # the busiest CPU must spend this share in net softirqs to call a skew
STEAL_CRITICAL_FACTOR = 4    # steal at 4x the threshold is critical
STEAL_MIN_SECONDS = 1.0      # and at least this much stolen from the CPU: a short window's blip is not steal
SATURATED_CRITICAL = 0.90
BACKLOG_CRITICAL_SHARE = 0.01  # backlog drops at 1% of the packets the CPUs processed
BACKLOG_MAX = 1 << 18
RFS_FLOWS = 32768


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


def _pct(x: float) -> float:
    return round(100 * x, 2)


def spread_steps(load: Load, facts: NodeFacts, busy: list[int]) -> list[str]:
    """Commands that move receive processing off the ``busy`` CPUs (RPS, RFS, RSS, irqbalance)."""
    dev = load.busiest_device() or facts.default_device or "<nic>"
    others = [c for c in load.cpus if c not in busy] or load.cpus
    mask = procnet.cpu_mask(others)
    nq = facts.queues(dev) if dev != "<nic>" else 1
    return [
        f"echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus   # RPS: steer packet "
        f"processing to CPU(s) {','.join(map(str, others))} (repeat for every rx-* queue)",
        f"sysctl -w net.core.rps_sock_flow_entries={RFS_FLOWS}   # RFS, with "
        f"echo {RFS_FLOWS // nq} > /sys/class/net/{dev}/queues/rx-0/rps_flow_cnt ({nq} rx queue(s))",
        f"ethtool -L {dev} combined {load.ncpu}   # RSS: one hardware queue per CPU, if the NIC has them",
        "systemctl enable --now irqbalance   # spread NIC interrupts (check: grep . /proc/irq/*/smp_affinity_list)",
    ]


def cpu_saturated(load: Load, cfg: Any, facts: NodeFacts) -> Finding | None:
    """A CPU spends at least --softirq-saturated-percent of the window in network softirqs."""
    secs, share, processed = load.secs, load.share, load.per_cpu("processed")
    hot = sorted(cpu for cpu, s in share.items() if s >= cfg.softirq_saturated_percent / 100.0)
    if not hot:
        return None
    pps = sum(processed.get(c, 0) for c in hot) / secs
    per_cpu = {str(c): {"net_softirq_percent": _pct(share[c]),
                        "net_rx_seconds": round(load.rx_s.get(c, 0.0), 4),
                        "net_tx_seconds": round(load.tx_s.get(c, 0.0), 4),
                        "packets_per_second": round(processed.get(c, 0) / secs, 1)}
               for c in hot}
    worst = max(share[c] for c in hot)
    return Finding(
        id="softirq.cpu_saturated", probe=PROBE,
        severity="critical" if worst >= SATURATED_CRITICAL else "warning",
        title="A CPU is saturated by packet processing",
        summary=(f"CPU {', '.join(map(str, hot))} spent {_pct(worst)}% of the last {secs:.0f}s in "
                 f"network softirqs (threshold {cfg.softirq_saturated_percent:g}%). Packets that "
                 "land on a saturated CPU queue up and are squeezed or dropped while the other CPUs "
                 "idle: spread receive processing."),
        evidence={"basis": load.basis, "window_seconds": round(secs, 1),
                  "threshold_percent": cfg.softirq_saturated_percent, "per_cpu": per_cpu},
        remediation=spread_steps(load, facts, hot), impact=pps or 100 * worst)


def _imbalance_summary(load: Load, cfg: Any, busiest: int, ratio: float, hurt: dict[str, int]) -> str:
    total = sum(load.net_s.values())
    head = (f"CPU {busiest} carries {100 * load.net_s[busiest] / total:.0f}% of the node's network "
            f"softirq time ({ratio:.2f}x the mean over {load.ncpu} CPUs, threshold "
            f"{cfg.softirq_imbalance_ratio:g}x); it is {_pct(load.share[busiest])}% busy with it. ")
    if any(hurt.values()):
        return head + (f"It dropped {hurt['dropped']} packets from its backlog and ran out of budget "
                       f"{hurt['time_squeeze']} times: one queue or one interrupt takes the packets.")
    return head + ("It drops nothing and keeps up: one queue, one interrupt or a few big flows "
                   "(each flow stays on one CPU whatever the steering). Spread it only if the "
                   "traffic is many flows.")


def imbalance(load: Load, cfg: Any, facts: NodeFacts) -> Finding | None:
    """One CPU carries --softirq-imbalance-ratio times the mean network softirq time."""
    net_s, secs = load.net_s, load.secs
    total = sum(net_s.values())
    if load.ncpu <= 1 or total <= 0:
        return None
    busiest = max(net_s, key=lambda c: net_s[c])
    ratio = net_s[busiest] / (total / load.ncpu)
    if ratio < cfg.softirq_imbalance_ratio or load.share.get(busiest, 0) < IMBALANCE_MIN_SHARE:
        return None
    # A skew is a problem when the busy CPU pays for it: it drops or squeezes packets.
    # Without that it is how one big flow looks (RSS and RPS hash per flow, so a bulk
    # transfer lands on one CPU whatever the steering): a note, not a warning.
    hurt = {k: int(load.per_cpu(k).get(busiest, 0)) for k in ("dropped", "time_squeeze")}
    harmful = any(hurt.values())
    return Finding(
        id="softirq.imbalance", probe=PROBE, severity="warning" if harmful else "info",
        title="Network softirq load is skewed across CPUs",
        summary=_imbalance_summary(load, cfg, busiest, ratio, hurt),
        evidence={"basis": load.basis, "window_seconds": round(secs, 1), "busiest_cpu": busiest,
                  "ratio_to_mean": round(ratio, 3), "threshold_ratio": cfg.softirq_imbalance_ratio,
                  "busiest_cpu_backlog_drops": hurt["dropped"],
                  "busiest_cpu_time_squeezes": hurt["time_squeeze"],
                  "per_cpu_percent": {str(c): _pct(min(1.0, net_s.get(c, 0) / secs)) for c in load.cpus}},
        remediation=spread_steps(load, facts, [busiest]),
        impact=load.per_cpu("processed").get(busiest, 0) / secs if harmful else 0.0)


def backlog_drops(load: Load, cfg: Any, facts: NodeFacts) -> Finding | None:
    """Packets dropped because a CPU's input backlog (netdev_max_backlog) was full."""
    secs, dropped, processed = load.secs, load.per_cpu("dropped"), load.per_cpu("processed")
    ndrop = sum(dropped.values())
    if ndrop <= 0:
        return None
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
    if load.ncpu > 1 and dropped[worst_cpu] >= 0.8 * ndrop:
        steps += spread_steps(load, facts, [worst_cpu])[:1]
    return Finding(
        id="softnet.backlog_drops", probe=PROBE,
        severity="critical" if seen and ndrop / seen >= BACKLOG_CRITICAL_SHARE else "warning",
        title="Packets dropped: the per-CPU backlog is full",
        summary=(f"{int(ndrop)} packets were dropped in {secs:.0f}s ({ndrop / secs:.1f}/s) because a "
                 f"CPU's input backlog was full ({held}). Packets enqueued by netif_rx (veth, "
                 "loopback, RPS, tunnels) arrive faster than that CPU's NET_RX softirq drains them."),
        evidence={"drops": int(ndrop), "drops_per_second": round(ndrop / secs, 3),
                  "window_seconds": round(secs, 1), "net.core.netdev_max_backlog": current,
                  "per_cpu_drops": {str(c): int(v) for c, v in sorted(dropped.items()) if v},
                  "per_cpu_processed": {str(c): int(v) for c, v in sorted(processed.items()) if v}},
        remediation=steps, impact=ndrop / secs)


def time_squeeze(load: Load, cfg: Any, facts: NodeFacts) -> Finding | None:
    """NET_RX stops with work left at least --softirq-squeeze-rate times a second."""
    secs, squeeze = load.secs, load.per_cpu("time_squeeze")
    nsq = sum(squeeze.values())
    if nsq <= 0 or nsq / secs < cfg.softirq_squeeze_rate:
        return None
    budget = facts.sysctl("net.core.netdev_budget")
    usecs = facts.sysctl("net.core.netdev_budget_usecs")
    want_b, want_u = budget_suggestion(budget, usecs)
    ev = {"squeezes": int(nsq), "squeezes_per_second": round(nsq / secs, 3),
          "threshold_per_second": cfg.softirq_squeeze_rate, "window_seconds": round(secs, 1),
          "net.core.netdev_budget": budget, "net.core.netdev_budget_usecs": usecs,
          "per_cpu_squeezes": {str(c): int(v) for c, v in sorted(squeeze.items()) if v}}
    if load.napi:
        ev["budget_exhausted_polls"] = dict(sorted(load.napi.items(), key=lambda kv: -kv[1])[:8])
    return Finding(
        id="softnet.time_squeeze", probe=PROBE, severity="warning",
        title="NET_RX runs out of budget with packets left",
        summary=(f"NET_RX stopped with work left {int(nsq)} times in {secs:.0f}s ({nsq / secs:.1f}/s): "
                 f"its budget (netdev_budget={budget} packets or netdev_budget_usecs={usecs} us) was "
                 "used up. The rest waits for the next run or for ksoftirqd, which adds latency and "
                 "leads to ring and backlog drops under load."),
        evidence=ev,
        remediation=[f"sysctl -w net.core.netdev_budget={want_b}",
                     f"sysctl -w net.core.netdev_budget_usecs={want_u}",
                     "if one CPU squeezes, spread the load instead (RSS/RPS, see softirq.imbalance)"],
        impact=nsq / secs)


def _per_cpu_latency(load: Load, vec: str) -> dict[str, dict]:
    per_cpu = {}
    net_hist = load.net_latency
    for cpu in sorted({c for (c, v, _s) in net_hist if v == vec}):
        ch = {s: n for (c, v, s), n in net_hist.items() if c == cpu and v == vec}
        cs = p99_slot(ch)
        if cs is not None:
            per_cpu[str(cpu)] = {"raises": int(sum(ch.values())),
                                 "p99_seconds_from": slot_bounds(cs)[0], "p99_seconds_below": slot_bounds(cs)[1]}
    return per_cpu


def _vector_latency(load: Load, cfg: Any, vec: str) -> tuple[dict, float] | None:
    """One net vector's evidence and its raises over the threshold, when its p99 is slow."""
    threshold = cfg.softirq_latency_threshold
    h = {slot: n for (v, slot), n in load.latency.items() if v == vec}
    count = sum(h.values())
    slot = p99_slot(h)
    if slot is None:
        return None
    low, high = slot_bounds(slot)
    # The histogram is weighted: each timed run stands for --softirq-sample runs. The
    # sample-size rule counts timed runs, so N raises tell no more than N/sample do.
    weight = max(1, int(getattr(cfg, "softirq_sample", 1)))
    slow = sum(n for s, n in h.items() if slot_bounds(s)[0] >= threshold)
    if low < threshold or not share_exceeds(slow / weight, count / weight, 0.01):
        return None
    return {"raises": int(count), "p99_seconds_from": low, "p99_seconds_below": high,
            "raises_over_threshold": int(slow), "timed_raises": int(count // weight),
            "p_value_if_p99_were_below": p_value(slow / weight, count / weight, 0.01),
            "per_cpu": _per_cpu_latency(load, vec)}, slow


def _latency_steps(per_vec: dict[str, dict], facts: NodeFacts) -> list[str]:
    worst_cpu = None
    best = -1.0
    for v in per_vec.values():
        for cpu, row in v["per_cpu"].items():
            if row["p99_seconds_from"] > best:
                best, worst_cpu = row["p99_seconds_from"], int(cpu)
    pid = facts.ksoftirqd.get(worst_cpu) if worst_cpu is not None else None
    who = f"ksoftirqd/{worst_cpu}" if worst_cpu is not None else "ksoftirqd"
    return [
        f"ps -o pid,psr,pcpu,rtprio,comm -p {pid}   # is {who} busy? deferred softirqs wait for it"
        if pid else f"ps -eo pid,psr,pcpu,rtprio,comm | grep {who}   # deferred softirqs wait for it",
        (f"chrt -f -p 1 {pid}   # let {who} preempt ordinary threads" if pid
         else f"chrt -f -p 1 $(pgrep -x {who})   # let it preempt ordinary threads"),
        f"move CPU-bound threads off CPU {worst_cpu if worst_cpu is not None else 'N'} "
        "(taskset / Kubernetes CPU manager) and look for long bh-disabled sections: "
        "perf record -e irq:softirq_raise,irq:softirq_entry -C <cpu> -- sleep 5",
    ]


def latency_high(load: Load, cfg: Any, facts: NodeFacts) -> Finding | None:
    """The p99 raise-to-run latency of NET_RX or NET_TX is at least --softirq-latency-threshold
    (the irq tracepoints only)."""
    if not load.bpf:
        return None
    per_vec: dict[str, dict] = {}
    slow_rate = 0.0
    for vec in NET_VECTORS:
        found = _vector_latency(load, cfg, vec)
        if found is not None:
            per_vec[vec] = found[0]
            slow_rate += found[1] / load.secs
    if not per_vec:
        return None
    threshold = cfg.softirq_latency_threshold
    return Finding(
        id="softirq.latency_high", probe=PROBE, severity="warning",
        title="Raised network softirqs wait long before they run",
        summary=(f"The p99 time from raising {', '.join(per_vec)} to its handler running is at least "
                 f"{min(v['p99_seconds_from'] for v in per_vec.values()) * 1e3:.3g} ms (threshold "
                 f"{threshold * 1e3:g} ms, log2 buckets). Packets wait that long on the node before the "
                 "stack sees them: the softirq was deferred to ksoftirqd, which competes with user "
                 "threads, or bottom halves were disabled for long."),
        evidence={"window_seconds": round(load.secs, 1), "threshold_seconds": threshold, "vectors": per_vec,
                  "raises_over_threshold": int(sum(v["raises_over_threshold"] for v in per_vec.values()))},
        claims=("raises_over_threshold",),
        remediation=_latency_steps(per_vec, facts), impact=slow_rate)


def cpu_steal(load: Load, cfg: Any, facts: NodeFacts) -> Finding | None:
    """A CPU lost at least --softirq-steal-percent of the window, and a second or more, to steal."""
    secs = load.secs
    steal = {cpu: v / load.clk_tck / secs for cpu, v in by_cpu(load.ticks, "steal").items()}
    slimit = cfg.softirq_steal_percent / 100.0
    # Steal comes in bursts of 10 ms ticks: over a window of a few seconds (a daemon just
    # started) 0.2 s of it reads 5%. The share must also be a second of CPU time or more.
    stolen = sorted(c for c, s in steal.items() if s >= slimit and s * secs >= STEAL_MIN_SECONDS)
    if not stolen:
        return None
    worst = max(steal[c] for c in stolen)
    return Finding(
        id="cpu.steal", probe=PROBE,
        severity="critical" if worst >= STEAL_CRITICAL_FACTOR * slimit else "warning",
        title="The hypervisor steals CPU time",
        summary=(f"CPU {', '.join(map(str, stolen))} lost up to {_pct(worst)}% of the last {secs:.0f}s "
                 f"to steal (threshold {cfg.softirq_steal_percent:g}%): the host ran other guests while "
                 "this node wanted the CPU. Softirqs stall with it, so latency jitters and bursts drop "
                 "although nothing on the node looks busy."),
        evidence={"window_seconds": round(secs, 1), "threshold_percent": cfg.softirq_steal_percent,
                  "per_cpu_steal_percent": {str(c): _pct(steal.get(c, 0.0)) for c in load.cpus}},
        remediation=[f"kubectl drain {facts.node} --ignore-daemonsets   # move the workloads to a "
                     "node on a less loaded host, then replace this one",
                     "use instances with dedicated vCPUs (no burstable/shared-core types) for nodes that "
                     "carry latency-sensitive traffic"],
        impact=100 * worst)


# In the order the report lists them; one function per id of SoftirqProbe.finding_ids.
FINDINGS: dict[str, Callable[[Load, Any, NodeFacts], Finding | None]] = {
    "softirq.cpu_saturated": cpu_saturated,
    "softirq.imbalance": imbalance,
    "softnet.backlog_drops": backlog_drops,
    "softnet.time_squeeze": time_squeeze,
    "softirq.latency_high": latency_high,
    "cpu.steal": cpu_steal,
}


def analyse(window: Window, cfg: Any, clk_tck: int, facts: NodeFacts) -> list[Finding]:
    """Every finding of the probe over one window."""
    load = derive(window, clk_tck, facts.cpus)
    return [f for f in (check(load, cfg, facts) for check in FINDINGS.values()) if f is not None]
