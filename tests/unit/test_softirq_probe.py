"""The softirq probe class: metrics over readings built by hand, the mode choice, cflags, the
flags, reading the BPF maps (BCC tables faked in the layout of bpf/softirq.c's values), and
collect() carrying the node facts the findings use. No root, no BPF."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dpwatch.daemon import cli
from dpwatch.daemon.config import Config, ConfigError
from dpwatch.daemon.host import paths
from dpwatch.probes.base import Window
from dpwatch.probes.softirq import probe as sq
from dpwatch.probes.softirq.facts import NodeFacts
from dpwatch.probes.softirq.histogram import HIST_SLOTS
from dpwatch.probes.softirq.probe import SoftirqProbe
from fakes import FakeFeatures, FakeHash, FakeModule, FakePerCpuArray, Struct
from test_softirq_findings import busy_pair, cfg, quiet_pair, reading
from test_softirq_procfs import VECTORS


def test_probe_needs_a_baseline():
    old, new = quiet_pair()
    p = SoftirqProbe(cfg())
    assert p.diagnose(Window(0.0, None, new)) == []
    assert p.diagnose(Window(0.5, old, new)) == []


def test_diagnose_judges_with_the_facts_of_the_reading():
    """The findings take the node facts collect() put in the fresh reading; they read nothing."""
    old, new = busy_pair()
    new["info"] = {"node": NodeFacts(cpus=2, sysctls={"net.core.netdev_max_backlog": 4096},
                                     ksoftirqd={0: 77}, node="worker-9")}
    p = SoftirqProbe(cfg())
    p.clk_tck = 100
    found = {f.id: f for f in p.diagnose(Window(10.0, old, new))}
    assert found["softnet.backlog_drops"].evidence["net.core.netdev_max_backlog"] == 4096
    assert found["softirq.latency_high"].remediation[1].startswith("chrt -f -p 1 77 ")
    assert found["cpu.steal"].remediation[0].startswith("kubectl drain worker-9 ")


def test_collect_reads_the_node_facts(tmp_path, monkeypatch):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "sys/net/core").mkdir(parents=True)
    (proc / "sys/net/core/netdev_max_backlog").write_text("1000\n")
    (proc / "net").mkdir()
    (proc / "net/route").write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                                    "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\n")
    (proc / "7").mkdir()
    (proc / "7/comm").write_text("ksoftirqd/1\n")
    for q in ("rx-0", "rx-1", "tx-0"):
        (sys_ / "class/net/eth0/queues" / q).mkdir(parents=True)
    monkeypatch.setenv("NODE_NAME", "worker-4")
    with paths.roots(proc_root=str(proc), sys_root=str(sys_)):
        facts = SoftirqProbe(cfg()).collect()["info"]["node"]
    assert facts.sysctls == {"net.core.netdev_max_backlog": 1000, "net.core.netdev_budget": None,
                             "net.core.netdev_budget_usecs": None}
    assert (facts.default_device, facts.rx_queues, facts.ksoftirqd, facts.node) == (
        "eth0", {"eth0": 2}, {1: 7}, "worker-4")


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_exact():
    p = SoftirqProbe(cfg())
    p.clk_tck = 100
    r = reading(ns={(0, "NET_RX"): 1_500_000_000}, softnet={(1, "dropped"): 7},
                ticks={(0, "steal"): 250, (0, "softirq"): 3},
                latency={("NET_RX", 1): 2, ("NET_RX", 9): 3, ("NET_RX", 31): 1},
                napi={("eth0",): 4, (sq.OVERFLOW_DEVICE,): 2})
    r["counters"]["latency_sum_ns"] = {("NET_RX",): 2_000_000_000}

    class C:
        def collect(self, inputs=None):
            return p.metrics(r)
    reg = CollectorRegistry()
    reg.register(C())
    text = generate_latest(reg).decode()
    assert 'dpwatch_softirq_seconds_total{cpu="0",vector="NET_RX"} 1.5' in text
    assert 'dpwatch_softirq_raise_latency_seconds_bucket{le="2.56e-07",vector="NET_RX"} 2.0' in text
    assert 'dpwatch_softirq_raise_latency_seconds_bucket{le="5.12e-07",vector="NET_RX"} 5.0' in text
    assert 'dpwatch_softirq_raise_latency_seconds_bucket{le="1.073741824",vector="NET_RX"} 5.0' in text
    assert 'dpwatch_softirq_raise_latency_seconds_bucket{le="+Inf",vector="NET_RX"} 6.0' in text
    assert 'dpwatch_softirq_raise_latency_seconds_count{vector="NET_RX"} 6.0' in text
    assert 'dpwatch_softirq_raise_latency_seconds_sum{vector="NET_RX"} 2.0' in text
    assert 'dpwatch_napi_budget_exhausted_total{device="(overflow)"} 2.0' in text
    assert 'dpwatch_softnet_dropped_total{cpu="1"} 7.0' in text
    assert 'dpwatch_cpu_steal_seconds_total{cpu="0"} 2.5' in text
    assert "softirq_ticks" not in text


def test_metrics_in_procfs_mode_have_no_bpf_families():
    p = SoftirqProbe(cfg())
    names = [f.name for f in p.metrics(reading(softnet={(0, "processed"): 1}, bpf=False))]
    assert names == ["dpwatch_softnet_processed", "dpwatch_softnet_dropped", "dpwatch_softnet_time_squeeze",
                     "dpwatch_cpu_steal_seconds"]



# -- modes and flags ------------------------------------------------------------------------------

def features(tracepoints):
    return FakeFeatures(tracepoints=frozenset(tracepoints), raw_tracepoints=bool(tracepoints),
                        tracefs=None, has_tracepoint=lambda name: name in tracepoints)


ALL_TPS = {"irq:softirq_entry", "irq:softirq_exit", "irq:softirq_raise", "napi:napi_poll"}


def test_mode_choice():
    assert SoftirqProbe(cfg()).choose_mode(features(ALL_TPS))[0].name == "raw_tracepoint"
    mode, why = SoftirqProbe(cfg()).choose_mode(features({"napi:napi_poll"}))
    assert (mode.name, mode.degraded, mode.bpf) == ("procfs", True, False)
    mode, why = SoftirqProbe(cfg(softirq_hooks="tracepoint")).choose_mode(features(ALL_TPS))
    assert mode.name == "tracepoint" and why.startswith("--softirq-hooks tracepoint: ")
    mode, why = SoftirqProbe(cfg(softirq_hooks="raw_tracepoint")).choose_mode(features(set()))
    assert mode is None and "missing raw_tracepoint:irq:softirq_entry" in why
    p = SoftirqProbe(cfg(softirq_hooks="tracepoint"))
    p.mode = p.modes[1]
    assert p.fallback_modes(features(ALL_TPS)) == []     # forced: never silently another kind
    p = SoftirqProbe(cfg())
    p.mode = p.modes[0]
    assert [m.name for m in p.fallback_modes(features(ALL_TPS))] == ["procfs"]


def test_cflags_from_kernel_names(monkeypatch):
    monkeypatch.setattr(sq, "load_vector_names", lambda path=None: ({i: n for i, n in enumerate(VECTORS)}, "t"))
    p = SoftirqProbe(cfg(softirq_napi_devices=32))
    p.mode = p.modes[0]
    # SOFTIRQ_HIST_SLOTS is bpf/softirq.h's: the C side sees it there, not in a flag.
    assert p.cflags(features(ALL_TPS)) == ["-DSOFTIRQ_RAW=1", "-DSOFTIRQ_NVEC=10",
                                           "-DSOFTIRQ_NAPI_MAX=32", "-DSOFTIRQ_SAMPLE=8"]
    p.mode = p.modes[1]
    assert p.cflags(features(ALL_TPS))[0] == "-DSOFTIRQ_RAW=0"
    monkeypatch.setattr(sq, "load_vector_names", lambda path=None: ({}, "none"))
    assert p.cflags(features(ALL_TPS))[1] == "-DSOFTIRQ_NVEC=10"     # SOFTIRQ_NVEC_DEFAULT
    monkeypatch.setattr(sq, "load_vector_names", lambda path=None: ({0: "HI", 99: "X"}, "t"))
    assert p.cflags(features(ALL_TPS))[1] == "-DSOFTIRQ_NVEC=64"     # SOFTIRQ_NVEC_MAX



@pytest.mark.parametrize("field,value,message", [
    ("softirq_hooks", "kprobe", "--softirq-hooks: 'kprobe' is not auto"),
    ("softirq_saturated_percent", 0.0, "--softirq-saturated-percent: 0 is outside (0, 100]"),
    ("softirq_saturated_percent", 101.0, "--softirq-saturated-percent: 101 is outside (0, 100]"),
    ("softirq_imbalance_ratio", 1.0, "--softirq-imbalance-ratio: 1 must be > 1"),
    ("softirq_latency_threshold", 0.0, "--softirq-latency-threshold: 0s is outside 1us..10s"),
    ("softirq_squeeze_rate", 0.0, "--softirq-squeeze-rate: 0 must be > 0"),
    ("softirq_steal_percent", -1.0, "--softirq-steal-percent: -1 is outside (0, 100]"),
    ("softirq_napi_devices", 0, "--softirq-napi-devices: 0 is outside 1..65536"),
    ("softirq_sample", 12, "--softirq-sample: 12 must be a power of two within 1..1024"),
    ("softirq_sample", 2048, "--softirq-sample: 2048 must be a power of two"),
])
def test_config_rejects(field, value, message):
    with pytest.raises(ConfigError) as err:
        Config(**{field: value}).validate()
    assert str(err.value).startswith(message)


def test_flags_and_env(monkeypatch, capsys):
    args = cli.build_parser().parse_args(["check", "--softirq-hooks", "tracepoint",
                                          "--softirq-latency-threshold", "500ms"])
    c = cli.config_from_args(args)
    assert (c.softirq_hooks, c.softirq_latency_threshold) == ("tracepoint", 0.5)
    monkeypatch.setenv("DPWATCH_SOFTIRQ_STEAL_PERCENT", "12.5")
    monkeypatch.setenv("DPWATCH_SOFTIRQ_NAPI_DEVICES", "16")
    c = cli.config_from_args(cli.build_parser().parse_args(["check"]))
    assert (c.softirq_steal_percent, c.softirq_napi_devices) == (12.5, 16)
    assert cli.main(["check", "--softirq-hooks", "fentry"]) == 64
    assert cli.main(["check", "--softirq-latency-threshold", "soon"]) == 64
    assert cli.main(["check", "--softirq-imbalance-ratio", "0.5"]) == 64
    err = capsys.readouterr().err
    assert "--softirq-hooks: 'fentry' is not auto" in err
    assert "--softirq-latency-threshold: 'soon' is not a duration" in err


# -- reading the maps (BCC tables faked: the layout of bpf/softirq.c's values) -----------------

def stat(ns=0, entries=0, lat_ns=0, hist=None) -> Struct:
    """One CPU's struct softirq_stat value of softirq_vec."""
    slots = [0] * HIST_SLOTS
    for slot, n in (hist or {}).items():
        slots[slot] = n
    return Struct(ns=ns, entries=entries, raised=0, lat_ns=lat_ns, hist=slots, lat_count=sum(slots))


