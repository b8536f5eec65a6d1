"""The four measurements. Each stage function fills a dict of results (raising BenchError when
it cannot produce its number); run.py runs them in order and renders the report."""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field

from lib import (BPF_STATS_SYSCTL, BenchError, Daemon, Datapath, Lab, NodeExporter, Proc, SysctlGuard, Tools,
                 bpf_progs, cpu_interval, daemon_supports, median, parse_metrics, percentile,
                 proc_status, series_count, sockperf_pp, timed_gets)

DAEMON_PORT = 19400
EXPORTER_PORT = 19100


@dataclass
class Settings:
    pairs: int = 5
    udp_seconds: float = 10.0      # trafgen -> dropping sink, per off/on half (the budgeted figure)
    fwd_seconds: float = 5.0       # trafgen -> forwarded, per off/on half
    lat_seconds: float = 5.0       # sockperf, per off/on half
    settle_seconds: float = 1.0    # trafgen runs this long before its rate is read
    warmup_seconds: float = 3.0    # one discarded trafgen run before the pairs
    bpf_load_seconds: float = 10.0  # stage 2 load
    idle_seconds: float = 30.0     # stage 3 idle CPU interval (steady RSS is read after it)
    load_seconds: float = 10.0     # stage 3 CPU under load
    scrapes: int = 200
    diagnose_requests: int = 50
    synthetic_series: int = 10000
    smoke: bool = False

    @classmethod
    def for_smoke(cls) -> "Settings":
        return cls(pairs=1, udp_seconds=1, fwd_seconds=1, lat_seconds=1, settle_seconds=0.5,
                   warmup_seconds=0, bpf_load_seconds=1, idle_seconds=2, load_seconds=1, scrapes=10,
                   diagnose_requests=5, smoke=True)


@dataclass
class Context:
    tools: Tools
    lab: Lab
    dp: Datapath
    settings: Settings
    logdir: str
    startups: list[float] = field(default_factory=list)   # every default-config daemon start
    notes: list[str] = field(default_factory=list)
    sysctl: SysctlGuard = field(default_factory=lambda: SysctlGuard(BPF_STATS_SYSCTL))
    _ports: itertools.count = field(default_factory=lambda: itertools.count(DAEMON_PORT))
    flags: dict[str, bool] = field(default_factory=dict)

    def daemon(self, extra: list[str] | None = None, env: dict | None = None, default: bool = True) -> Daemon:
        # A fresh port per start: no TIME_WAIT or half-closed listener from the last one matters.
        d = Daemon(self.tools, self.lab.node, next(self._ports), extra=extra, env=env, logdir=self.logdir)
        if default:
            self.startups.append(d.startup_seconds)
        return d

    def stop(self, d: Daemon, what: str) -> None:
        out = d.proc.output()
        rc = d.stop()
        if rc != 0:
            raise BenchError(f"{what}: dpwatch exited {rc} on SIGTERM (log {d.proc.log.name}):\n{out}")

    def supports(self, flag: str, value: str | None = None) -> bool:
        if flag not in self.flags:
            self.flags[flag] = daemon_supports(self.tools, flag, value)
        return self.flags[flag]


def _udp(ctx: Context, seconds: float, target: str = "drop"):
    return ctx.dp.blast(target, seconds, settle=ctx.settings.settle_seconds)


# --------------------------------------------------------------------------------------------
# 1. Datapath impact: off/on pairs

