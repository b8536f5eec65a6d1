"""dpwatch overhead benchmark: `make bench` (full, ~10 min) or `bench/run.py --smoke` (< 1 min).

Runs, in one go and on one machine: (1) the datapath impact of a running dpwatch (UDP small-
packet throughput and request/response latency, off/on pairs), (2) the in-kernel cost of each
dpwatch BPF program, (2b, informative) the cost of a per-interface packet tap (AF_PACKET +
socket filter), (3) the daemon's own cost (start-up, memory, CPU, endpoint latency),
(4) the same figures for a peer exporter and (5) the softirq probe's datapath cost next to
bcc's softirqs tool (bench/stage_softirq.py). Prints a markdown report and writes it to --out.

Exit status: 0 done (budgets are reported as MET/MISS, never asserted); 1 a stage could not
produce its numbers; 2 prerequisites missing (not root, a tool missing); 130 interrupted.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lib  # noqa: E402
import report  # noqa: E402
import stage_dns  # noqa: E402
import stage_softirq  # noqa: E402
import stages  # noqa: E402

EX_BROKEN, EX_PREREQ, EX_INTERRUPTED = 1, 2, 130


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="every stage with tiny durations (1 pair, ~1 s loads, 10 scrapes); exit 1 if any "
                        "stage fails to produce a number")
    p.add_argument("--out", help="report file (default bench/results/latest.md, or smoke.md with --smoke)")
    p.add_argument("--pairs", type=int, help="off/on pairs (default 5; smoke 1)")
    p.add_argument("--udp-seconds", type=float, help="trafgen seconds to the dropping sink per half pair (default 10)")
    p.add_argument("--fwd-seconds", type=float, help="trafgen seconds on the forwarded path per half pair (default 5)")
    p.add_argument("--lat-seconds", type=float, help="sockperf seconds per half pair (default 5)")
    p.add_argument("--idle-seconds", type=float, help="idle CPU interval, steady RSS after it (default 30)")
    p.add_argument("--scrapes", type=int, help="timed /metrics scrapes per case (default 200)")
    # The tap stage (2b) is a design experiment (is an AF_PACKET tap cheap enough?), not a cost
    # of dpwatch as shipped, and adds ~4 minutes: run it with --stages ...,tap when needed.
    p.add_argument("--stages", default="datapath,bpf,daemon,peers,softirq",
                   help="comma-separated subset of datapath,bpf,tap,daemon,peers,softirq,dns (default: all "
                        "but tap and dns, the two hook-choice experiments)")
    p.add_argument("--dpwatch", default=os.path.join(os.path.dirname(sys.executable), "dpwatch"),
                   help="the dpwatch executable (default: next to this interpreter)")
    a = p.parse_args(argv)
    if a.pairs is not None and a.pairs < 1:
        p.error("--pairs must be >= 1")
    return a


def settings_from(a: argparse.Namespace) -> stages.Settings:
    s = stages.Settings.for_smoke() if a.smoke else stages.Settings()
    for name in ("pairs", "udp_seconds", "fwd_seconds", "lat_seconds", "idle_seconds", "scrapes"):
        v = getattr(a, name)
        if v is not None:
            setattr(s, name, v)
    return s


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    s = settings_from(a)
    repo = lib.REPO
    out = a.out or os.path.join(repo, "bench", "results", "smoke.md" if a.smoke else "latest.md")
    wanted = [x.strip() for x in a.stages.split(",") if x.strip()]
    unknown = set(wanted) - {"datapath", "bpf", "tap", "daemon", "peers", "softirq", "dns"}
    if unknown:
        log(f"bench: unknown stage(s) {', '.join(sorted(unknown))}")
        return EX_PREREQ

    if os.geteuid() != 0:
        log("bench: must run as root (network namespaces, BPF, the bpf_stats sysctl)")
        return EX_PREREQ
    tools, missing = lib.Tools.find(a.dpwatch)
    if tools is None:
        log(f"bench: missing: {', '.join(missing)} (run deploy/setup.sh --bench)")
        return EX_PREREQ

    signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.monotonic()
    r: dict = {"settings": s, "errors": [], "notes": []}
    r["machine"] = lib.machine_info(tools)
    r["load_start"] = lib.loadavg()
    r["busy_start"] = lib.busy_processes()
    if r["busy_start"]:
        log(f"bench: WARNING: other processes are busy, figures will be noisy: {', '.join(r['busy_start'])}")

    logdir = tempfile.mkdtemp(prefix="dpwbench-")
    lab = None
    dp = None
    ctx = None
    interrupted = False
    try:
        lab = lib.Lab(pods=1, tag=f"b{os.getpid() % 100000}")  # not a test Lab's digits-only tag
        dp = lib.Datapath(tools, lab, logdir)
        ctx = stages.Context(tools=tools, lab=lab, dp=dp, settings=s, logdir=logdir)
        plan = [("datapath", "1. datapath impact", stages.datapath),
                ("bpf", "2. in-kernel cost per program", stages.bpf_cost),
                ("tap", "2b. packet tap (informative)", stages.tap_cost),
                ("daemon", "3. daemon cost", stages.daemon_cost),
                ("peers", "4. peers", stages.peers),
                ("softirq", "5. softirq probe vs bcc softirqs", stage_softirq.softirq_cost),
                ("dns", "6. DNS probe hook: tcx vs socket filter vs legacy tc", stage_dns.dns_cost)]
        for key, title, fn in plan:
            if key not in wanted:
                continue
            log(f"bench: {title} ...")
            t0 = time.monotonic()
            res = r.setdefault(key, {})
            try:
                fn(ctx, res, log)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                msg = f"{title}: {exc}"
                if not isinstance(exc, lib.BenchError):
                    msg += "\n" + traceback.format_exc()
                r["errors"].append(msg)
                log(f"bench: ERROR in {msg}")
            log(f"bench: {title} took {time.monotonic() - t0:.0f}s")
        r["startups"] = ctx.startups
        r["notes"] += ctx.notes
    except KeyboardInterrupt:
        interrupted = True
        log("bench: interrupted; cleaning up")
    except Exception as exc:  # the lab itself could not be set up
        r["errors"].append(f"set-up: {exc}\n{traceback.format_exc()}")
        log(f"bench: ERROR in set-up: {exc}")
    finally:
        lib.Proc.stop_all()
        if ctx is not None:
            try:
                ctx.sysctl.restore()
            except OSError as exc:
                log(f"bench: could not restore {lib.BPF_STATS_SYSCTL}: {exc}")
        if dp is not None:
            dp.close()
            for target in dp.conf.values():
                os.unlink(target)
        if lab is not None:
            lab.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if interrupted:
        return EX_INTERRUPTED

    if ctx is not None and ctx.flags.get("--bpf-stats") is False:
        r["notes"].append("dpwatch has no --bpf-stats flag: the daemon's own BPF cost export is n/a.")
    if ctx is not None and ctx.flags.get("--synthetic-series") is False:
        r["notes"].append("dpwatch has no --synthetic-series flag: the 10k-series scrape is n/a.")
    r["load_end"] = lib.loadavg()
    r["busy_end"] = lib.busy_processes()
    r["wall"] = time.monotonic() - t_start
    text = stage_softirq.insert_section(report.render(r), r.get("softirq"))
    text = stage_dns.insert_section(text, r.get("dns"))
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    log(f"bench: report written to {out} ({r['wall']:.0f}s)")
    try:
        os.rmdir(logdir)  # empty unless a process failed: then its log is kept there
    except OSError:
        log(f"bench: logs of failed processes kept in {logdir}")
    if r["errors"]:
        log(f"bench: {len(r['errors'])} stage(s) failed")
        return EX_BROKEN
    return 0


if __name__ == "__main__":
    sys.exit(main())
