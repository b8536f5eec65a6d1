"""Stage "dns": which hook the DNS probe should use, decided by what it costs NON-DNS traffic.

The DNS probe's program looks at every packet of every interface of the node netns and gives
up at once on anything that is not UDP to or from a DNS port: on a node, nearly all traffic.
Two ways to run it (bpf/dns.c, probes/dns.py):
- tc: a clsact classifier on ingress and egress of every interface (--dns-hook tc);
- socket: one AF_PACKET ETH_P_ALL socket with the program as its socket filter
  (--dns-hook socket); the kernel hands every packet to the socket's filter, cloning it on
  transmit first.

A. Datapath ratios (kernel.bpf_stats_enabled off). Each round measures, back to back: nothing
   loaded, `dpwatch run --probes dns --dns-hook tc`, and `... --dns-hook socket`, each under
   the drop-path load (64 B UDP to a non-DNS port, every packet dropped at a full socket: pps)
   and the forwarded path (routed through the node netns: each packet crosses two interfaces).
B. In-kernel cost (bpf_stats on): ns per program run and runs per packet of each hook under
   the same drop-path load. For the socket hook this is only the filter; the clone and
   delivery around it show in A.
"""

from __future__ import annotations

from lib import median
from stage_softirq import _costs
from stages import Context, _udp

CASES = ("tc", "socket")


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


def dns_cost(ctx: Context, res: dict, log) -> None:
    st = _settings(ctx)
    res["settings"] = st
    res["rounds"] = rounds = []
    for i in range(1, st["rounds"] + 1):
        row = {"round": i, "off": _measure(ctx, st)}
        for hook in CASES:
            h = _Dpwatch(ctx, hook)
            try:
                row[hook] = _measure(ctx, st)
            finally:
                h.stop()
            for path in ("drop", "fwd"):
                row[f"{hook}_{path}_ratio"] = row[hook][path].rx_pps / row["off"][path].rx_pps
        rounds.append(row)
        log(f"  dns round {i}/{st['rounds']}: drop pps off {row['off']['drop'].rx_pps:,.0f} tc "
            f"x{row['tc_drop_ratio']:.3f} socket x{row['socket_drop_ratio']:.3f}; fwd pps off "
            f"{row['off']['fwd'].rx_pps:,.0f} tc x{row['tc_fwd_ratio']:.3f} socket x{row['socket_fwd_ratio']:.3f}")
    for hook in CASES:
        for path in ("drop", "fwd"):
            v = [r[f"{hook}_{path}_ratio"] for r in rounds]
            res[f"{hook}_{path}_ratio"] = median(v)
            res[f"{hook}_{path}_range"] = (min(v), max(v))

    ctx.sysctl.set("1")
    try:
        res["cost"] = cost = {}
        for hook in CASES:
            log(f"  dns --dns-hook {hook}, bpf_stats on: drop-path load {st['cost']:g}s")
            cost[hook] = _costs(ctx, lambda h=hook: _Dpwatch(ctx, h), st["cost"], f"dns {hook}")
    finally:
        ctx.sysctl.restore()
    res["cheaper"] = max(CASES, key=lambda h: (res[f"{h}_drop_ratio"] + res[f"{h}_fwd_ratio"]))


def render(res: dict) -> str:
    L = ["## 6. DNS probe: tc classifier vs AF_PACKET socket filter, cost to non-DNS traffic", ""]
    if not res.get("rounds"):
        return "\n".join(L + ["(no data: the stage failed, see the errors below)", ""])
    st = res["settings"]
    L.append(f"{st['rounds']} round(s); per case: trafgen {st['udp']:g} s to the dropping sink and "
             f"{st['fwd']:g} s on the forwarded path (64 B UDP to a non-DNS port, one CPU). Cases in "
             "each round: nothing loaded, `dpwatch run --probes dns --dns-hook tc`, `... --dns-hook "
             "socket`. Ratios: case pps / no-load pps of the same round.")
    L.append("")
    L.append("| round | drop pps off | tc on/off | socket on/off | fwd pps off | tc on/off | socket on/off |")
    L.append("|---|---|---|---|---|---|---|")
    for r in res["rounds"]:
        L.append(f"| {r['round']} | {r['off']['drop'].rx_pps:,.0f} | {r['tc_drop_ratio']:.4f} | "
                 f"{r['socket_drop_ratio']:.4f} | {r['off']['fwd'].rx_pps:,.0f} | {r['tc_fwd_ratio']:.4f} | "
                 f"{r['socket_fwd_ratio']:.4f} |")
    L.append(f"| median | | {res['tc_drop_ratio']:.4f} | {res['socket_drop_ratio']:.4f} | | "
             f"{res['tc_fwd_ratio']:.4f} | {res['socket_fwd_ratio']:.4f} |")
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
    L.append(f"Cheaper for non-DNS traffic (higher pps ratio, drop + forwarded): **{res['cheaper']}**.")
    L.append("")
    return "\n".join(L)


def insert_section(text: str, res: dict | None) -> str:
    """Put the section before the report's errors and notes (or at the end)."""
    if res is None:
        return text
    head, marker, tail = text.partition("## Errors and notes")
    return head + render(res) + "\n" + marker + tail if marker else text.rstrip("\n") + "\n\n" + render(res)