def datapath(ctx: Context, res: dict, log) -> None:
    s = ctx.settings
    res["pairs"] = pairs = []
    if s.warmup_seconds > 0:
        log(f"  warm-up: trafgen {s.warmup_seconds:g}s (discarded)")
        _udp(ctx, s.warmup_seconds)

    def half() -> dict:
        return {"drop": _udp(ctx, s.udp_seconds), "fwd": _udp(ctx, s.fwd_seconds, "forward"),
                "lat": sockperf_pp(ctx.tools, ctx.lab, s.lat_seconds)}

    for i in range(1, s.pairs + 1):
        row = {"pair": i, "off": half()}
        d = ctx.daemon()
        try:
            row["on"] = half()
        finally:
            ctx.stop(d, f"pair {i}")
        row["on"]["startup"] = d.startup_seconds
        row["ratio"] = row["on"]["drop"].rx_pps / row["off"]["drop"].rx_pps
        row["fwd_ratio"] = row["on"]["fwd"].rx_pps / row["off"]["fwd"].rx_pps
        row["d_p50"] = row["on"]["lat"].p50 - row["off"]["lat"].p50
        row["d_p99"] = row["on"]["lat"].p99 - row["off"]["lat"].p99
        pairs.append(row)
        log(f"  pair {i}/{s.pairs}: drop-path pps off {row['off']['drop'].rx_pps:,.0f} on {row['on']['drop'].rx_pps:,.0f} "
            f"(x{row['ratio']:.3f}); forward x{row['fwd_ratio']:.3f}; "
            f"p99 off {row['off']['lat'].p99:.2f} on {row['on']['lat'].p99:.2f} us")
    ratios = [r["ratio"] for r in pairs]
    fwd = [r["fwd_ratio"] for r in pairs]
    res["median_ratio"] = median(ratios)
    res["pps_loss_pct"] = (1 - res["median_ratio"]) * 100
    res["ratio_min"], res["ratio_max"] = min(ratios), max(ratios)
    res["median_fwd_ratio"] = median(fwd)
    res["fwd_loss_pct"] = (1 - res["median_fwd_ratio"]) * 100
    res["fwd_min"], res["fwd_max"] = min(fwd), max(fwd)
    res["median_d_p50"] = median([r["d_p50"] for r in pairs])
    res["median_d_p99"] = median([r["d_p99"] for r in pairs])
    offs = [r["off"]["drop"].rx_pps for r in pairs]
    res["off_pps_min"], res["off_pps_max"] = min(offs), max(offs)
    d99 = [r["d_p99"] for r in pairs]
    res["d_p99_min"], res["d_p99_max"] = min(d99), max(d99)
    off99 = [r["off"]["lat"].p99 for r in pairs]
    res["off_p99_min"], res["off_p99_max"] = min(off99), max(off99)


# --------------------------------------------------------------------------------------------
# 2. In-kernel cost per program

def _export(text: str) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name, labels, value in parse_metrics(text):
        key = (labels.get("probe", ""), labels.get("program", ""))
        if name == "dpwatch_bpf_program_run_seconds_total":
            out.setdefault(key, {})["seconds"] = value
        elif name == "dpwatch_bpf_program_runs_total":
            out.setdefault(key, {})["runs"] = value
    return out


def _program_costs(ctx: Context, start, seconds: float, what: str, sample=None, target: str = "drop") -> dict:
    """Starts something that loads BPF programs (start() -> handle with .stop()), finds its
    programs by the id diff, runs the drop-path load (or ``target``) and reads run_time_ns/run_cnt
    around it. ``sample(handle)`` is called right before and after the load (the daemon's own export)."""
    before = set(bpf_progs(ctx.tools))
    h = start()
    try:
        p0 = bpf_progs(ctx.tools)
        ours = sorted(set(p0) - before)
        if not ours:
            raise BenchError(f"{what}: no BPF program appeared after it started")
        s0 = sample(h) if sample else None
        t0 = time.monotonic()
        load = _udp(ctx, seconds, target)
        p1 = bpf_progs(ctx.tools)
        t1 = time.monotonic()
        s1 = sample(h) if sample else None
    finally:
        h.stop()
    left = sorted(set(bpf_progs(ctx.tools)) & set(ours))
    progs = []
    for pid in ours:
        a, b = p0[pid], p1.get(pid)
        if b is None:
            raise BenchError(f"{what}: program {pid} vanished during the load")
        cnt = b["run_cnt"] - a["run_cnt"]
        ns = b["run_time_ns"] - a["run_time_ns"]
        progs.append({"id": pid, "name": b["name"], "type": b["type"], "runs": cnt, "ns": ns,
                      "ns_per_run": ns / cnt if cnt else float("nan"), "runs_per_s": cnt / (t1 - t0)})
    if not any(p["runs"] for p in progs):
        raise BenchError(f"{what}: its programs never ran under the {target} load")
    return {"programs": progs, "load_rx_pps": load.rx_pps, "left_after_stop": left,
            "max_ns_per_run": max(p["ns_per_run"] for p in progs if p["runs"]), "samples": (s0, s1)}


