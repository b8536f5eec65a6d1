"""Stage 5: the softirq probe's datapath cost, side by side with bcc's softirqs tool
(/usr/sbin/softirqs-bpfcc, Debian bpfcc-tools), under the same load, in the same run.

A. Datapath ratios (kernel.bpf_stats_enabled off). Each round measures four cases back to
   back under the same loads (trafgen to the dropping sink: pps; sockperf ping-pong: p50/p99):
   nothing loaded (the baseline), `dpwatch run --probes softirq` with raw tracepoints and with
   tracepoints (the probe alone), and `softirqs-bpfcc` (its default mode: time per vector, a
   hash entry per softirq run). Ratios are against the baseline of the same round.
B. In-kernel cost (bpf_stats on): ns per program run and runs per packet of dpwatch with
   --softirq-hooks raw_tracepoint, with --softirq-hooks tracepoint, and of softirqs-bpfcc,
   each under the same drop-path load. The probe's default hook kind is the cheaper one.
"""

from __future__ import annotations

import os
import re
import time

from lib import BenchError, Proc, bpf_progs, median, sockperf_pp
from stages import Context, _udp

SOFTIRQS_BCC = "/usr/sbin/softirqs-bpfcc"


def _settings(ctx: Context) -> dict:
    s = ctx.settings
    if s.smoke:
        return {"rounds": 1, "udp": 1.0, "lat": 1.0, "cost": 1.0}
    return {"rounds": 2, "udp": 4.0, "lat": 3.0, "cost": 4.0}


class BccSoftirqs:
    """softirqs-bpfcc in its own process group until stopped."""

    def __init__(self, ctx: Context):
        if not os.access(SOFTIRQS_BCC, os.X_OK):
            raise BenchError(f"{SOFTIRQS_BCC} missing (Debian bpfcc-tools; deploy/setup.sh --bench)")
        self.proc = Proc("softirqs-bpfcc", [SOFTIRQS_BCC], None, ctx.tools, env={"PYTHONUNBUFFERED": "1"},
                         logdir=ctx.logdir, group=True)
        self.started = time.monotonic()
        deadline = self.started + 120
        while "Tracing" not in self.proc.output():
            if not self.proc.alive() or time.monotonic() > deadline:
                out = self.proc.output()
                self.proc.stop()
                raise BenchError(f"softirqs-bpfcc did not attach:\n{out}")
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - self.started
        self.pid = self.proc.pid

    def stop(self) -> None:
        # SIGTERM, not SIGINT: a shell's background job inherits SIGINT ignored, and then the
        # tool's Python never sees KeyboardInterrupt. Its table is not needed here.
        out = self.proc.output()
        rc = self.proc.stop(sig=15)
        if rc not in (0, -15):
            raise BenchError(f"softirqs-bpfcc exited {rc}:\n{out}")
        self.proc.remove_log()


def _measure(ctx: Context, st: dict) -> dict:
    return {"drop": _udp(ctx, st["udp"]), "lat": sockperf_pp(ctx.tools, ctx.lab, st["lat"])}


