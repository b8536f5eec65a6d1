"""The golden /metrics: the whole exposition of every probe, built without a kernel, compared
with tests/unit/fixtures/metrics/golden.txt and checked by promtool.

Each probe gets a realistic reading that reaches every metric family its metrics() can
export (drops' reading is read by its own collect() from fake BCC maps; the others are
readings as their collect() returns them), and the readings go through the daemon's registry
(daemon/collector.py's make_registry) over tests/fakes.py's manager. Volatile values (the
version, durations) are normalised; process_* (the daemon's own CPU and memory) is left out.

The golden file records today's metric names, labels and help: a refactor that changes one
fails here. When the change is meant, regenerate it and review the diff:

    DPWATCH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_golden_metrics.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dpwatch.daemon.collector import make_registry
from dpwatch.daemon.config import Config
from dpwatch.probes.base import State
from dpwatch.probes.conntrack.probe import ConntrackProbe
from dpwatch.probes.dns.probe import DnsProbe
from dpwatch.probes.drops.probe import DropsProbe
from dpwatch.probes.frag.probe import FragProbe
from dpwatch.probes.mtu.probe import MtuProbe
from dpwatch.probes.node import audit as nodeaudit
from dpwatch.probes.node.probe import NodeProbe
from dpwatch.probes.softirq.probe import NO_DEVICE, OVERFLOW_DEVICE, SoftirqProbe
from fakes import (FakeFeatures, FakeLruHash, FakeManager, FakeModule, FakePerCpuArray, FakeHash,
                   Struct)

GOLDEN = Path(__file__).parent / "fixtures" / "metrics" / "golden.txt"
UPDATE_ENV = "DPWATCH_UPDATE_GOLDEN"
README = Path(__file__).resolve().parents[2] / "README.md"
KERNEL = "6.1.0-golden"
VERSION = "0.0.0-golden"
# Families whose values change from run to run: their samples read 0.0 in the golden file.
VOLATILE = ("dpwatch_scrape_collect_seconds", "dpwatch_bpf_compile_seconds",
            "dpwatch_probe_collect_duration_seconds")
# Families that are empty in an ordinary scrape (nothing overflowed the series cap).
EMPTY_OK = {"dpwatch_series_overflow"}
NETNS = 4026531840  # the daemon's own netns inode (the host's, as on a node)


def config() -> Config:
    cfg = Config()
    cfg.bpf_stats = True  # the per-program families too
    return cfg


# -- one reading per probe ----------------------------------------------------------------------

DROP_REASONS = {0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET",
                5: "TCP_CSUM", 8: "NETFILTER_DROP", 9: "OTHERHOST", 13: "SOCKET_RCVBUFF",
                14: "TCP_LISTEN_OVERFLOW", 15: "CPU_BACKLOG"}


def drops_reading(probe: DropsProbe) -> dict:
    """Through DropsProbe.collect over fake maps laid out as bpf/drops.c's: a per-CPU array
    indexed protocol class * max_reason + reason, a per-CPU hash for reasons above the dense
    range, an LRU of (location, reason)."""
    probe.names, probe.max_reason = dict(DROP_REASONS), 16
    dense = {0 * 16 + 3: [700, 520], 1 * 16 + 3: [40, 2], 0 * 16 + 8: [36, 0], 0 * 16 + 13: [2999, 0],
             0 * 16 + 14: [0, 12], 2 * 16 + 9: [5, 5], 3 * 16 + 2: [1, 0], 0 * 16 + 15: [80, 3],
             0 * 16 + 1: [90000, 81000], 1 * 16 + 5: [7, 0]}
    probe.module = FakeModule(
        drops_counts=FakePerCpuArray(4 * 16, dense, ncpus=2),
        drops_other=FakeHash({Struct(reason=(2 << 16) | 3, pclass=0): [4, 0],
                              Struct(reason=300, pclass=1): [0, 1]}, per_cpu=True, ncpus=2),
        drops_locs=FakeLruHash({Struct(location=0xffffffff81b0c2a7, reason=13): 2999,
                                Struct(location=0xffffffff81a1f3c0, reason=3): 1262}, max_entries=1024))
    return probe.collect()


def conntrack_reading() -> dict:
    stats = {"drop": 36, "early_drop": 4, "insert_failed": 17, "invalid": 250, "search_restart": 9,
             "found": 0, "insert": 0}
    return {"counters": {"stats": {(NETNS, f): v for f, v in stats.items()},
                         "events": {("table_full",): 36, ("early_drop",): 4}},
            "gauges": {"entries": {NETNS: 65000}, "max": {NETNS: 65536}, "buckets": {NETNS: 16384}},
            "info": {"sources": {NETNS: "netlink"}}}


def frag_reading() -> dict:
    snmp = {("frag_creates", "ipv4"): 1200, ("frag_creates", "ipv6"): 8, ("frag_fails", "ipv4"): 3,
            ("frag_fails", "ipv6"): 0, ("reasm_reqds", "ipv4"): 640, ("reasm_reqds", "ipv6"): 2,
            ("reasm_fails", "ipv4"): 11, ("reasm_fails", "ipv6"): 0, ("reasm_timeout", "ipv4"): 5,
            ("reasm_timeout", "ipv6"): 0, ("dest_unreach_in", "ipv4"): 21,
            ("dest_unreach_in", "ipv6"): 1, ("dest_unreach_out", "ipv4"): 1262,
            ("dest_unreach_out", "ipv6"): 40}
    return {"counters": {"snmp": snmp, "drop_reasons": {}},
            "gauges": {"frag_memory": {("ipv4",): 21736}}, "info": {}}


def mtu_reading() -> dict:
    mtus = {("lo", "loopback"): 65536, ("eth0", "device"): 9001, ("cni0", "bridge"): 1500,
            ("flannel.1", "vxlan"): 8951, ("veth1a2b3c4d", "veth"): 1500}
    return {"counters": {"frag_needed": {("ipv4", "sent"): 14, ("ipv4", "received"): 3,
                                         ("ipv6", "sent"): 2, ("ipv6", "received"): 0}},
            "gauges": {"interface_mtu": mtus, "mismatches": {(): 2}},
            "info": {"issues": [], "pmtu": [], "own_links": []}}


def softirq_reading() -> dict:
    ns = {(0, "TIMER"): 120_000_000, (0, "NET_RX"): 2_400_000_000, (1, "NET_RX"): 300_000_000,
          (0, "NET_TX"): 5_000_000, (1, "RCU"): 80_000_000}
    latency = {("NET_RX", 9): 4000, ("NET_RX", 14): 300, ("NET_RX", 22): 2, ("TIMER", 12): 900,
               ("NET_TX", 31): 1}  # slot 31: above the last finite bucket, only in +Inf
    softnet = {(cpu, f): v for cpu, row in ((0, (9_000_000, 3000, 410)), (1, (1_200_000, 0, 2)))
               for f, v in zip(("processed", "dropped", "time_squeeze"), row)}
    ticks = {(0, "user"): 50_000, (0, "steal"): 1234, (1, "user"): 40_000, (1, "steal"): 0}
    return {"counters": {"softnet": softnet, "cpu_ticks": ticks, "softirq_ns": ns,
                         "softirq_entries": {k: 1000 for k in ns}, "latency": latency,
                         "net_latency": {}, "latency_sum_ns": {("NET_RX",): 9_100_000,
                                                               ("TIMER",): 3_600_000,
                                                               ("NET_TX",): 2_200_000_000},
                         "napi_exhausted": {("eth0",): 410, (NO_DEVICE,): 12, (OVERFLOW_DEVICE,): 1}},
            "gauges": {}}


def dns_reading() -> dict:
    hist = {("NOERROR", 1): 150, ("NOERROR", 4): 40, ("NOERROR", 13): 2, ("NOERROR", 16): 1,
            ("NXDOMAIN", 2): 30, ("SERVFAIL", 11): 2}
    return {"counters": {
        "queries": {"A": 120, "AAAA": 118, "SRV": 3, "PTR": 2},
        "responses": {"NOERROR": 193, "NXDOMAIN": 30, "SERVFAIL": 2},
        "hist": hist,
        "latency_sum": {"NOERROR": 0.4375, "NXDOMAIN": 0.03, "SERVFAIL": 2.5},
        "stats": {"unmatched": 4, "malformed": 1},
        "timeouts": {"10.96.0.10": 3},
        "server_queries": {"10.96.0.10": 240, "other": 3},
        "server_responses": {("10.96.0.10", "NOERROR"): 190, ("10.96.0.10", "NXDOMAIN"): 30,
                             ("10.96.0.10", "SERVFAIL"): 2, ("other", "NOERROR"): 3},
        "server_latency": {"10.96.0.10": 2.9, "other": 0.01},
    }, "gauges": {}}


def node_reading() -> dict:
    facts = nodeaudit.Facts(
        cpus=4, tcp_states={"ESTABLISHED": 310, "LISTEN": 12, "TIME_WAIT": 4100, "SYN_RECV": 1},
        netfilter={"nft_rules": 212, "iptables_legacy_rules": 37, "ip6tables_legacy_rules": 0})
    return {"counters": {"limits": {("listen_overflows",): 12}, "listener_drops": {}},
            "gauges": {"conntrack_peak": {(): 65000}, "listeners": {("listening",): 12, ("full",): 1}},
            "info": {"facts": facts}}


def golden_manager(cfg: Config) -> FakeManager:
    probes = {cls.name: cls(cfg) for cls in (DropsProbe, ConntrackProbe, FragProbe, MtuProbe,
                                              SoftirqProbe, DnsProbe, NodeProbe)}
    probes["softirq"].clk_tck = 100
    readings = {"drops": drops_reading(probes["drops"]), "conntrack": conntrack_reading(),
                "frag": frag_reading(), "mtu": mtu_reading(), "softirq": softirq_reading(),
                "dns": dns_reading(), "node": node_reading()}
    modes = {"drops": "tracepoint", "conntrack": "kprobe", "frag": "snmp", "mtu": "kprobe",
             "softirq": "raw_tracepoint", "dns": "tcx", "node": "audit"}
    return FakeManager(
        probes, lambda: {k: dict(v, counters={g: dict(c) for g, c in v["counters"].items()})
                         for k, v in readings.items()},
        config=cfg, modes=modes, compile_seconds=1.25,
        seconds={n: 0.002 for n in probes},
        counters={"map_update_errors": {("drops", "drops_other"): 0, ("drops", "drops_locs"): 2,
                                        ("dns", "dns_pending"): 5}},
        program_stats=[("drops", "tracepoint__skb__kfree_skb", 1_500_000_000, 4_000_000),
                       ("dns", "dns_tc", 250_000_000, 900_000)])


# -- the exposition -----------------------------------------------------------------------------

def scrape(manager: FakeManager) -> str:
    text = generate_latest(make_registry(manager, FakeFeatures(KERNEL))).decode()
    return normalise(text)


def normalise(text: str) -> str:
    out, family = [], None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            family = line.split()[2]
        if family and family.startswith("process_"):
            continue  # the daemon's own CPU, memory and fds
        if line.startswith("dpwatch_build_info{"):
            line = re.sub(r'version="[^"]*"', f'version="{VERSION}"', line)
        if not line.startswith("#") and family in VOLATILE:
            line = line.rsplit(" ", 1)[0] + " 0.0"
        out.append(line)
    return "\n".join(out) + "\n"


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; deploy/setup.sh --test)")
    res = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_metrics_match_the_golden_file():
    text = scrape(golden_manager(config()))
    if os.environ.get(UPDATE_ENV):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.is_file(), f"no golden file: run with {UPDATE_ENV}=1 to write {GOLDEN}"
    want = GOLDEN.read_text()
    if text != want:
        import difflib
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            "golden.txt", "now", n=1))
        pytest.fail("/metrics differs from the golden file (a metric name, label or help changed?)."
                    f" If meant, regenerate with {UPDATE_ENV}=1 and review:\n{diff}")


def test_golden_file_passes_promtool():
    promtool_check(GOLDEN.read_text())


def test_every_family_has_series_and_is_in_the_readme():
    """The readings reach every family (an empty one would hide a renamed label), and the
    README's metrics table names each one."""
    fams = list(text_string_to_metric_families(GOLDEN.read_text()))
    empty = sorted(f.name for f in fams if not f.samples and f.name not in EMPTY_OK)
    assert not empty, f"families with no series in the golden readings: {empty}"
    readme = README.read_text()
    table = readme[readme.index("### Metrics"):]
    missing = sorted(f.name for f in fams if f"`{f.name}" not in table)
    assert not missing, f"metrics missing from README.md's metrics table: {missing}"