def bpf_cost(ctx: Context, res: dict, log) -> None:
    s = ctx.settings
    flag = ctx.supports("--bpf-stats")
    res["export_supported"] = flag
    ctx.sysctl.set("1")
    try:
        def start_daemon(extra: list[str]):
            return lambda: _DaemonHandle(ctx, ctx.daemon(extra, default=False))

        log(f"  dpwatch{' --bpf-stats' if flag else ''}: drop-path load {s.bpf_load_seconds:g}s")
        main = _program_costs(ctx, start_daemon(["--bpf-stats"] if flag else []), s.bpf_load_seconds,
                              "dpwatch", sample=lambda h: _export(_scrape(ctx, h.d)))
        res.update(main)
        # Informative, not budgeted: the same without the drop-location LRU, and the floor
        # (an empty program on the same tracepoint).
        log(f"  dpwatch --drops-location-entries 0: drop-path load {s.bpf_load_seconds:g}s")
        res["no_lru"] = _program_costs(ctx, start_daemon(["--drops-location-entries", "0"]),
                                       s.bpf_load_seconds, "dpwatch --drops-location-entries 0")
        log(f"  empty program on skb:kfree_skb: drop-path load {s.bpf_load_seconds:g}s")
        res["empty"] = _program_costs(ctx, lambda: _EmptyProbe(ctx), s.bpf_load_seconds, "empty program")
    finally:
        ctx.sysctl.restore()

    res["export"] = exp = []
    if flag:
        m0, m1 = main["samples"]
        for key in sorted(set(m0) | set(m1)):
            a, b = m0.get(key, {}), m1.get(key, {})
            runs = b.get("runs", 0) - a.get("runs", 0)
            secs = b.get("seconds", 0) - a.get("seconds", 0)
            exp.append({"probe": key[0], "program": key[1], "runs": runs,
                        "ns_per_run": secs * 1e9 / runs if runs else float("nan")})
        if not exp:
            raise BenchError("--bpf-stats is accepted but /metrics has no dpwatch_bpf_program_* series")
        # The export must agree with bpftool about the same programs over the same load.
        # (BCC loads tracepoint__skb__kfree_skb as "skb__kfree_skb"; names are cut at 15 chars.)
        by_name = {p["name"]: p for p in main["programs"]}
        for e in exp:
            short = e["program"].removeprefix("tracepoint__").removeprefix("raw_tracepoint__")
            ref = by_name.get(e["program"]) or by_name.get(short) or by_name.get(short[:15])
            e["bpftool_ns_per_run"] = ref["ns_per_run"] if ref else float("nan")
            e["bpftool_runs"] = ref["runs"] if ref else 0


class _DaemonHandle:
    def __init__(self, ctx: Context, d: Daemon):
        self.ctx, self.d = ctx, d

    def stop(self) -> None:
        self.ctx.stop(self.d, "bpf stats")


class _EmptyProbe:
    """bench/empty_probe.py in its own process (the venv's interpreter, for bcc)."""

    def __init__(self, ctx: Context):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "empty_probe.py")
        self.proc = Proc("empty-probe", [sys.executable, script], None, ctx.tools, logdir=ctx.logdir)
        deadline = time.monotonic() + 120
        while "ready" not in self.proc.output():
            if not self.proc.alive() or time.monotonic() > deadline:
                out = self.proc.output()
                self.proc.stop()
                raise BenchError(f"empty probe did not attach:\n{out}")
            time.sleep(0.1)

    def stop(self) -> None:
        rc = self.proc.stop()
        if rc == 0:
            self.proc.remove_log()
        else:
            raise BenchError(f"empty probe exited {rc}:\n{self.proc.output()}")


