"""Kernel tier: injected faults degrade one probe, visibly, and are counted; the rest keep
running; --strict turns them into a clean non-zero exit.

Faults injected (6):
1. a probe configured with a hook the kernel lacks (DPWATCH_FAULT_INJECT=hook:frag: its
   modes also need tracepoint dpwatch_fault:missing_tracepoint) -> unsupported;
2. a probe whose compile fails (DPWATCH_FAULT_INJECT=compile:mtu: an #error line in its real
   C source) -> failed, with the compiler's message;
3. the real probes' maps sized to 1 entry (--drops-location-entries 1 --drops-other-entries 1)
   -> still up and exact (LRU maps evict rather than fail, so no error is due there);
4. a map of 1 entry that really fills (a test-only probe with a plain hash whose one slot is
   taken) -> every update fails and is counted, exactly, in
   dpwatch_bpf_map_update_errors_total{probe,map} and dpwatch_events_lost_total{probe,stage};
5. a perf buffer of 1 page that is read too late (a test-only probe: no dpwatch probe sends
   events to user space, by design) -> lost events counted as stage perf_buffer, and
   received + lost equals what the kernel submitted;
6. --strict with faults 1+2 (exit 3 before serving) and with fault 4 (exit 5 while running).

Faults 1-3 and the strict start-up exit run the real `dpwatch run` process; 4-5 use test-only
probe classes (real BPF compiled, attached and driven by real traffic; only the fault is made
up) through the real manager, collector and HTTP app.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dpwatch.daemon import cli
from dpwatch.daemon import features as features_mod
from dpwatch.daemon.host import tracefs
from dpwatch.daemon.app import create_app
from dpwatch.daemon.config import Config
from dpwatch.daemon.manager import ProbeManager
from dpwatch.daemon.service import Daemon
from dpwatch.probes.base import Hook, Mode, Probe, State
from dpwatch.probes.drops.probe import DropsProbe
from netlab import Lab, closed_udp_port, in_netns, udp_send

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e"))
from test_daemon_e2e import DaemonProc, metric  # noqa: E402  (the e2e tier's daemon runner)


# ---- test-only probes: real BPF, made-up faults ------------------------------------------------

class FullMapProbe(Probe):
    """A plain hash of ONE entry, keyed by drop location, whose one slot the probe takes at
    attach time with a key no drop has: every NO_SOCKET drop then fails to insert."""
    name = "fullmap"
    bpf_source = "fullmap.c"
    modes = (Mode("raw", (Hook("raw_tracepoint", "skb:kfree_skb"),)),)
    error_slots = {"FULLMAP_ERR": "fullmap_seen"}

    def cflags(self, features):
        from dpwatch.probes.drops.probe import load_reason_names
        names, _ = load_reason_names(features.tracefs)
        no_socket = next(v for v, n in names.items() if n == "NO_SOCKET")
        return ["-DFULLMAP_MAX=1", f"-DFULLMAP_REASON={no_socket}"]

    def source_text(self):
        return """
BPF_HASH(fullmap_seen, u64, u64, FULLMAP_MAX);
RAW_TRACEPOINT_PROBE(kfree_skb)
{
    /* kfree_skb(skb, location, reason, ...): the same order on 6.1 and 6.18 */
    if ((u32)ctx->args[2] != FULLMAP_REASON)
        return 0;
    u64 key = ctx->args[1], one = 1;
    u64 *v = fullmap_seen.lookup(&key);
    if (v) {
        __sync_fetch_and_add(v, 1);
    } else if (fullmap_seen.update(&key, &one) != 0) {
        dpw_count_error(FULLMAP_ERR);
    }
    return 0;
}
"""

    def attach(self, module):
        super().attach(module)
        table = self.table("fullmap_seen")
        table[table.Key(0)] = table.Leaf(0)  # the only slot, taken by a key no drop has


class PerfProbe(Probe):
    """Sends one 256-byte event per transmitted packet of the test's own length to a perf
    buffer of ONE page, and counts its submissions in kernel; user space polls only when asked."""
    name = "perfbuf"
    bpf_source = "perfbuf.c"
    modes = (Mode("tracepoint", (Hook("tracepoint", "net:net_dev_queue"),)),)

    def cflags(self, features):
        return [f"-DPERFBUF_LEN={PERF_PAYLOAD + 8 + 20 + 14}"]  # UDP, IPv4, Ethernet headers

    def source_text(self):
        return """
