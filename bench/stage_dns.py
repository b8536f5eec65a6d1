"""Stage "dns": which hook the DNS probe should use, decided by what it costs NON-DNS traffic.

The DNS probe's program looks at every packet of every interface of the node netns and gives
up at once on anything that is not UDP to or from a DNS port: on a node, nearly all traffic.
Three ways to run it (bpf/dns.c, probes/dns/probe.py), the cases of this stage, in this order:
- tcx: the classifier on ingress and egress of every interface through tcx bpf links
  (--dns-hook tcx, the default on kernels 6.6+). Measured only where
  dpwatch.probes.dns.probe.tcx_supported() says the running kernel has tcx links; otherwise the
  case is left out and the report says why;
- socket: one AF_PACKET ETH_P_ALL socket with the program as its socket filter
  (--dns-hook socket, the default before 6.6); the kernel hands every packet to the socket's
  filter, cloning it on transmit first;
- tc: legacy clsact classifiers on ingress and egress of every interface, attached with
  pyroute2 (--dns-hook tc, only on request).

A. Datapath ratios (kernel.bpf_stats_enabled off). Each round measures, back to back: nothing
   loaded, then `dpwatch run --probes dns --dns-hook CASE` for each case, each under the
   drop-path load (64 B UDP to a non-DNS port, every packet dropped at a full socket: pps) and
   the forwarded path (routed through the node netns: each packet crosses two interfaces).
B. In-kernel cost (bpf_stats on): ns per program run and runs per packet of each case under
   the same drop-path load. For the socket hook this is only the filter; the clone and
   delivery around it show in A.
"""

from __future__ import annotations

from lib import median
from stage_softirq import _costs
from stages import Context, _udp

ALL_CASES = ("tcx", "socket", "tc")
PATHS = ("drop", "fwd")


def _cases() -> tuple[tuple[str, ...], str | None]:
    """The cases this kernel can run, and why tcx is left out (None when it is not)."""
    from dpwatch.probes.dns.probe import tcx_supported
    ok, why = tcx_supported()
    if ok:
        return ALL_CASES, None
    return tuple(c for c in ALL_CASES if c != "tcx"), why


def _settings(ctx: Context) -> dict:
    if ctx.settings.smoke:
        return {"rounds": 1, "udp": 1.0, "fwd": 1.0, "cost": 1.0}
    return {"rounds": 3, "udp": 5.0, "fwd": 5.0, "cost": 5.0}


class _Dpwatch:
    def __init__(self, ctx: Context, hook: str):
        self.ctx = ctx
        self.d = ctx.daemon(["--probes", "dns", "--dns-hook", hook], default=False)
        self.pid = self.d.pid

    def stop(self) -> None:
        self.ctx.stop(self.d, "dns cost")


def _measure(ctx: Context, st: dict) -> dict:
    return {"drop": _udp(ctx, st["udp"]), "fwd": _udp(ctx, st["fwd"], "forward")}


def _round_line(row: dict, cases: tuple[str, ...], st: dict) -> str:
    parts = []
    for path in PATHS:
        ratios = " ".join(f"{c} x{row[f'{c}_{path}_ratio']:.3f}" for c in cases)
        parts.append(f"{path} pps off {row['off'][path].rx_pps:,.0f} {ratios}")
    return f"  dns round {row['round']}/{st['rounds']}: " + "; ".join(parts)


