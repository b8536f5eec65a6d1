"""The node findings: one pure function per finding id.

Each judges from the audit's ``Facts`` (read by probes/node/audit.py on the sampler thread),
the report window's counter deltas and the listeners sample (``ListenWindow``), and config
values passed in (the netfilter threshold). Nothing here reads the node: a value that could not
be read is None and its finding is skipped. The node probe turns each ``Result`` into a Finding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpwatch.probes.node import remedies
from dpwatch.probes.node.culprits import Culprit, ListenWindow, culprits
from dpwatch.probes.node.facts import Facts
from dpwatch.probes.node.thresholds import (
    BACKLOG_DEFAULT, BUFFER_MAX, BUFFER_MIN, BUFFER_RTT_SECONDS, CONNTRACK_ENTRY_BYTES, CONNTRACK_MEMORY_SHARE,
    CONNTRACK_MIN, CONNTRACK_PEAK_WARN, CONNTRACK_PER_CPU, INOTIFY_INSTANCES_RECOMMENDED, INOTIFY_USE_WARN,
    INOTIFY_WATCHES_RECOMMENDED, LISTEN_CRITICAL_RATE, NAMED_MAX, PORT_RANGE_DEFAULT, PORT_USE_WARN,
    SOMAXCONN_RECOMMENDED, TIME_WAIT_INFO, TIME_WAIT_WARN, mib, pow2_at_least)


@dataclass
class Result:
    """One finding's outcome, turned into a Finding by the node probe."""
    id: str
    severity: str
    title: str
    summary: str
    evidence: dict[str, Any]
    remediation: list[str]
    impact: float = 0.0
    claims: tuple[str, ...] = ()  # evidence keys the headline asserts (see probes/base.py Finding)


