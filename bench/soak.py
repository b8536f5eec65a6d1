"""Soak: run the real daemon for a long time under traffic and DNS load, and sample its RSS.

Not part of CI (it takes --minutes, at least 30 for a result worth committing). Everything
runs in network namespaces this script creates (tests/netlab.py Lab) and removes:

- the daemon (`dpwatch run`, every probe that loads) in the node netns, snapshot every 1s and
  --max-window (default 5 minutes; longer ones use the ring's coarse tier), so the snapshot
  ring is full after --max-window and must stay flat after that;
- dnsmasq in the node netns answering ok.test (A), nx.test (NXDOMAIN) and REFUSED for the rest;
- a load worker in the pod netns (this file with --worker): UDP to a closed port (NO_SOCKET
  drops), UDP into a never-read socket (SOCKET_RCVBUFF drops), TCP connects to a closed port
  (RSTs), DNS queries for random names (new names every query: the worst case for any
  name-keyed table), all paced;
- a scraper: /metrics every 1 s, /diagnose?format=json every 5 s, /probes every 10 s;
- pod churn: a veth pair added in the node netns every --churn seconds and the previous one
  deleted (the DNS probe's tcx links follow each, from link messages).

RSS (VmRSS, RssAnon) of the daemon is sampled every --sample seconds. The result is a JSON file
and a markdown summary: RSS at start (first sample after ready), once the ring is full,
at the end, and the drift from ring-full to end (the number that must stay flat).

    /work/main/.venv/bin/python bench/soak.py --minutes 32 --out /tmp/soak.json

--tracemalloc N runs the daemon under Python's tracemalloc (N frames per allocation) and dumps
a heap snapshot every --tm-every seconds after the ring is full (SIGUSR2 to the daemon). The
result then holds the allocation sites whose size grew most from the first dump to the last:
the way to tell a leak in our code from allocator fragmentation. tracemalloc's own traces
inflate RSS, so a run with it measures where memory goes, not how much.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "tests"))

PORT = 9477
DNS_IP_SUFFIX = ".1"     # dnsmasq listens on the node's veth address
SINK_PORT = 9998          # never read: SOCKET_RCVBUFF drops
CLOSED_UDP = 9997         # nothing bound: NO_SOCKET drops
CLOSED_TCP = 9996         # nothing listening: RST


# --------------------------------------------------------------------------------------------
# The load worker (runs inside the pod netns, started by the parent with --worker)

def dns_query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)


def worker(target: str, seconds: float, udp_pps: int, dns_qps: int, tcp_cps: int) -> int:
    deadline = time.monotonic() + seconds
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.setblocking(False)
    sent = {"udp": 0, "dns": 0, "dns_answers": 0, "tcp": 0}
    rng = random.Random(1)
    tick = 0.1
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        for _ in range(max(1, udp_pps // 20)):
            for port in (CLOSED_UDP, SINK_PORT):
                try:
                    udp.sendto(b"s" * 200, (target, port))
                    sent["udp"] += 1
                except OSError:
                    pass
        for i in range(max(1, int(dns_qps * tick))):
            kind = i % 3
            name = ("ok.test" if kind == 0 else
                    f"x{rng.getrandbits(40):x}.nx.test" if kind == 1 else
                    f"r{rng.getrandbits(40):x}.example")
            try:
                dns.sendto(dns_query(name, rng.getrandbits(16)), (target, 53))
                sent["dns"] += 1
            except OSError:
                pass
        for _ in range(max(0, int(tcp_cps * tick))):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(0.2)
            try:
                c.connect((target, CLOSED_TCP))
            except OSError:
                pass
            finally:
                c.close()
            sent["tcp"] += 1
        while True:
            try:
                dns.recv(4096)
                sent["dns_answers"] += 1
            except BlockingIOError:
                break
        next_at += tick
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(json.dumps(sent), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# tracemalloc: the daemon runs under this wrapper, which dumps a snapshot on SIGUSR2

TM_WRAPPER = """
import os, signal, sys, tracemalloc
tracemalloc.start(int(os.environ["DPW_TM_FRAMES"]))
_n = [0]
def _dump(*_):
    _n[0] += 1
    tracemalloc.take_snapshot().dump(os.path.join(os.environ["DPW_TM_DIR"], "tm-%03d.snap" % _n[0]))