struct perfbuf_ev { u64 n[32]; };
BPF_PERF_OUTPUT(perfbuf_events);
BPF_PERCPU_ARRAY(perfbuf_sent, u64, 1);
TRACEPOINT_PROBE(net, net_dev_queue)
{
    struct perfbuf_ev ev = {};
    u32 zero = 0;
    if (args->len != PERFBUF_LEN)
        return 0;
    u64 *sent = perfbuf_sent.lookup(&zero);
    if (sent)
        (*sent)++;
    ev.n[0] = args->len;
    perfbuf_events.perf_submit(args, &ev, sizeof(ev));
    return 0;
}
"""

    def attach(self, module):
        super().attach(module)
        self.received = self.lost = 0

        def got(_cpu, _data, _size):
            self.received += 1

        def lost(count):
            self.lost += count
        self.table("perfbuf_events").open_perf_buffer(got, page_cnt=1, lost_cb=lost)

    def poll(self):
        self.module.perf_buffer_poll(timeout=0)

    def sent(self) -> int:
        t = self.table("perfbuf_sent")
        return int(sum(t[t.Key(0)]))

    def lost_events(self):
        return {"perf_buffer": self.lost}


PERF_PAYLOAD = 977  # a datagram length nothing else on the machine sends


def send_on_cpu0(lab, port: int, count: int) -> int:
    def go():
        os.sched_setaffinity(0, {0})  # this thread only
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = 0
        try:
            for _ in range(count):
                try:
                    s.sendto(b"p" * PERF_PAYLOAD, (lab.pod.node_ip4, port))
                    sent += 1
                except ConnectionRefusedError:  # an earlier port-unreachable: not sent
                    pass
        finally:
            s.close()
        return sent
    return in_netns(lab.pod.ns, go)


def in_process_daemon(classes, **cfg_values) -> Daemon:
    """The real Daemon (snapshot ring, manager, collector, app) with the given probe classes."""
    tracefs.ensure_mounted()
    cfg = Config()
    cfg.probes = [c.name for c in classes]
    for k, v in cfg_values.items():
        setattr(cfg, k, v)
    d = Daemon(cfg)
    d.features = features_mod.detect()
    d.manager = ProbeManager(cfg, d.features, probe_classes=tuple(classes))
    d.manager.plan()
    d.manager.load()
    d.snapshot()
    return d


def http(app, path):
    import asyncio

    async def go():
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://dpwatch") as c:
            return await c.get(path)
    return asyncio.run(go())


def no_socket(reading) -> int:
    return sum(v for (r, _p), v in reading["drops"]["counters"]["drops"].items() if r == "NO_SOCKET")


# ---- 4: a really full map -----------------------------------------------------------------------

def test_full_map_is_counted_exactly_and_drops_keeps_counting(lab):
    d = in_process_daemon([DropsProbe, FullMapProbe])
    try:
        assert d.manager.status["fullmap"].state == State.ATTACHED
        app = create_app(d)
        r0 = d.manager.collect()
        port = closed_udp_port(lab.node, socket.AF_INET6)
        assert udp_send(lab.pod.ns, lab.pod.node_ip6, port, 150, family=socket.AF_INET6) == 150
        time.sleep(0.2)
        r1 = d.manager.collect()
        drops = no_socket(r1) - no_socket(r0)
        errs = (r1["_manager"]["counters"]["map_update_errors"][("fullmap", "fullmap_seen")]
                - r0["_manager"]["counters"]["map_update_errors"][("fullmap", "fullmap_seen")])
        assert drops >= 150
        assert errs == drops  # every NO_SOCKET drop failed to insert, and each one is counted

        text = http(app, "/metrics").text
        total = metric(text, "dpwatch_bpf_map_update_errors_total", probe="fullmap", map="fullmap_seen")
        assert total >= errs
        assert metric(text, "dpwatch_events_lost_total", probe="fullmap", stage="map_update") == total
        assert metric(text, "dpwatch_events_lost_total", probe="drops", stage="map_update") == 0
        assert 'dpwatch_probe_up{mode="raw",probe="fullmap"} 1.0' in text  # degraded, still up
        assert 'dpwatch_probe_up{mode="tracepoint",probe="drops"} 1.0' in text
        probes = {p["name"]: p for p in http(app, "/probes").json()["probes"]}
        assert probes["fullmap"]["map_update_errors"]["fullmap_seen"] >= errs
        assert probes["fullmap"]["events_lost"]["map_update"] >= errs
        assert probes["drops"]["events_lost"] == {"map_update": 0, "collect": 0}

        # --strict while running: the loss stops the server the way SIGTERM does, exit 5.
        class _Server:
            should_exit = False
        box = {"rc": 0, "stop": threading.Event()}
        d.config.snapshot_interval = 0.2
        cli.strict_watch(d, _Server, box)
        assert box["rc"] == cli.EX_FAULT == 5 and _Server.should_exit is True
    finally:
        d.stop()


# ---- 5: a tiny perf buffer ------------------------------------------------------------------------

def test_tiny_perf_buffer_counts_lost_events(lab):
    d = in_process_daemon([DropsProbe, PerfProbe])
    try:
        probe = d.manager.probes["perfbuf"]
        assert d.manager.status["perfbuf"].state == State.ATTACHED
        port = closed_udp_port(lab.node)
        # 2000 events of 256 B: far more than one page holds. All sends from CPU 0 (veth
        # delivers in the sender's softirq), so they all land in CPU 0's ring, and so do the
        # single datagrams below that make the kernel write out its loss record.
        assert send_on_cpu0(lab, port, 2000) == 2000
        time.sleep(0.2)
        assert probe.sent() == 2000
        # Drain. The kernel reports a loss (PERF_RECORD_LOST) with the next record it manages
        # to write, so a few single datagrams follow the reads until every submission is
        # accounted for as received or lost.
        for _ in range(20):
            probe.poll()
            sent = probe.sent()
            if probe.received + probe.lost == sent:
                break
            send_on_cpu0(lab, port, 1)
            time.sleep(0.05)
        assert probe.lost > 0, (probe.received, probe.lost, sent)
        assert probe.received + probe.lost == sent
        text = http(create_app(d), "/metrics").text
        assert metric(text, "dpwatch_events_lost_total", probe="perfbuf", stage="perf_buffer") >= probe.lost > 0
        assert 'dpwatch_probe_up{mode="tracepoint",probe="drops"} 1.0' in text
    finally:
        d.stop()


# ---- 1-3: the real daemon process -----------------------------------------------------------------

FAULTS = {"DPWATCH_FAULT_INJECT": "hook:frag,compile:mtu"}


def test_real_daemon_degrades_per_probe_and_counts_exactly(dpwatch_bin, monkeypatch):
    for k, v in FAULTS.items():
        monkeypatch.setenv(k, v)
    with Lab(pods=1) as lab:
        d = DaemonProc(dpwatch_bin, lab.node, 9441, "--probes", "drops,conntrack,frag,mtu",
                       "--drops-location-entries", "1", "--drops-other-entries", "1")
        try:
            d.wait_ready()
            probes = {p["name"]: p for p in json.loads(d.get("/probes")[2])["probes"]}
            assert probes["frag"]["state"] == "unsupported"
            assert "tracepoint:dpwatch_fault:missing_tracepoint" in probes["frag"]["reason"]
            assert probes["mtu"]["state"] == "failed"
            assert "dpwatch fault injection" in probes["mtu"]["reason"]
            assert probes["drops"]["state"] == "attached"
            assert probes["conntrack"]["state"] in ("attached", "degraded")
            assert probes["drops"]["info"]["location_entries"] == 1

            before = metric(d.get("/metrics")[2], "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv6")
            port = closed_udp_port(lab.node, socket.AF_INET6)
            assert udp_send(lab.pod.ns, lab.pod.node_ip6, port, 120, family=socket.AF_INET6) == 120
            time.sleep(0.3)
            text = d.get("/metrics")[2]
            assert metric(text, "dpwatch_skb_drops_total", reason="NO_SOCKET", protocol="ipv6") - before == 120
            assert metric(text, "dpwatch_probe_up", probe="frag") == 0
            assert metric(text, "dpwatch_probe_up", probe="mtu") == 0
            assert metric(text, "dpwatch_probe_up", probe="drops") == 1
            assert metric(text, "dpwatch_probe_up", probe="conntrack") == 1
            report = json.loads(d.get("/diagnose?format=json&window=5m")[2])
            for f in report["findings"]:
                for loc in f["evidence"].get("top_locations", []):
                    assert loc["count"] > 0
            assert all(len(f["evidence"].get("top_locations", [])) <= 1 for f in report["findings"])
        finally:
            assert d.stop() == 0


@pytest.mark.host_only  # exit handling, not kernel behaviour; compile:mtu means six compiles, over 300 s under emulation in the guest
@pytest.mark.parametrize("fault", ["hook:frag", "compile:mtu"])
def test_strict_turns_a_fault_into_a_clean_exit(dpwatch_bin, fault):
    with Lab(pods=1) as lab:
        res = subprocess.run(["ip", "netns", "exec", lab.node, "env", f"DPWATCH_FAULT_INJECT={fault}",
                              dpwatch_bin, "run", "--strict", "--listen", "127.0.0.1:9442",
                              "--probes", "drops,conntrack,frag,mtu"],
                             capture_output=True, text=True, timeout=300)
    probe = fault.split(":")[1]
    assert res.returncode == cli.EX_NOT_LOADED == 3, res.stderr[-2000:]
    assert f"probe {probe} " in res.stderr and "exiting: --strict and a probe is down" in res.stderr
    assert "Traceback" not in res.stderr


# ---- the series cap over real maps ---------------------------------------------------------------

def test_series_cap_folds_real_drop_reasons_into_other(lab):
    """--max-series-per-metric 1 on the real drops probe: after IPv4 and IPv6 drops there are
    two (reason, protocol) label sets or more; one keeps its series, the rest fold into
    {reason="other",protocol="other"}, nothing is lost from the total, and the overflow is
    counted."""
    d = in_process_daemon([DropsProbe], max_series_per_metric=1)
    try:
        for fam, dst in ((socket.AF_INET, lab.pod.node_ip4), (socket.AF_INET6, lab.pod.node_ip6)):
            udp_send(lab.pod.ns, dst, closed_udp_port(lab.node, fam), 50, family=fam)
        time.sleep(0.2)
        app = create_app(d)

        def total():
            raw = d.manager.collect()["drops"]["counters"]["drops"]
            return sum(v for (reason, _p), v in raw.items() if reason not in ("NOT_DROPPED_YET", "CONSUMED"))
        before = total()
        text = http(app, "/metrics").text
        after = total()
        rows = [ln for ln in text.splitlines() if ln.startswith("dpwatch_skb_drops_total{")]
        assert len(rows) == 2, rows
        assert any('protocol="other",reason="other"' in r for r in rows)
        shown = sum(float(r.rsplit(" ", 1)[1]) for r in rows)
        assert before <= shown <= after  # nothing lost from the total (drops go on meanwhile)
        assert metric(text, "dpwatch_series_overflow_total", metric="dpwatch_skb_drops") >= 1
    finally:
        d.stop()