def conntrack_max_low(f: Facts, peak: int | None, drops: int) -> Result | None:
    cmax = f.sysctl_int("net.netfilter.nf_conntrack_max")
    count = f.sysctl_int("net.netfilter.nf_conntrack_count")
    if cmax is None:
        return None  # nf_conntrack not loaded
    peak = max(peak or 0, count or 0)
    kube_default = max(CONNTRACK_PER_CPU * f.cpus, CONNTRACK_MIN)
    want = max(kube_default, pow2_at_least(2 * peak))
    mem_cap = int(f.mem_bytes * CONNTRACK_MEMORY_SHARE / CONNTRACK_ENTRY_BYTES) if f.mem_bytes else None
    capped = mem_cap is not None and want > mem_cap
    if capped:
        want = max(pow2_at_least(mem_cap) // 2, pow2_at_least(peak))
    share = peak / cmax if cmax else 0.0
    ev = {"net.netfilter.nf_conntrack_max": cmax, "nf_conntrack_count": count, "peak_count": peak,
          "peak_fill_percent": round(100 * share, 1), "cpus": f.cpus,
          "memory_mib": round(f.mem_bytes / (1 << 20)) if f.mem_bytes else None,
          "table_memory_mib_when_full": round(cmax * CONNTRACK_ENTRY_BYTES / (1 << 20), 1),
          "recommended_max": want, "drops_in_window": drops}
    fix = remedies.conntrack(want, f.cpus)
    if share >= CONNTRACK_PEAK_WARN or drops:
        return Result("node.conntrack_max_low", "warning", "nf_conntrack_max is too small for this node",
                      f"Conntrack use peaked at {peak:,} of {cmax:,} entries ({100 * share:.0f}%) since "
                      f"dpwatch started{' and the table dropped packets' if drops else ''}. A burst of new "
                      f"connections will fill it; {want:,} keeps the peak under half full.",
                      ev, fix, impact=float(drops))
    if cmax < kube_default and not capped:
        return Result("node.conntrack_max_low", "info", "nf_conntrack_max is below the Kubernetes default",
                      f"nf_conntrack_max is {cmax:,}, below what kube-proxy would set for "
                      f"{f.cpus} CPUs ({kube_default:,}); peak use so far is {peak:,}.", ev, fix)
    return None


def somaxconn_low(f: Facts, listen: ListenWindow | None = None) -> Result | None:
    """somaxconn below the kernel default, as info. Overflowing listeners are
    node.listen_queue_overflow's: it names them, and advises somaxconn only for those it caps."""
    sample = listen.sample if listen else None
    value = sample.somaxconn if sample and sample.somaxconn is not None else f.sysctl_int("net.core.somaxconn")
    if value is None or value >= SOMAXCONN_RECOMMENDED:
        return None
    ev: dict[str, Any] = {"net.core.somaxconn": value, "recommended": SOMAXCONN_RECOMMENDED}
    summary = (f"somaxconn={value} caps every listen() backlog below the kernel default "
               f"{SOMAXCONN_RECOMMENDED}: a burst of connections to a busy server is dropped.")
    if sample and sample.ok:
        capped = [x.endpoint for x in sample.listeners if x.backlog == value]
        ev["listeners_capped_by_somaxconn"] = len(capped)
        ev["capped_listeners"] = capped[:NAMED_MAX]
        summary += (f" {len(capped)} listener(s) here are capped by it now ({', '.join(capped[:3])})."
                    if capped else " No listener here is capped by it now.")
    return Result("node.somaxconn_low", "info", "net.core.somaxconn is low", summary, ev, remedies.somaxconn())


def _refused_summary(lw: ListenWindow, rate: float) -> str:
    extra = lw.drops - lw.overflows
    if lw.overflows:
        summary = (f"{lw.overflows:,} connection attempts were refused because a listener's accept queue "
                   f"was full ({rate:.1f}/s; {lw.passive_opens:,} were accepted meanwhile).")
        if extra > 0:
            summary += (f" {extra:,} more were dropped before reaching the accept queue (a full SYN queue "
                        "without syncookies, or no memory: see TcpExt TCPReqQFullDrop).")
        return summary
    return (f"{lw.drops:,} connection attempts were dropped before reaching a listener's accept "
            f"queue ({rate:.1f}/s; {lw.passive_opens:,} were accepted meanwhile): a full SYN queue "
            "without syncookies, or no memory (see TcpExt TCPReqQFullDrop).")


def _culprit_summary(found: list[Culprit], somax: int | None) -> str:
    top = found[0]
    x = top.listener
    age = top.tracked.get("last_full_seconds_ago")
    state = "full" if x.full else (f"full {age:g} s ago" if age is not None else "not full now")
    summary = (f" {top.who()} has a listen() backlog of {x.backlog} and {x.queue} connection(s) "
               f"waiting for accept() ({state}): ")
    if top.capped:
        summary += f"net.core.somaxconn={somax} caps its backlog, so raise both."
    elif somax is not None:
        summary += (f"the application accepts too slowly or asked for too small a backlog; "
                    f"somaxconn={somax} does not cap it, so raising somaxconn changes nothing.")
    else:
        summary += "the application accepts too slowly or asked for too small a backlog."
    if len(found) > 1:
        summary += f" {len(found) - 1} more listener(s) overflowed too (see listeners)."
    return summary


def _listen_evidence(lw: ListenWindow, rate: float, found: list[Culprit]) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "listen_overflows_in_window": lw.overflows, "listen_drops_in_window": lw.drops,
        "passive_opens_in_window": lw.passive_opens, "refused_per_second": round(rate, 3),
        "net.core.somaxconn": lw.somaxconn,
        "listeners": [c.evidence() for c in found[:NAMED_MAX]],
        "listeners_named_total": len(found),
    }
    sample = lw.sample
    if sample is not None:
        ev["listeners_read"] = len(sample.listeners)
        ev["listeners_full_now"] = sum(1 for x in sample.listeners if x.full)
        if sample.error:
            ev["read_error"] = sample.error
    unseen = [c.listener.endpoint for c in found[:NAMED_MAX] if c.owners == []]
    if unseen:
        ev["owner_note"] = (f"no process the daemon can see holds {', '.join(unseen)}: its owner runs in "
                            "another pid namespace (the DaemonSet has no hostPID), or as another user "
                            "(reading its /proc/PID/fd needs CAP_SYS_PTRACE)")
    return ev