signal.signal(signal.SIGUSR2, _dump)
from dpwatch.daemon.cli import main
sys.argv[0] = "dpwatch"
sys.exit(main())
"""


def tm_growth(first: str, last: str, top: int = 25) -> list[dict]:
    """The allocation sites (by traceback) that grew most between two dumps, ours first."""
    import tracemalloc
    a, b = tracemalloc.Snapshot.load(first), tracemalloc.Snapshot.load(last)
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a, b = a.filter_traces(filters), b.filter_traces(filters)
    stats = b.compare_to(a, "traceback")
    out = []
    for st in stats[:top]:
        out.append({"size_diff_kb": round(st.size_diff / 1024, 1), "size_kb": round(st.size / 1024, 1),
                    "count_diff": st.count_diff,
                    "where": [f"{f.filename.split('/site-packages/')[-1].split('/work/main/')[-1]}:{f.lineno}"
                              for f in st.traceback][-6:]})  # innermost: where it was allocated
    total_a = sum(t.size for t in a.traces)
    total_b = sum(t.size for t in b.traces)
    out.insert(0, {"traced_first_kb": round(total_a / 1024, 1), "traced_last_kb": round(total_b / 1024, 1)})
    return out


# --------------------------------------------------------------------------------------------
# The summary

def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


def summarize(samples: list[dict], ring_full_s: float = 300.0) -> dict:
    """RSS at start, when the ring is full (``ring_full_s``), at 10 minutes (or ring full, if
    later) and at the end; the drift
    from each to the end; and the least-squares slope (kB/min) over the second half of the run,
    the number that says whether memory is still growing."""
    def at(seconds: float) -> dict:
        return next((s for s in samples if s["t"] >= seconds), samples[-1])
    first, ring_full, ten, last = samples[0], at(ring_full_s), at(max(600.0, ring_full_s)), samples[-1]
    half = [s for s in samples if s["t"] >= last["t"] / 2]
    return {
        "length_minutes": round(last["t"] / 60, 1),
        "rss_start_kb": first["rss_kb"], "rss_ring_full_kb": ring_full["rss_kb"],
        "ring_full_at_s": ring_full["t"], "rss_10min_kb": ten["rss_kb"], "rss_end_kb": last["rss_kb"],
        "rss_max_kb": max(s["rss_kb"] for s in samples),
        "drift_after_ring_full_kb": last["rss_kb"] - ring_full["rss_kb"],
        "drift_after_10min_kb": last["rss_kb"] - ten["rss_kb"],
        "slope_second_half_kb_per_min": round(_slope([(s["t"] / 60, s["rss_kb"]) for s in half]), 1),
        "anon_ring_full_kb": ring_full["anon_kb"], "anon_end_kb": last["anon_kb"],
        "slope_second_half_anon_kb_per_min": round(_slope([(s["t"] / 60, s["anon_kb"]) for s in half]), 1),
    }


# --------------------------------------------------------------------------------------------
# The parent

def veth_churn(ns: str, n: int) -> None:
    """Add veth pair n in ``ns`` and delete pair n-1: a pod coming and one going."""
    import subprocess
    subprocess.run(["ip", "-n", ns, "link", "add", f"dpwsk{n}", "type", "veth", "peer", "name", f"dpwsp{n}"],
                   check=True, capture_output=True)
    subprocess.run(["ip", "-n", ns, "link", "del", f"dpwsk{n - 1}"], capture_output=True)


def rss(pid: int) -> dict[str, int]:
    from lib import proc_status
    return proc_status(pid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=32.0)
    ap.add_argument("--sample", type=float, default=10.0, help="RSS sample period, seconds")
    ap.add_argument("--udp-pps", type=int, default=2000, help="datagrams/s to each UDP target")
    ap.add_argument("--dns-qps", type=int, default=300)
    ap.add_argument("--tcp-cps", type=int, default=20)
    ap.add_argument("--max-window", type=float, default=300.0,
                    help="the daemon's --max-window, seconds; the ring is full after it (over 300: tiers)")
    ap.add_argument("--churn", type=float, default=10.0, help="seconds between veth adds (0: none)")
    ap.add_argument("--out", default="/tmp/dpwatch-soak.json")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="run the daemon under tracemalloc and report the growing allocation sites")
    ap.add_argument("--tm-every", type=float, default=300.0, help="seconds between heap dumps")
    ap.add_argument("--tm-first", type=float, default=360.0,
                    help="seconds to the first heap dump (after the 5-minute ring is full)")
    ap.add_argument("--summarize", metavar="JSON", help="print the summary of an earlier run's result file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # target address: run the load loop
    a = ap.parse_args(argv)
    if a.summarize:
        with open(a.summarize) as f:
            r = json.load(f)
            print(json.dumps(summarize(r["samples"], r.get("max_window_s", 300.0)), indent=1))
        return 0
    if a.worker:
        return worker(a.worker, a.minutes * 60, a.udp_pps, a.dns_qps, a.tcp_cps)

    from lib import Proc, Tools, http_once, wait_http, which
    from netlab import Lab, in_netns

    dpwatch = os.path.join(REPO, ".venv", "bin", "dpwatch")
    tools = Tools(ip=which("ip"), ss=which("ss"), trafgen=which("trafgen") or "",
                  sockperf=which("sockperf") or "", bpftool=which("bpftool") or "",
                  node_exporter="", dpwatch=dpwatch)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
    seconds = a.minutes * 60
    result: dict = {"minutes": a.minutes, "udp_pps_per_target": a.udp_pps, "dns_qps": a.dns_qps,
                    "tcp_cps": a.tcp_cps, "max_window_s": a.max_window, "samples": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    procs: list[Proc] = []
    with Lab(pods=1) as lab:
        node_ip = lab.pod.node_ip4
        sink = in_netns(lab.node, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        in_netns(lab.node, lambda: sink.bind((node_ip, SINK_PORT)))
        try:
            procs.append(Proc("dnsmasq", ["/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv",
                                          "--no-hosts", "--conf-file=/dev/null", "--user=root",
                                          "--bind-interfaces", f"--listen-address={node_ip}",
                                          "--cache-size=0", "--address=/ok.test/192.0.2.10",
                                          "--address=/nx.test/", "--log-facility=/dev/null"],
                              lab.node, tools))
            tm_dir, tm_env, launcher = "", None, [dpwatch]
            if a.tracemalloc:
                import tempfile
                tm_dir = tempfile.mkdtemp(prefix="dpwatch-tm-")
                tm_env = {"DPW_TM_FRAMES": str(a.tracemalloc), "DPW_TM_DIR": tm_dir}
                launcher = [os.path.join(REPO, ".venv", "bin", "python"), "-c", TM_WRAPPER]
            d = Proc("dpwatch", launcher + ["run", "--listen", f"127.0.0.1:{PORT}",
                                 "--snapshot-interval", "1s", "--max-window", f"{a.max_window:g}s",
                                 "--mtu-audit-interval", "5s", "--log-level", "warning"], lab.node, tools,
                     env=tm_env)
            procs.append(d)
            ready = wait_http(lab.node, PORT, "/readyz", d, 300)
            probes = json.loads(http_once(lab.node, PORT, "/probes")[1])
            result["probes"] = {p["name"]: f"{p['state']}/{p['mode']}" for p in probes["probes"]}
            result["startup_seconds"] = round(ready, 2)
            w = Proc("load", ["/usr/bin/python3", os.path.abspath(__file__), "--worker", node_ip,
                              "--minutes", str(a.minutes), "--udp-pps", str(a.udp_pps),
                              "--dns-qps", str(a.dns_qps), "--tcp-cps", str(a.tcp_cps)],
                     lab.pod.ns, tools)
            procs.append(w)
            t0 = time.monotonic()
            next_sample = t0
            n = 0
            errors = 0
            next_dump = t0 + a.tm_first
            next_churn, churned = t0 + a.churn, 0
            while not stop["now"] and time.monotonic() - t0 < seconds:
                if not d.alive():
                    raise RuntimeError(f"daemon exited {d.popen.returncode}:\n{d.output()}")
                try:
                    status, _ = http_once(lab.node, PORT, "/metrics")
                    if n % 5 == 0:
                        status = max(status, http_once(lab.node, PORT, "/diagnose?format=json&window=5m")[0])
                    if n % 10 == 0:
                        status = max(status, http_once(lab.node, PORT, "/probes")[0])
                    if status != 200:
                        errors += 1
                except OSError:
                    errors += 1
                n += 1
                now = time.monotonic()
                if now >= next_sample:
                    s = rss(d.pid)
                    result["samples"].append({"t": round(now - t0, 1), "rss_kb": s["VmRSS"],
                                              "anon_kb": s["RssAnon"], "hwm_kb": s["VmHWM"],
                                              "threads": s["Threads"]})
                    next_sample += a.sample
                    with open(a.out, "w") as f:  # partial results survive an interruption
                        json.dump(result, f, indent=1)
                if a.churn and now >= next_churn:
                    churned += 1
                    veth_churn(lab.node, churned)
                    next_churn += a.churn
                if a.tracemalloc and now >= next_dump:
                    os.kill(d.pid, signal.SIGUSR2)
                    next_dump += a.tm_every
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
            result["scrapes"], result["scrape_errors"], result["veth_churned"] = n, errors, churned
            result["dns_probe_info"] = {k: v for k, v in next(
                p for p in json.loads(http_once(lab.node, PORT, "/probes")[1])["probes"]
                if p["name"] == "dns").get("info", {}).items() if k in ("link_watch", "link_events", "interfaces")}
            if a.tracemalloc:
                def snaps() -> list[str]:
                    return sorted(f for f in os.listdir(tm_dir) if f.endswith(".snap"))
                before = len(snaps())
                os.kill(d.pid, signal.SIGUSR2)
                dumps, size = snaps(), -1
                for _ in range(180):  # a snapshot of a big heap takes seconds to write
                    time.sleep(1)
                    dumps = snaps()
                    if len(dumps) > before:
                        now_size = os.path.getsize(os.path.join(tm_dir, dumps[-1]))
                        if now_size == size and size > 0:
                            break
                        size = now_size
                if len(dumps) >= 2:
                    result["tracemalloc"] = {"dumps": len(dumps), "dir": tm_dir,
                                             "growth": tm_growth(os.path.join(tm_dir, dumps[0]),
                                                                 os.path.join(tm_dir, dumps[-1]))}
            metrics = http_once(lab.node, PORT, "/metrics")[1]
            result["series"] = sum(1 for ln in metrics.splitlines() if ln and not ln.startswith("#"))
            try:
                w.popen.wait(timeout=30)  # the worker stops on its own at the same deadline
            except Exception:
                pass
            tail = w.output().strip().splitlines()
            result["load"] = json.loads(tail[-1]) if tail and tail[-1].startswith("{") else tail[-3:]
            w.stop(timeout=10)
            result["daemon_exit"] = d.stop(timeout=10)
        finally:
            for p in reversed(procs):
                p.stop(timeout=10)
            sink.close()
    if result["samples"]:
        result["summary"] = summarize(result["samples"], a.max_window)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result.get("summary", {}), indent=1))
    return 0 if result.get("daemon_exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