def test_collect_bpf_maps(tmp_path):
    p = SoftirqProbe(cfg())
    p.names, p.nvec = {0: "TIMER", 1: "NET_RX"}, 2
    p.mode = p.modes[0]
    p.module = FakeModule(  # attached: bpf_active
        softirq_vec=FakePerCpuArray(2, {
            0: [stat(ns=10, entries=1, lat_ns=5, hist={3: 1}), stat()],
            1: [stat(ns=100, entries=4, lat_ns=40, hist={9: 3, 12: 1}),
                stat(ns=7, entries=1, lat_ns=9, hist={9: 1})]}),
        softirq_napi=FakeHash({Struct(name=b"eth0"): 12, Struct(name=sq.NO_DEVICE.encode()): 3}),
        softirq_napi_over=FakePerCpuArray(1, {0: [2, 3]}))
    with paths.roots(proc_root=str(tmp_path), sys_root=str(tmp_path)):  # an empty node
        r = p.collect()
    c = r["counters"]
    assert c["softirq_ns"] == {(0, "TIMER"): 10, (0, "NET_RX"): 100, (1, "NET_RX"): 7}
    assert c["softirq_entries"] == {(0, "TIMER"): 1, (0, "NET_RX"): 4, (1, "NET_RX"): 1}
    assert c["latency"] == {("TIMER", 3): 1, ("NET_RX", 9): 4, ("NET_RX", 12): 1}
    assert c["net_latency"] == {(0, "NET_RX", 9): 3, (0, "NET_RX", 12): 1, (1, "NET_RX", 9): 1}
    assert c["latency_sum_ns"] == {("TIMER",): 5, ("NET_RX",): 49}
    assert c["napi_exhausted"] == {("eth0",): 12, (sq.NO_DEVICE,): 3, (sq.OVERFLOW_DEVICE,): 5}
    assert r["info"]["node"].rx_queues == {"eth0": 1}   # the devices NAPI named, not the backlog