def listen_queue_overflow(lw: ListenWindow | None) -> Result | None:
    """Connection attempts a listener refused in the window (TcpExt ListenOverflows: its accept
    queue was full; ListenDrops: those and the SYNs dropped before it), with the listeners
    that refused them named (see probes/node/listeners.py)."""
    if lw is None or (lw.overflows <= 0 and lw.drops <= 0):
        return None
    refused = max(lw.overflows, lw.drops)
    rate = refused / max(lw.seconds, 1e-9)
    found = culprits(lw)
    critical = rate >= LISTEN_CRITICAL_RATE and refused >= lw.passive_opens
    summary = _refused_summary(lw, rate)
    if found:
        summary += _culprit_summary(found, lw.somaxconn)
    elif lw.sample is not None and lw.sample.ok:
        summary += (" No listener of this netns counted drops or was seen full in the window: it closed "
                    "since, or its queue filled and drained between two samples.")
    title, claim = (("A listener's accept queue overflows", "listen_overflows_in_window") if lw.overflows
                    else ("Listeners drop connection attempts", "listen_drops_in_window"))
    return Result("node.listen_queue_overflow", "critical" if critical else "warning", title, summary,
                  _listen_evidence(lw, rate, found), remedies.listen_overflow(found, lw.somaxconn),
                  impact=float(refused), claims=(claim,))


def port_range_small(f: Facts) -> Result | None:
    rng = f.port_range()
    if rng is None:
        return None
    size = rng[1] - rng[0] + 1
    busiest = (f.busiest_destination or {}).get("sockets", 0)
    used = max(busiest, 0)
    share = used / size
    want_size = max(PORT_RANGE_DEFAULT, pow2_at_least(4 * used))
    lo = max(1024, min(32768, 65536 - want_size))  # the range ends at 65535; 32768 at the latest
    ev = {"net.ipv4.ip_local_port_range": f"{rng[0]} {rng[1]}", "range_size": size,
          "ephemeral_ports_in_use": f.ephemeral_ports_in_use,
          "busiest_destination": (f.busiest_destination or {}).get("destination"),
          "busiest_destination_sockets": busiest,
          "time_wait": f.tcp_states.get("TIME_WAIT", 0), "tcp_states": f.tcp_states}
    fix = remedies.port_range(lo, used)
    if share >= PORT_USE_WARN:
        return Result("node.port_range_small", "warning", "Ephemeral ports running out",
                      f"{busiest} sockets toward {ev['busiest_destination']} use {100 * share:.0f}% of the "
                      f"{size} ephemeral ports ({rng[0]}-{rng[1]}); new connections to it will fail "
                      "with EADDRNOTAVAIL.", ev, fix, impact=float(busiest))
    if size < PORT_RANGE_DEFAULT:
        return Result("node.port_range_small", "info", "The ephemeral port range is small",
                      f"ip_local_port_range {rng[0]}-{rng[1]} gives {size} ports, fewer than the kernel "
                      f"default {PORT_RANGE_DEFAULT}; the busiest destination has {busiest} sockets.", ev, fix)
    return None


def tcp_tw_reuse_off(f: Facts) -> Result | None:
    reuse = f.sysctl_int("net.ipv4.tcp_tw_reuse")
    rng = f.port_range()
    if reuse is None or rng is None or reuse == 1:
        return None
    size = rng[1] - rng[0] + 1
    tw = f.tcp_states.get("TIME_WAIT", 0)
    share = tw / size
    if share < TIME_WAIT_INFO:
        return None
    ev = {"net.ipv4.tcp_tw_reuse": reuse, "time_wait": tw, "range_size": size,
          "time_wait_share_of_range_percent": round(100 * share, 1),
          "net.ipv4.tcp_timestamps": f.sysctl_int("net.ipv4.tcp_timestamps")}
    sev = "warning" if share >= TIME_WAIT_WARN else "info"
    mode = {0: "off", 2: "loopback only"}.get(reuse, str(reuse))
    return Result("node.tcp_tw_reuse_off", sev, "TIME_WAIT sockets hold ephemeral ports",
                  f"{tw} TCP sockets are in TIME_WAIT ({100 * share:.0f}% of the {size}-port ephemeral "
                  f"range) and tcp_tw_reuse is {reuse} ({mode}): outgoing connections cannot reuse them.",
                  ev, remedies.tw_reuse(ev["net.ipv4.tcp_timestamps"]),
                  impact=float(tw) if sev == "warning" else 0.0)