def softirq_cost(ctx: Context, res: dict, log) -> None:
    st = _settings(ctx)
    res["settings"] = st
    res["rounds"] = rounds = []
    starts = {"dpwatch": lambda: _Dpwatch(ctx, ["--softirq-hooks", "raw_tracepoint"]),
              "dpwatch_tp": lambda: _Dpwatch(ctx, ["--softirq-hooks", "tracepoint"]),
              "bcc": lambda: BccSoftirqs(ctx)}
    for i in range(1, st["rounds"] + 1):
        row = {"round": i, "off": _measure(ctx, st)}
        for name, start in starts.items():
            h = start()
            try:
                row[name] = _measure(ctx, st)
            finally:
                h.stop()
        for name in starts:
            row[f"{name}_ratio"] = row[name]["drop"].rx_pps / row["off"]["drop"].rx_pps
            row[f"{name}_d_p50"] = row[name]["lat"].p50 - row["off"]["lat"].p50
            row[f"{name}_d_p99"] = row[name]["lat"].p99 - row["off"]["lat"].p99
        rounds.append(row)
        log(f"  softirq round {i}/{st['rounds']}: pps off {row['off']['drop'].rx_pps:,.0f}, dpwatch "
            f"x{row['dpwatch_ratio']:.3f} (tracepoint x{row['dpwatch_tp_ratio']:.3f}), bcc x{row['bcc_ratio']:.3f}; "
            f"p50 off {row['off']['lat'].p50:.2f} us, "
            f"dpwatch {row['dpwatch_d_p50']:+.2f}, bcc {row['bcc_d_p50']:+.2f}")
    for name in starts:
        res[f"{name}_ratio"] = median([r[f"{name}_ratio"] for r in rounds])
        res[f"{name}_d_p50"] = median([r[f"{name}_d_p50"] for r in rounds])
        res[f"{name}_d_p99"] = median([r[f"{name}_d_p99"] for r in rounds])

    ctx.sysctl.set("1")
    try:
        res["cost"] = cost = {}
        for name, extra in (("dpwatch raw_tracepoint", ["--softirq-hooks", "raw_tracepoint"]),
                            ("dpwatch tracepoint", ["--softirq-hooks", "tracepoint"])):
            log(f"  {name}, bpf_stats on: drop-path load {st['cost']:g}s")
            cost[name] = _costs(ctx, lambda e=extra: _Dpwatch(ctx, e), st["cost"], name)
        log(f"  softirqs-bpfcc, bpf_stats on: drop-path load {st['cost']:g}s")
        cost["bcc softirqs"] = _costs(ctx, lambda: BccSoftirqs(ctx), st["cost"], "softirqs-bpfcc")
    finally:
        ctx.sysctl.restore()
    res["cheaper"] = min(("dpwatch raw_tracepoint", "dpwatch tracepoint"), key=lambda k: cost[k]["ns_per_pkt"])


class _Dpwatch:
    def __init__(self, ctx: Context, extra: list[str]):
        self.ctx = ctx
        self.d = ctx.daemon(["--probes", "softirq", *extra], default=False)
        self.pid = self.d.pid

    def stop(self) -> None:
        self.ctx.stop(self.d, "softirq cost")


def prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds open (its fdinfo says prog_id). Other
    processes may load programs on the same hooks meanwhile (other daemons on a shared
    machine): only these are counted."""
    ids = set()
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            with open(os.path.join(base, fd)) as fh:
                m = re.search(r"^prog_id:\s*(\d+)", fh.read(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def _costs(ctx: Context, start, seconds: float, what: str) -> dict:
    """run_time_ns/run_cnt of the programs of one process across a drop-path load, per packet
    the node's veth received over the same span."""
    h = start()
    try:
        ids = prog_ids(h.pid)
        if not ids:
            raise BenchError(f"{what}: process {h.pid} holds no BPF program")
        p0, c0, t0 = bpf_progs(ctx.tools), ctx.dp.counters(), time.monotonic()
        load = _udp(ctx, seconds)
        p1, c1, t1 = bpf_progs(ctx.tools), ctx.dp.counters(), time.monotonic()
    finally:
        h.stop()
    pkts = c1["rx"] - c0["rx"]
    if pkts <= 0:
        raise BenchError(f"{what}: no packets reached the node")
    progs = []
    for pid in sorted(ids):
        a, b = p0.get(pid), p1.get(pid)
        if a is None or b is None:
            raise BenchError(f"{what}: program {pid} vanished during the load")
        cnt, ns = b["run_cnt"] - a["run_cnt"], b["run_time_ns"] - a["run_time_ns"]
        progs.append({"id": pid, "name": b["name"], "type": b["type"], "runs": cnt, "ns": ns,
                      "ns_per_run": ns / cnt if cnt else float("nan"), "runs_per_s": cnt / (t1 - t0),
                      "runs_per_pkt": cnt / pkts})
    if not any(p["runs"] for p in progs):
        raise BenchError(f"{what}: its programs never ran under the load")
    return {"programs": progs, "load_rx_pps": load.rx_pps, "packets": pkts,
            "runs_per_pkt": sum(p["runs"] for p in progs) / pkts,
            "ns_per_pkt": sum(p["ns"] for p in progs) / pkts}


