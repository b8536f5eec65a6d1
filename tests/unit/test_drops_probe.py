"""The drops probe class: the mode choice, the reason names (tracefs, then BTF) and the
cflags built from them, metrics over a reading built by hand, and collect() over the BPF maps
(tests/fakes.py tables in the layout of bpf/drops.c's) with the sysctls it reads. No BPF."""

from __future__ import annotations

import pytest

from dpwatch.daemon.config import Config
from dpwatch.daemon.host import btf
from dpwatch.daemon.host import sysctl
from dpwatch.probes.drops import probe as drops_mod
from dpwatch.probes.drops.probe import DropsProbe, load_reason_names, reason_name
from fakes import FakeFeatures, FakeHash, FakeLruHash, FakeModule, FakePerCpuArray, Struct
from test_drops_findings import LOC_A, SYSCTLS, no_sysctl_reads, probe, reading  # noqa: F401 - fixtures

# -- mode choice ------------------------------------------------------------------------------

def features(tracepoints=("skb:kfree_skb",), reason=True):
    return FakeFeatures(has_tracepoint=lambda name: name in tracepoints, kfree_skb_reason=reason,
                        raw_tracepoints=True, kprobes=True, fentry=False, tracefs=None)


def test_choose_mode():
    p = DropsProbe(Config())
    mode, why = p.choose_mode(features())
    assert (mode.name, mode.degraded, why) == ("tracepoint", False, "skb:kfree_skb with the reason field")
    mode, why = p.choose_mode(features(reason=False))
    assert (mode.name, mode.degraded) == ("tracepoint-noreason", True)
    assert why.startswith("skb:kfree_skb has no reason field")
    mode, why = p.choose_mode(features(tracepoints=(), reason=False))
    assert mode is None
    assert why == ("tracepoint: missing tracepoint:skb:kfree_skb, tracepoint_field:skb:kfree_skb:reason; "
                   "tracepoint-noreason: missing tracepoint:skb:kfree_skb")


# -- reason names -----------------------------------------------------------------------------

NAMES = {2: "NOT_SPECIFIED", 6: "SOCKET_RCVBUFF", 12: "NETFILTER_DROP", (1 << 16) | 1: "OVS_THING"}


@pytest.mark.parametrize("value, name", [
    (6, "SOCKET_RCVBUFF"),
    (12, "NETFILTER_DROP"),
    (999, "UNKNOWN_999"),
    (0, "UNKNOWN_0"),
    ((3 << 16) | 5, "SUBSYS_3_5"),
    (1 << 16, "SUBSYS_1_0"),
    ((1 << 16) | 1, "OVS_THING"),     # a named subsystem value keeps its name
    (0xFFFF, "UNKNOWN_65535"),
])
def test_reason_name(value, name):
    assert reason_name(NAMES, value) == name


def test_reason_name_without_names():
    assert reason_name({}, 6) == "UNKNOWN_6"


KFREE_SKB_FORMAT = (
    "name: kfree_skb\nID: 1\nformat:\n"
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n"
    "\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n"
    "\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n"
    "\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n"
    'print fmt: "protocol=%u location=%pS reason: %s", REC->protocol, REC->location, '
    '__print_symbolic(REC->reason, { 1, "CONSUMED" }, { 2, "NOT_SPECIFIED" }, { 6, "SOCKET_RCVBUFF" }, '
    '{ 40, "TCP_LISTEN_OVERFLOW" })\n'
)


def write_tracefs(root, text=KFREE_SKB_FORMAT):
    d = root / "events" / "skb" / "kfree_skb"
    d.mkdir(parents=True)
    (d / "format").write_text(text)
    return str(root)


def test_load_reason_names_from_tracefs(tmp_path, monkeypatch):
    monkeypatch.setattr(btf, "read_enum", lambda name: pytest.fail("BTF must not be read"))
    names, source = load_reason_names(write_tracefs(tmp_path))
    assert names == {1: "CONSUMED", 2: "NOT_SPECIFIED", 6: "SOCKET_RCVBUFF", 40: "TCP_LISTEN_OVERFLOW"}
    assert source == "tracefs:skb/kfree_skb/format"


def test_load_reason_names_from_btf(tmp_path, monkeypatch):
    monkeypatch.setattr(btf, "read_enum", lambda name: {2: "SKB_DROP_REASON_NOT_SPECIFIED",
                                                        6: "SKB_DROP_REASON_SOCKET_RCVBUFF"}
                        if name == "skb_drop_reason" else None)
    names, source = load_reason_names(str(tmp_path))  # no events/ tree here
    assert names == {2: "NOT_SPECIFIED", 6: "SOCKET_RCVBUFF"}
    assert source == "btf:enum skb_drop_reason"