def netdev_max_backlog_low(f: Facts, backlog_drops: int) -> Result | None:
    value = f.sysctl_int("net.core.netdev_max_backlog")
    if value is None:
        return None
    by_speed = pow2_at_least(f.fastest_link_mbps) if f.fastest_link_mbps else BACKLOG_DEFAULT
    want = min(65536, max(BACKLOG_DEFAULT, by_speed, 2 * value if backlog_drops else 0))
    if value >= want and not backlog_drops:
        return None
    ev = {"net.core.netdev_max_backlog": value, "fastest_link_mbps": f.fastest_link_mbps,
          "backlog_drops_in_window": backlog_drops, "recommended": want}
    fix = remedies.backlog(want)
    if backlog_drops:
        return Result("node.netdev_max_backlog_low", "warning", "The input backlog overflows",
                      f"{backlog_drops} packets were dropped because a CPU's input backlog "
                      f"(netdev_max_backlog={value}) was full.", ev, fix, impact=float(backlog_drops))
    return Result("node.netdev_max_backlog_low", "info", "netdev_max_backlog is low for the link speed",
                  f"netdev_max_backlog={value} packets per CPU is small for a {f.fastest_link_mbps} Mbit/s "
                  f"link; bursts will be dropped.", ev, fix)


def socket_buffers_small(f: Facts, buffer_errors: int) -> Result | None:
    rmax = f.sysctl_int("net.core.rmem_max")
    wmax = f.sysctl_int("net.core.wmem_max")
    if rmax is None or wmax is None:
        return None
    speed = f.fastest_link_mbps
    bdp = speed * 1e6 / 8 * BUFFER_RTT_SECONDS if speed else 0
    want = min(BUFFER_MAX, max(BUFFER_MIN, pow2_at_least(bdp) if bdp else 16 << 20))
    if buffer_errors:
        want = min(BUFFER_MAX, max(want, pow2_at_least(2 * max(rmax, wmax))))
    if min(rmax, wmax) >= want and not buffer_errors:
        return None
    ev = {"net.core.rmem_max": rmax, "net.core.wmem_max": wmax, "fastest_link_mbps": speed,
          "buffer_errors_in_window": buffer_errors, "recommended": want}
    fix = remedies.buffers(want)
    basis = (f"the {speed} Mbit/s link at {BUFFER_RTT_SECONDS * 1000:.0f} ms RTT needs {mib(bdp)}"
             if bdp else "links of unknown speed (virtual NICs) are sized for 10 Gbit/s")
    if buffer_errors:
        return Result("node.socket_buffers_small", "warning", "Socket buffers overflow (rmem_max/wmem_max)",
                      f"{buffer_errors} UDP datagrams were lost to full socket buffers in this window; "
                      f"rmem_max={rmax} and wmem_max={wmax} cap what applications may ask for.",
                      ev, fix, impact=float(buffer_errors))
    return Result("node.socket_buffers_small", "info", "rmem_max/wmem_max are small",
                  f"rmem_max={rmax} and wmem_max={wmax} cap socket buffers below {want} ({basis}).", ev, fix)


def congestion_control(f: Facts) -> Result | None:
    cc = f.sysctls.get("net.ipv4.tcp_congestion_control")
    qdisc = f.sysctls.get("net.core.default_qdisc")
    if not cc:
        return None
    if cc == "bbr" and qdisc in ("fq", None):  # None: not visible from this netns, no advice
        return None
    avail = f.sysctls.get("net.ipv4.tcp_available_congestion_control") or ""
    ev = {"net.ipv4.tcp_congestion_control": cc, "net.core.default_qdisc": qdisc,
          "available": avail, "tcp_bbr": f.bbr}
    where = {"available": "tcp_bbr is available", "module": "tcp_bbr exists as a module (not loaded)",
             "absent": "tcp_bbr is not available on this kernel"}[f.bbr]
    if cc == "bbr":
        summary = f"BBR runs with default_qdisc={qdisc}; BBR paces best with fq."
    else:
        summary = (f"TCP uses {cc} with default_qdisc={qdisc}; bbr with fq keeps throughput up and "
                   f"queues short on lossy or long paths ({where}).")
    return Result("node.congestion_control", "info", "TCP congestion control is not bbr with fq",
                  summary, ev, remedies.congestion(cc, f.bbr))


