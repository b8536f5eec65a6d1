"""The markdown report. Budgets are judged here (MET / MISS / n/a); nothing asserts them."""

from __future__ import annotations

import math
import statistics

MIB = 1024  # kB per MiB

# (key, label, budget text, limit, unit). Lower is better for every one of them.
BUDGETS = [
    ("pps_loss", "UDP 64 B pps loss at saturation, every packet dropped (median of pairs)", "<= 3 %", 3.0, "%"),
    ("d_p99", "added p99 request/response latency (median of pairs)", "<= 5 us", 5.0, "us"),
    ("ns_per_run", "in-kernel ns per invocation (worst dpwatch program, bpftool)", "<= 60 ns", 60.0, "ns"),
    ("startup", "start-up to first good scrape (worst of all default starts)", "<= 5 s", 5.0, "s"),
    ("rss_anon", "steady RssAnon", "<= 40 MiB", 40.0, "MiB"),
    ("idle_cpu", "idle CPU", "<= 0.3 CPU-s/min (0.5 % of a core)", 0.3, "CPU-s/min"),
    ("scrape_p99", "/metrics p99, default series", "<= 20 ms", 20.0, "ms"),
    ("scrape10k_p99", "/metrics p99, +10k synthetic series", "<= 80 ms", 80.0, "ms"),
]