# --------------------------------------------------------------------------------------------
# Report

def _fmt(x, spec=".3f") -> str:
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return "n/a"


def render(res: dict) -> str:
    L = ["## 5. softirq probe vs bcc softirqs (same load, same run)", ""]
    if not res.get("rounds"):
        return "\n".join(L + ["(no data: the stage failed, see the errors below)", ""])
    st = res["settings"]
    L.append(f"{st['rounds']} round(s); per case: trafgen {st['udp']:g} s to the dropping sink (64 B UDP, one "
             f"CPU), sockperf ping-pong {st['lat']:g} s. Cases in each round: nothing loaded, "
             "`dpwatch run --probes softirq` with raw tracepoints (raw) and with tracepoints (tp), "
             "`softirqs-bpfcc` (bcc). Ratios: case pps / no-load pps of the same round; d = case - no load.")
    L.append("")
    cases = (("dpwatch", "raw"), ("dpwatch_tp", "tp"), ("bcc", "bcc"))
    L.append("| round | pps off | " + " | ".join(f"{c} on/off" for _k, c in cases) + " | p50 off us | "
             + " | ".join(f"{c} d p50" for _k, c in cases) + " | p99 off us | "
             + " | ".join(f"{c} d p99" for _k, c in cases) + " |")
    L.append("|" + "---|" * 13)
    for r in res["rounds"]:
        L.append(f"| {r['round']} | {r['off']['drop'].rx_pps:,.0f} | "
                 + " | ".join(_fmt(r[f"{k}_ratio"], ".4f") for k, _c in cases)
                 + f" | {r['off']['lat'].p50:.2f} | " + " | ".join(f"{r[f'{k}_d_p50']:+.2f}" for k, _c in cases)
                 + f" | {r['off']['lat'].p99:.2f} | " + " | ".join(f"{r[f'{k}_d_p99']:+.2f}" for k, _c in cases)
                 + " |")
    L.append("| median | | " + " | ".join(_fmt(res[f"{k}_ratio"], ".4f") for k, _c in cases) + " | | "
             + " | ".join(f"{res[f'{k}_d_p50']:+.2f}" for k, _c in cases) + " | | "
             + " | ".join(f"{res[f'{k}_d_p99']:+.2f}" for k, _c in cases) + " |")
    L.append("")
    cost = res.get("cost") or {}
    if cost:
        L.append(f"In-kernel cost (bpf_stats on, drop-path load {st['cost']:g} s each):")
        L.append("")
        L.append("| tool | program | runs/s | ns/run | load pps | runs per packet |")
        L.append("|---|---|---|---|---|---|")
        for name, c in cost.items():
            for p in c["programs"]:
                L.append(f"| {name} | {p['name']} ({p['type']}) | {p['runs_per_s']:,.0f} | "
                         f"{_fmt(p['ns_per_run'], '.1f')} | {c['load_rx_pps']:,.0f} | "
                         f"{p['runs_per_pkt']:.3f} |")
        L.append("")
        L.append("| tool | program runs per packet | BPF ns per packet (run_time_ns / packets) |")
        L.append("|---|---|---|")
        for name, c in cost.items():
            L.append(f"| {name} | {c['runs_per_pkt']:.3f} | {_fmt(c['ns_per_pkt'], '.1f')} |")
        L.append("")
        L.append(f"Cheaper hook kind for the probe: **{res.get('cheaper', 'n/a')}**. (bpf_stats times the "
                 "program only; a classic tracepoint also fills its record before the program runs, which "
                 "shows in the datapath ratios, not here.)")
        L.append("")
    return "\n".join(L)


def insert_section(text: str, res: dict | None) -> str:
    """Put the section before the report's errors and notes (or at the end)."""
    if res is None:
        return text
    section = render(res)
    marker = "## Errors and notes"
    if marker in text:
        head, tail = text.split(marker, 1)
        return head + section + "\n" + marker + tail
    return text.rstrip("\n") + "\n\n" + section