def inotify_limits_low(f: Facts) -> Result | None:
    watches = f.sysctl_int("fs.inotify.max_user_watches")
    inst = f.sysctl_int("fs.inotify.max_user_instances")
    if watches is None or inst is None:
        return None
    used_i = f.inotify.get("instances_in_use", 0)
    used_w = f.inotify.get("watches_in_use", 0)
    want_w = max(INOTIFY_WATCHES_RECOMMENDED, pow2_at_least(2 * used_w) if used_w else 0)
    want_i = max(INOTIFY_INSTANCES_RECOMMENDED, pow2_at_least(2 * used_i) if used_i else 0)
    hot = (inst and used_i >= INOTIFY_USE_WARN * inst) or (watches and used_w >= INOTIFY_USE_WARN * watches)
    if watches >= want_w and inst >= want_i and not hot:
        return None
    ev = {"fs.inotify.max_user_watches": watches, "fs.inotify.max_user_instances": inst,
          **f.inotify, "recommended_watches": want_w, "recommended_instances": want_i}
    fix = remedies.inotify(max(watches, want_w), max(inst, want_i))
    if hot:
        return Result("node.inotify_limits_low", "warning", "inotify limits nearly reached",
                      f"One user holds {used_i} of {inst} inotify instances and {used_w} of {watches} "
                      "watches: the next kubelet, container runtime or log agent watch fails with "
                      "'too many open files' or ENOSPC.", ev, fix)
    return Result("node.inotify_limits_low", "info", "inotify limits are low for a Kubernetes node",
                  f"max_user_watches={watches} and max_user_instances={inst}: container runtimes, "
                  f"kubelet and log agents on a busy node need about {INOTIFY_WATCHES_RECOMMENDED} and "
                  f"{INOTIFY_INSTANCES_RECOMMENDED}.", ev, fix)


def rule_count_high(f: Facts, threshold: int) -> Result | None:
    """netfilter.rule_count_high: ``threshold`` is --netfilter-rules-warning."""
    nf = f.netfilter
    total = nf.get("total_rules") or 0
    if total < threshold:
        return None
    ev = {k: nf.get(k) for k in ("total_rules", "nft_rules", "iptables_legacy_rules",
                                  "ip6tables_legacy_rules", "kube_svc_chains", "kube_sep_chains",
                                  "kube_proxy_rules")}
    ev["threshold"] = threshold
    ev["top_chains"] = nf.get("top_chains", [])
    kube = nf.get("kube_svc_chains", 0)
    if kube:
        summary = (f"The kernel holds {total:,} netfilter rules, {nf.get('kube_proxy_rules', 0):,} of them in "
                   f"kube-proxy chains ({kube:,} KUBE-SVC-* services). Every new connection walks "
                   "these chains linearly, and each kube-proxy sync rewrites them: latency and CPU "
                   "grow with the number of services.")
    else:
        summary = (f"The kernel holds {total:,} netfilter rules (threshold {threshold:,}). Rules are "
                   "evaluated linearly per packet: long chains cost CPU on every new connection.")
    return Result("netfilter.rule_count_high", "warning", "Very many netfilter rules",
                  summary, ev, remedies.netfilter(bool(kube)), impact=0.0)


def overlay_in_use(f: Facts) -> Result | None:
    up = [o for o in f.overlays if o.get("up")]
    if not up:
        return None
    worst = max((o.get("overhead") or 0 for o in up), default=0)
    ev = {"overlay_devices": up, "overhead_bytes": worst,
          "overhead_percent_of_1500": round(100 * worst / 1500, 1)}
    names = ", ".join(f"{o['name']} ({o['kind']})" for o in up[:5])
    return Result("node.overlay_in_use", "info", "Pod traffic pays the overlay tax",
                  f"Overlay devices are up: {names}. Each packet carries {worst} bytes of "
                  f"encapsulation ({ev['overhead_percent_of_1500']}% of a 1500-byte MTU) and costs "
                  "encapsulation CPU; MTUs must account for it (see mtu.mismatch).",
                  ev, remedies.overlay(worst))


def check(f: Facts, *, conntrack_peak: int | None = None, conntrack_drops: int = 0,
          listen: ListenWindow | None = None, buffer_errors: int = 0, backlog_drops: int = 0,
          netfilter_threshold: int = 10000) -> list[Result]:
    """Every node finding over one audit's facts and one window's values, in a fixed order."""
    results = [
        conntrack_max_low(f, conntrack_peak, conntrack_drops),
        listen_queue_overflow(listen),
        somaxconn_low(f, listen),
        port_range_small(f),
        tcp_tw_reuse_off(f),
        netdev_max_backlog_low(f, backlog_drops),
        socket_buffers_small(f, buffer_errors),
        congestion_control(f),
        inotify_limits_low(f) if f.inotify else None,
        rule_count_high(f, netfilter_threshold),
        overlay_in_use(f),
    ]
    return [r for r in results if r is not None]