def test_collect_success_and_duration_per_probe():
    """A probe whose collect fails reads 0 in dpwatch_probe_collect_success and exports no
    metrics of its own; the others keep theirs."""
    cfg = config()
    manager = golden_manager(cfg)
    manager.failed = {"dns"}
    manager.collect_errors = {"dns": 1}
    text = scrape(manager)
    assert 'dpwatch_probe_collect_success{probe="dns"} 0.0' in text
    assert 'dpwatch_probe_collect_success{probe="drops"} 1.0' in text
    assert 'dpwatch_probe_collect_duration_seconds{probe="dns"}' in text
    assert 'dpwatch_collect_errors_total{probe="dns"} 1.0' in text
    assert "dpwatch_dns_queries_total" not in text and "dpwatch_skb_drops_total" in text
    promtool_check(text)


def test_manager_collect_reports_success_and_seconds():
    """daemon/manager.py's collect() is where the two gauges come from."""
    from dpwatch.daemon.manager import ProbeManager, ProbeStatus

    class Broken(DropsProbe):
        name = "broken"

        def collect(self, inputs=None):
            raise OSError("map read failed")

    cfg = config()
    mgr = ProbeManager(cfg, FakeFeatures(), probe_classes=(DropsProbe, Broken))
    drops_reading(mgr.probes["drops"])  # its fake maps
    for name in mgr.probes:
        mgr.status[name] = ProbeStatus(name=name, state=State.ATTACHED, mode="tracepoint")
    gauges = mgr.collect()["_manager"]["gauges"]
    assert gauges["collect_success"] == {("drops",): 1, ("broken",): 0}
    assert set(gauges["collect_seconds"]) == {("drops",), ("broken",)}
    assert all(0 <= s < 5 for s in gauges["collect_seconds"].values())