def dns_cost(ctx: Context, res: dict, log) -> None:
    st = _settings(ctx)
    cases, skipped = _cases()
    res["settings"] = st
    res["cases"] = cases
    res["tcx_left_out"] = skipped
    if skipped:
        log(f"  dns: tcx left out, tcx_supported() says \"{skipped}\"; cases: {', '.join(cases)}")
    res["rounds"] = rounds = []
    for i in range(1, st["rounds"] + 1):
        row = {"round": i, "off": _measure(ctx, st)}
        for hook in cases:
            h = _Dpwatch(ctx, hook)
            try:
                row[hook] = _measure(ctx, st)
            finally:
                h.stop()
            for path in PATHS:
                row[f"{hook}_{path}_ratio"] = row[hook][path].rx_pps / row["off"][path].rx_pps
        rounds.append(row)
        log(_round_line(row, cases, st))
    for hook in cases:
        for path in PATHS:
            v = [r[f"{hook}_{path}_ratio"] for r in rounds]
            res[f"{hook}_{path}_ratio"] = median(v)
            res[f"{hook}_{path}_range"] = (min(v), max(v))

    ctx.sysctl.set("1")
    try:
        res["cost"] = cost = {}
        for hook in cases:
            log(f"  dns --dns-hook {hook}, bpf_stats on: drop-path load {st['cost']:g}s")
            cost[hook] = _costs(ctx, lambda h=hook: _Dpwatch(ctx, h), st["cost"], f"dns {hook}")
    finally:
        ctx.sysctl.restore()
    res["cheapest"] = max(cases, key=lambda h: sum(res[f"{h}_{p}_ratio"] for p in PATHS))


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def render(res: dict) -> str:
    L = ["## 6. DNS probe: tcx vs AF_PACKET socket filter vs legacy tc, cost to non-DNS traffic", ""]
    if not res.get("rounds"):
        return "\n".join(L + ["(no data: the stage failed, see the errors below)", ""])
    st, cases = res["settings"], res["cases"]
    runs = ", ".join(f"`--dns-hook {c}`" for c in cases)
    L.append(f"{st['rounds']} round(s); per case: trafgen {st['udp']:g} s to the dropping sink and "
             f"{st['fwd']:g} s on the forwarded path (64 B UDP to a non-DNS port, one CPU). Cases in "
             f"each round: nothing loaded, then `dpwatch run --probes dns` with {runs}. "
             "Ratios: case pps / no-load pps of the same round.")
    if res.get("tcx_left_out"):
        L.append("")
        L.append(f"tcx left out: dpwatch.probes.dns.probe.tcx_supported() says \"{res['tcx_left_out']}\".")
    L.append("")
    head = ["round"]
    for path in PATHS:
        head += [f"{path} pps off"] + [f"{path} {c}/off" for c in cases]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in res["rounds"]:
        cells = [str(r["round"])]
        for path in PATHS:
            cells += [f"{r['off'][path].rx_pps:,.0f}"] + [f"{r[f'{c}_{path}_ratio']:.4f}" for c in cases]
        L.append("| " + " | ".join(cells) + " |")
    cells = ["median"]
    for path in PATHS:
        cells += [""] + [_fmt(res.get(f"{c}_{path}_ratio")) for c in cases]
    L.append("| " + " | ".join(cells) + " |")
    L.append("")
    cost = res.get("cost") or {}
    if cost:
        L.append("| hook | program | type | ns/run | runs/packet | ns/packet | drop-path pps (stats on) |")
        L.append("|---|---|---|---|---|---|---|")
        for hook, c in cost.items():
            for p in c["programs"]:
                L.append(f"| {hook} | {p['name']} | {p['type']} | {p['ns_per_run']:.1f} | "
                         f"{p['runs_per_pkt']:.2f} | {c['ns_per_pkt']:.1f} | {c['load_rx_pps']:,.0f} |")
        L.append("")
    if res.get("cheapest"):
        L.append("Cheapest for non-DNS traffic (highest pps ratio, drop + forwarded, of "
                 f"{', '.join(cases)}): **{res['cheapest']}**.")
        L.append("")
    return "\n".join(L)


def insert_section(text: str, res: dict | None) -> str:
    """Put the section before the report's errors and notes (or at the end)."""
    if res is None:
        return text
    head, marker, tail = text.partition("## Errors and notes")
    return head + render(res) + "\n" + marker + tail if marker else text.rstrip("\n") + "\n\n" + render(res)