def ok(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def f(x, spec: str = ".2f", na: str = "n/a") -> str:
    return format(x, spec) if ok(x) else na


def mib(kb) -> str:
    return f"{kb / MIB:.1f}" if ok(kb) else "n/a"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def budget_values(r: dict) -> dict[str, float | None]:
    dp, bc, dc = r.get("datapath", {}), r.get("bpf", {}), r.get("daemon", {})
    syn = dc.get("synthetic") or {}
    starts = r.get("startups") or []
    return {
        "pps_loss": dp.get("pps_loss_pct"),
        "d_p99": dp.get("median_d_p99"),
        "ns_per_run": bc.get("max_ns_per_run"),
        "startup": max(starts) if starts else None,
        "rss_anon": dc["steady"]["RssAnon"] / MIB if "steady" in dc else None,
        "idle_cpu": dc["idle_cpu"] * 60 / dc["idle_wall"] if "idle_cpu" in dc else None,
        "scrape_p99": dc.get("scrape", {}).get("p99"),
        "scrape10k_p99": syn.get("p99"),
    }


def verdicts(r: dict) -> list[tuple[str, str, str, str]]:
    vals = budget_values(r)
    out = []
    for key, label, text, limit, unit in BUDGETS:
        v = vals.get(key)
        if not ok(v):
            out.append((label, "n/a", text, "n/a"))
        else:
            out.append((label, f"{v:.2f} {unit}", text, "MET" if v <= limit else "MISS"))
    return out


def render(r: dict) -> str:
    """The whole report; a section whose data is incomplete (its stage failed part-way) says
    so instead of breaking the report."""
    L: list[str] = []
    for section in (_head, _section1, _section2, _section2b, _section3, _section4, _tail):
        try:
            section(r, L)
        except Exception as exc:  # noqa: BLE001 - the stage's own error is listed at the end
            L.append(f"(incomplete: {type(exc).__name__}: {exc})")
            L.append("")
    return "\n".join(L)


def _head(r: dict, L: list[str]) -> None:
    s = r["settings"]
    m = r["machine"]
    L.append(f"# dpwatch overhead benchmark{' (SMOKE: tiny durations, numbers are not meaningful)' if s.smoke else ''}")
    L.append("")
    L += table(["machine", ""], [
        ["kernel", m["kernel"]], ["CPU", m["cpu"]], ["vCPUs", m["vcpus"]], ["memory", m["memory"]],
        ["date", m["date"]], ["tools", m["tools"]],
        ["load average (1/5/15 min) at start / end", f"{r.get('load_start', '?')} / {r.get('load_end', '?')}"],
        ["other busy processes at start / end (>20 % of a core)",
         f"{', '.join(r.get('busy_start') or []) or 'none'} / {', '.join(r.get('busy_end') or []) or 'none'}"],
        ["wall time", f"{r.get('wall', float('nan')):.0f} s"],
    ])
    L.append("")
    L.append(f"Settings: {s.pairs} off/on pairs; per half: trafgen {s.udp_seconds:g} s to the dropping sink, "
             f"{s.fwd_seconds:g} s on the forwarded path (each after {s.settle_seconds:g} s settling), "
             f"sockperf {s.lat_seconds:g} s; idle {s.idle_seconds:g} s; {s.scrapes} scrapes; "
             f"{s.diagnose_requests} /diagnose requests per format.")
    L.append("")

    L.append("## Budgets")
    L.append("")
    L += table(["what", "measured", "budget", "verdict"], [list(v) for v in verdicts(r)])
    L.append("")


def _section1(r: dict, L: list[str]) -> None:
    L.append("## 1. Datapath impact (pod -> node over veth)")
    L.append("")
    dp = r.get("datapath", {})
    if dp.get("pairs"):
        rows = []
        for p in dp["pairs"]:
            off, on = p["off"], p["on"]
            rows.append([p["pair"], f"{off['drop'].rx_pps:,.0f}", f"{on['drop'].rx_pps:,.0f}", f"{p['ratio']:.4f}",
                         f"{off['fwd'].rx_pps:,.0f}", f"{on['fwd'].rx_pps:,.0f}", f"{p['fwd_ratio']:.4f}",
                         f"{off['lat'].p50:.2f}", f"{on['lat'].p50:.2f}", f"{off['lat'].p99:.2f}",
                         f"{on['lat'].p99:.2f}", f"{p['d_p50']:+.2f}", f"{p['d_p99']:+.2f}", f"{on['startup']:.2f}"])
        L += table(["pair", "drop pps off", "drop pps on", "on/off", "fwd pps off", "fwd pps on", "on/off",
                    "p50 off us", "p50 on us", "p99 off us", "p99 on us", "d p50 us", "d p99 us",
                    "dpwatch start s"], rows)
        L.append("")
        L.append(f"- **drop path** (budgeted): median on/off ratio **{dp['median_ratio']:.4f}** (loss "
                 f"{dp['pps_loss_pct']:+.2f} %); per-pair ratios {dp['ratio_min']:.4f} .. {dp['ratio_max']:.4f}; "
                 f"off-run pps {dp['off_pps_min']:,.0f} .. {dp['off_pps_max']:,.0f}.")
        L.append(f"- **forwarded path** (no drops, so dpwatch's program never runs): median on/off ratio "
                 f"{dp['median_fwd_ratio']:.4f} (loss {dp['fwd_loss_pct']:+.2f} %); per-pair ratios "
                 f"{dp['fwd_min']:.4f} .. {dp['fwd_max']:.4f}.")
        L.append(f"- request/response latency, median delta (on - off): p50 **{dp['median_d_p50']:+.2f} us**, "
                 f"p99 **{dp['median_d_p99']:+.2f} us**; per-pair p99 deltas {dp['d_p99_min']:+.2f} .. "
                 f"{dp['d_p99_max']:+.2f} us; off-run p99 {dp['off_p99_min']:.2f} .. {dp['off_p99_max']:.2f} us.")
        drops = [p[h]["drop"].drop_pps / p[h]["drop"].rx_pps for p in dp["pairs"] for h in ("off", "on")]
        fwds = [p[h]["fwd"].fwd_pps / p[h]["fwd"].rx_pps for p in dp["pairs"] for h in ("off", "on")]
        L.append(f"- pps = packets/s the node netns receives on its veth (`/proc/net/dev`), 64-byte UDP payloads "
                 f"from trafgen (one worker, CPU 0) in the pod. Drop path: a node socket that is never read, "
                 f"{min(drops) * 100:.1f}..{max(drops) * 100:.1f} % of the packets counted as Udp RcvbufErrors. "
                 f"Forwarded path: routed by the node netns to an ifb device that consumes them, "
                 f"{min(fwds) * 100:.1f}..{max(fwds) * 100:.1f} % counted as Ip ForwDatagrams.")
        errs = {p[h]["lat"].poll_idle_error for p in dp["pairs"] for h in ("off", "on")} - {None}
        L.append("- latency: sockperf ping-pong, UDP, 64 B, full round trip (`--full-rtt`), pod -> node, "
                 + ("with idle CPUs polling (PM QoS `/dev/cpu_dma_latency` = 0 while sockperf runs): a halted "
                    "vCPU's wake-up through the hypervisor would otherwise dominate the round trip."
                    if not errs else f"idle CPUs NOT kept polling ({', '.join(sorted(errs))}): round trips include "
                    "vCPU wake-ups."))
    else:
        L.append("no result")
    L.append("")


def _section2(r: dict, L: list[str]) -> None:
    L.append("## 2. In-kernel cost per BPF program (bpf_stats_enabled=1 for this stage only)")
    L.append("")
    bc = r.get("bpf", {})
    if bc.get("programs"):
        L += table(["id", "name", "type", "runs", "ns/run", "runs/s"],
                   [[p["id"], p["name"], p["type"], f"{p['runs']:,}", f(p["ns_per_run"], ".1f"),
                     f"{p['runs_per_s']:,.0f}"] for p in bc["programs"]])
        L.append("")
        L.append(f"- under the drop-path load ({bc['load_rx_pps']:,.0f} pps with stats on, every packet dropped); "
                 "programs identified as those that appeared after the daemon started (bpftool prog ids before/after).")
        left = bc.get("left_after_stop")
        L.append(f"- programs still loaded after SIGTERM: {left if left else 'none'}.")
        var = []
        for key, label in (("no_lru", "dpwatch --drops-location-entries 0 (no drop-location LRU)"),
                           ("empty", "empty program on skb:kfree_skb (the floor: `bench/empty_probe.py`)")):
            v = bc.get(key)
            if v:
                var.append([label, f(v["max_ns_per_run"], ".1f"), f"{v['load_rx_pps']:,.0f}"])
        if var:
            L.append("- same load, informative (not budgeted):")
            L.append("")
            L += table(["variant", "ns/run", "drop-path pps (stats on)"],
                       [["dpwatch, default probes", f(bc["max_ns_per_run"], ".1f"), f"{bc['load_rx_pps']:,.0f}"]] + var)
            L.append("")
        if not bc.get("export_supported"):
            L.append("- daemon's own export (`--bpf-stats`): n/a (this dpwatch has no --bpf-stats flag).")
        else:
            L.append("- daemon's own export (`--bpf-stats`, `dpwatch_bpf_program_run_seconds_total` / `_runs_total`) "
                     "over the same load:")
            L.append("")
            L += table(["probe", "program", "runs (export)", "runs (bpftool)", "ns/run (export)", "ns/run (bpftool)"],
                       [[e["probe"], e["program"], f"{e['runs']:,.0f}", f"{e['bpftool_runs']:,}",
                         f(e["ns_per_run"], ".1f"), f(e["bpftool_ns_per_run"], ".1f")] for e in bc.get("export", [])])
    else:
        L.append("no result")
    L.append("")


def _section2b(r: dict, L: list[str]) -> None:
    tp = r.get("tap")
    if tp is None:
        return  # stage not run
    L.append("## 2b. Packet tap, informative (not budgeted): AF_PACKET ETH_P_ALL + eBPF socket filter")
    L.append("")
    if not tp.get("pairs"):
        L.append("no result")
        L.append("")
        return
    rows = []
    for p in tp["pairs"]:
        off, on = p["off"], p["on"]
        rows.append([p["pair"], f"{off['drop'].rx_pps:,.0f}", f"{on['drop'].rx_pps:,.0f}", f"{p['ratio']:.4f}",
                     f"{off['fwd'].rx_pps:,.0f}", f"{on['fwd'].rx_pps:,.0f}", f"{p['fwd_ratio']:.4f}"])
    L += table(["pair", "drop pps off", "drop pps tap", "tap/off", "fwd pps off", "fwd pps tap", "tap/off"], rows)
    L.append("")
    L.append(f"- `bench/tap_probe.py` (BCC, its own process in the node netns, no dpwatch running): a socket filter "
             f"that reads the IPv4 frag_off and counts MF / offset != 0 in a per-CPU array, returns 0 (keeps "
             f"nothing), attached with `BPF.attach_raw_socket` to every node-netns interface "
             f"({', '.join(tp.get('ifaces') or []) or '?'}). bpf_stats off for the pairs.")
    L.append(f"- **drop path**: median tap/off ratio **{tp['median_ratio']:.4f}** (loss {tp['loss_pct']:+.2f} %); "
             f"per-pair {tp['ratio_min']:.4f} .. {tp['ratio_max']:.4f}. The tap sees each packet once (veth rx).")
    L.append(f"- **forwarded path**: median tap/off ratio **{tp['median_fwd_ratio']:.4f}** (loss "
             f"{tp['fwd_loss_pct']:+.2f} %); per-pair {tp['fwd_ratio_min']:.4f} .. {tp['fwd_ratio_max']:.4f}. The tap "
             "sees each packet twice (veth rx, ifb tx; on tx `dev_queue_xmit_nit` clones the skb before the filter).")
    rows = []
    for key, label in (("cost_drop", "drop path"), ("cost_forward", "forwarded path")):
        c = tp.get(key)
        if c:
            for p in c["programs"]:
                rows.append([label, p["id"], p["name"], p["type"], f"{p['runs']:,}", f(p["ns_per_run"], ".1f"),
                             f"{p['runs_per_s']:,.0f}", f"{c['load_rx_pps']:,.0f}", f"{c['runs_per_pkt']:.2f}"])
    if rows:
        L.append("- the filter's own cost, bpf_stats_enabled=1 (bpftool run_time_ns / run_cnt over the load); this "
                 "is only the program, not the packet_rcv / ptype delivery / clone around it:")
        L.append("")
        L += table(["load", "id", "name", "type", "runs", "ns/run", "runs/s", "rx pps (stats on)", "runs per packet"],
                   rows)
    L.append("")


def _section3(r: dict, L: list[str]) -> None:
    L.append("## 3. Daemon cost")
    L.append("")
    dc = r.get("daemon", {})
    starts = r.get("startups") or []
    if "steady" in dc:
        st, af = dc["steady"], dc["after_scrapes"]
        idle = dc["idle_cpu"] * 60 / dc["idle_wall"]
        load = dc["load_cpu"] * 60 / dc["load_wall"]
        rows = [
            ["start-up to first good scrape", f"{dc['startup']:.2f} s (all {len(starts)} default starts: median "
             f"{statistics.median(starts):.2f}, max {max(starts):.2f})"],
            ["peak RSS (VmHWM)", f"{mib(st['VmHWM'])} MiB"],
            [f"steady RSS after {dc['steady_after']:.0f} s (RssAnon / RssFile / RssShmem)",
             f"{mib(st['RssAnon'])} / {mib(st['RssFile'])} / {mib(st.get('RssShmem'))} MiB"],
            ["RSS after the scrapes (RssAnon / RssFile)", f"{mib(af['RssAnon'])} / {mib(af['RssFile'])} MiB"],
            [f"CPU idle ({dc['idle_wall']:.0f} s, no traffic, no scrapes)",
             f"{idle:.3f} CPU-s/min ({idle / 60 * 100:.2f} % of a core)"],
            [f"CPU under the drop-path load ({dc['load_wall']:.0f} s, {dc['load_rx_pps']:,.0f} pps)",
             f"{load:.3f} CPU-s/min ({load / 60 * 100:.2f} % of a core)"],
            [f"/metrics, default ({dc['scrape']['series']} series, {dc['scrape']['bytes']:,} B) p50 / p99 / max",
             f"{dc['scrape']['p50']:.2f} / {dc['scrape']['p99']:.2f} / {dc['scrape']['max']:.2f} ms (n={dc['scrape']['n']})"],
        ]
        syn = dc.get("synthetic")
        if syn:
            rows.append([f"/metrics, --synthetic-series {syn['requested']} ({syn['series']} series, {syn['bytes']:,} B) "
                         "p50 / p99 / max",
                         f"{syn['p50']:.2f} / {syn['p99']:.2f} / {syn['max']:.2f} ms (n={syn['n']}); "
                         f"RssAnon {mib(syn['rss']['RssAnon'])} MiB"])
        else:
            rows.append(["/metrics with 10k series", "n/a (this dpwatch has no --synthetic-series flag)"])
        rows.append(["/diagnose text p50 / p99 / max",
                     f"{dc['diag_text']['p50']:.2f} / {dc['diag_text']['p99']:.2f} / {dc['diag_text']['max']:.2f} ms"])
        rows.append(["/diagnose JSON p50 / p99 / max",
                     f"{dc['diag_json']['p50']:.2f} / {dc['diag_json']['p99']:.2f} / {dc['diag_json']['max']:.2f} ms"])
        L += table(["measure", "value"], rows)
        L.append("")
        L.append("- scrape latency is client-side wall time of a whole GET (new TCP connection each, body read), "
                 "from inside the node netns; 3 untimed warm-up requests first.")
        L.append("- CPU is utime+stime of all the daemon's threads from /proc/PID/stat; BPF run time in softirq "
                 "is not in it (see section 2).")
    else:
        L.append("no result")
    L.append("")


def _section4(r: dict, L: list[str]) -> None:
    dc = r.get("daemon", {})
    L.append("## 4. Peers, same run, same netns, same client")
    L.append("")
    pe = r.get("peers", {})
    if pe.get("scrape") and "after_scrapes" in dc:
        ds, ns = dc["scrape"], pe["scrape"]
        L += table(["", "dpwatch (default probes)", "prometheus-node-exporter (Debian, default collectors)"], [
            ["series", ds["series"], ns["series"]],
            ["scrape p50 / p99 ms", f"{ds['p50']:.2f} / {ds['p99']:.2f}", f"{ns['p50']:.2f} / {ns['p99']:.2f}"],
            ["RssAnon / RssFile MiB (after the scrapes)", f"{mib(dc['after_scrapes']['RssAnon'])} / {mib(dc['after_scrapes']['RssFile'])}",
             f"{mib(pe['rss']['RssAnon'])} / {mib(pe['rss']['RssFile'])}"],
            ["peak RSS (VmHWM) MiB", mib(dc["after_scrapes"]["VmHWM"]), mib(pe["rss"]["VmHWM"])],
            ["start-up to first 200 OK scrape, s", f"{dc['startup']:.2f}", f"{pe['startup']:.2f}"],
        ])
    else:
        L.append("node-exporter: no result")
    L.append("")
    L.append("bcc's softirqs tool (softirqs-bpfcc) is measured side by side with the softirq probe "
             "in stage 5 below.")
    L.append("")


def _tail(r: dict, L: list[str]) -> None:
    if r.get("errors") or r.get("notes"):
        L.append("## Errors and notes")
        L.append("")
        for e in r.get("errors", []):
            L.append(f"- ERROR: {e}")
        for n in r.get("notes", []):
            L.append(f"- {n}")
        L.append("")