def test_load_reason_names_none(tmp_path, monkeypatch):
    def broken(name):
        raise btf.BTFError("bad blob")
    monkeypatch.setattr(btf, "read_enum", broken)
    assert load_reason_names(str(tmp_path)) == ({}, "none (reasons shown as numbers)")


def test_cflags_with_reason(tmp_path, monkeypatch):
    p = DropsProbe(Config(drops_other_entries=100, drops_location_entries=0, drops_location_sample=4))
    p.mode = DropsProbe.modes[0]
    assert p.cflags(FakeFeatures(tracefs=write_tracefs(tmp_path))) == [
        "-DDROPS_HAVE_REASON=1", "-DDROPS_CONSUMED=1", "-DDROPS_MAX_REASON=41", "-DDROPS_OTHER_MAX=100",
        "-DDROPS_LOC_MAX=0", "-DDROPS_LOC_SAMPLE=4"]
    assert p.info() == {"reason_names": 4, "reason_name_source": "tracefs:skb/kfree_skb/format",
                        "dense_reasons": 41, "location_entries": 0, "location_sample": 4}


def test_cflags_caps_the_dense_array(tmp_path):
    text = KFREE_SKB_FORMAT.replace('{ 40, "TCP_LISTEN_OVERFLOW" }', '{ 0x20003, "SUBSYS_NAME" }')
    p = DropsProbe(Config())
    p.mode = DropsProbe.modes[0]
    flags = p.cflags(FakeFeatures(tracefs=write_tracefs(tmp_path, text)))
    assert "-DDROPS_MAX_REASON=1024" in flags
    assert p.max_reason == 1024


def test_cflags_without_reason():
    p = DropsProbe(Config())
    p.mode = DropsProbe.modes[1]
    assert p.cflags(FakeFeatures(tracefs=None)) == [
        "-DDROPS_MAX_REASON=1", "-DDROPS_OTHER_MAX=256", "-DDROPS_LOC_MAX=1024",
        "-DDROPS_LOC_SAMPLE=16"]
    assert p.names == {0: "UNKNOWN"}


# -- metrics ------------------------------------------------------------------------------------

def test_metrics_skip_not_drops(probe):
    r = reading({("SOCKET_RCVBUFF", "ipv4"): 5, ("CONSUMED", "ipv4"): 100,
                 ("NOT_DROPPED_YET", "ipv6"): 3, ("NO_SOCKET", "ipv6"): 2})
    (fam,) = list(probe.metrics(r))
    assert fam.name == "dpwatch_skb_drops"
    assert [(s.name, s.labels, s.value) for s in fam.samples] == [
        ("dpwatch_skb_drops_total", {"reason": "NO_SOCKET", "protocol": "ipv6"}, 2.0),
        ("dpwatch_skb_drops_total", {"reason": "SOCKET_RCVBUFF", "protocol": "ipv4"}, 5.0),
    ]


# -- collect ------------------------------------------------------------------------------------

def test_collect_reads_counts_locations_and_sysctls(monkeypatch):
    values = dict(SYSCTLS)
    monkeypatch.setattr(sysctl, "read_int", lambda key: values[key])
    p = DropsProbe(Config())
    p.names, p.max_reason = {3: "NO_SOCKET", 6: "SOCKET_RCVBUFF"}, 8
    p.module = FakeModule(
        drops_counts=FakePerCpuArray(8 * len(drops_mod.PROTOCOLS), {1 * 8 + 6: [3, 4], 3 * 8 + 3: [1, 0]}),
        drops_other=FakeHash({Struct(reason=(2 << 16) | 1, pclass=0): [2, 2]}, per_cpu=True, ncpus=2),
        drops_locs=FakeLruHash({Struct(location=LOC_A, reason=6, pad=0): 7}))
    r = p.collect()
    assert r["counters"] == {
        "drops": {("SOCKET_RCVBUFF", "ipv6"): 7, ("NO_SOCKET", "other"): 1, ("SUBSYS_2_1", "ipv4"): 4},
        "locations": {(LOC_A, "SOCKET_RCVBUFF"): 7}}
    assert r["info"] == {"sysctls": SYSCTLS}
    assert p.collect()["info"]["sysctls"] is r["info"]["sysctls"]  # unchanged: the same object
    values["net.core.rmem_max"] = 1
    assert p.collect()["info"]["sysctls"]["net.core.rmem_max"] == 1