def _scrape(ctx: Context, d: Daemon) -> str:
    lat, body = timed_gets(ctx.lab.node, d.port, "/metrics", 1, warmup=0)
    return body


# --------------------------------------------------------------------------------------------
# 2b. Packet tap (informative): an AF_PACKET ETH_P_ALL socket with an eBPF socket filter on
# every interface of the node netns, the candidate design for per-interface fragment counts.

class _TapProbe:
    """bench/tap_probe.py in its own process group inside the node netns (the venv's
    interpreter, for bcc). stop() checks that its program is gone."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.before = set(bpf_progs(ctx.tools))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tap_probe.py")
        self.proc = Proc("tap-probe", [sys.executable, script], ctx.lab.node, ctx.tools, logdir=ctx.logdir,
                         group=True)
        deadline = time.monotonic() + 120
        while "ready" not in self.proc.output():
            if not self.proc.alive() or time.monotonic() > deadline:
                out = self.proc.output()
                self.proc.stop()
                raise BenchError(f"tap probe did not attach:\n{out}")
            time.sleep(0.1)
        line = next(ln for ln in self.proc.output().splitlines() if ln.startswith("ready"))
        self.ifaces = line.split()[2].split(",") if len(line.split()) > 2 else []
        self.fragments = None

    def stop(self) -> None:
        rc = self.proc.stop()
        try:  # the log is closed by stop(): read the file (the "fragments" line comes at exit)
            with open(self.proc.log.name, errors="replace") as f:
                out = f.read()[-3000:]
        except OSError:
            out = ""
        for ln in out.splitlines():
            if ln.startswith("fragments "):
                self.fragments = int(ln.split()[1])
        if rc != 0:
            raise BenchError(f"tap probe exited {rc}:\n{out}")
        self.proc.remove_log()
        # A socket's filter is released after an RCU grace period, not at close(): poll a while.
        deadline = time.monotonic() + 10
        while True:
            left = [pid for pid, p in bpf_progs(self.ctx.tools).items()
                    if pid not in self.before and p["type"] == "socket_filter" and p["name"] == "tap_frag"]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if left:
            raise BenchError(f"tap probe: program(s) {left} still loaded after it exited")


def tap_cost(ctx: Context, res: dict, log) -> None:
    s = ctx.settings
    res["pairs"] = pairs = []
    if s.warmup_seconds > 0:
        log(f"  warm-up: trafgen {s.warmup_seconds:g}s (discarded)")
        _udp(ctx, s.warmup_seconds)

    def half() -> dict:
        return {"drop": _udp(ctx, s.udp_seconds), "fwd": _udp(ctx, s.fwd_seconds, "forward")}

    # bpf_stats stays off for the pairs (it adds two clock reads per run).
    for i in range(1, s.pairs + 1):
        row = {"pair": i, "off": half()}
        t = _TapProbe(ctx)
        try:
            row["on"] = half()
        finally:
            t.stop()
        res["ifaces"] = t.ifaces
        row["ratio"] = row["on"]["drop"].rx_pps / row["off"]["drop"].rx_pps
        row["fwd_ratio"] = row["on"]["fwd"].rx_pps / row["off"]["fwd"].rx_pps
        pairs.append(row)
        log(f"  tap pair {i}/{s.pairs}: drop-path pps off {row['off']['drop'].rx_pps:,.0f} "
            f"on {row['on']['drop'].rx_pps:,.0f} (x{row['ratio']:.3f}); forward off "
            f"{row['off']['fwd'].rx_pps:,.0f} on {row['on']['fwd'].rx_pps:,.0f} (x{row['fwd_ratio']:.3f})")
    for key, name in (("ratio", ""), ("fwd_ratio", "fwd_")):
        v = [r[key] for r in pairs]
        res[f"median_{key}"] = median(v)
        res[f"{name}loss_pct"] = (1 - median(v)) * 100
        res[f"{key}_min"], res[f"{key}_max"] = min(v), max(v)

    ctx.sysctl.set("1")
    try:
        for target, seconds in (("drop", s.bpf_load_seconds), ("forward", s.fwd_seconds)):
            log(f"  tap, bpf_stats on: {target} load {seconds:g}s")
            c = _program_costs(ctx, lambda: _TapProbe(ctx), seconds, f"tap ({target})", target=target)
            c["runs_per_pkt"] = sum(p["runs_per_s"] for p in c["programs"]) / c["load_rx_pps"]
            res[f"cost_{target}"] = c
    finally:
        ctx.sysctl.restore()


# --------------------------------------------------------------------------------------------
# 3. Daemon cost

def _lat_summary(lat: list[float]) -> dict:
    ms = [x * 1000 for x in lat]
    return {"n": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms)}


def daemon_cost(ctx: Context, res: dict, log) -> None:
    s = ctx.settings
    d = ctx.daemon()
    try:
        res["startup"] = d.startup_seconds
        log(f"  started in {d.startup_seconds:.2f}s; idle {s.idle_seconds:g}s")
        res["idle_cpu"], res["idle_wall"] = cpu_interval(d.pid, lambda: time.sleep(s.idle_seconds))
        res["steady_after"] = time.monotonic() - d.proc.started
        res["steady"] = proc_status(d.pid)
        log(f"  CPU under load {s.load_seconds:g}s")
        box = {}
        res["load_cpu"], res["load_wall"] = cpu_interval(d.pid, lambda: box.update(u=_udp(ctx, s.load_seconds)))
        res["load_rx_pps"] = box["u"].rx_pps
        log(f"  {s.scrapes} scrapes, {s.diagnose_requests}+{s.diagnose_requests} /diagnose")
        lat, body = timed_gets(ctx.lab.node, d.port, "/metrics", s.scrapes)
        res["scrape"] = _lat_summary(lat) | {"series": series_count(body), "bytes": len(body)}
        lat, _ = timed_gets(ctx.lab.node, d.port, "/diagnose", s.diagnose_requests)
        res["diag_text"] = _lat_summary(lat)
        lat, body = timed_gets(ctx.lab.node, d.port, "/diagnose?format=json", s.diagnose_requests)
        if not body.lstrip().startswith("{"):
            raise BenchError("/diagnose?format=json did not return JSON")
        res["diag_json"] = _lat_summary(lat)
        res["after_scrapes"] = proc_status(d.pid)
    finally:
        ctx.stop(d, "daemon cost")

    n = s.synthetic_series
    if not ctx.supports("--synthetic-series", "1"):
        res["synthetic"] = None
        return
    log(f"  {s.scrapes} scrapes with --synthetic-series {n}")
    d = ctx.daemon(["--synthetic-series", str(n)], default=False)
    try:
        lat, body = timed_gets(ctx.lab.node, d.port, "/metrics", s.scrapes)
        res["synthetic"] = _lat_summary(lat) | {"requested": n, "series": series_count(body),
                                                "bytes": len(body), "rss": proc_status(d.pid)}
    finally:
        ctx.stop(d, "synthetic series")
    if res["synthetic"]["series"] < n:
        raise BenchError(f"--synthetic-series {n} accepted but /metrics has only "
                         f"{res['synthetic']['series']} series")


# --------------------------------------------------------------------------------------------
# 4. Peers

def peers(ctx: Context, res: dict, log) -> None:
    s = ctx.settings
    ne = NodeExporter(ctx.tools, ctx.lab.node, EXPORTER_PORT, logdir=ctx.logdir)
    try:
        res["startup"] = ne.startup_seconds
        lat, body = timed_gets(ctx.lab.node, ne.port, "/metrics", s.scrapes)
        res["scrape"] = _lat_summary(lat) | {"series": series_count(body), "bytes": len(body)}
        res["rss"] = proc_status(ne.pid)
    finally:
        ne.stop()
