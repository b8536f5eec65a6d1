"""Malformed /proc, tracefs, BTF and netlink content: each parser either returns well-typed
values or raises its declared error (a ValueError), never anything else, never hangs; and a
probe whose input is malformed loses that reading only: the manager counts it
(dpwatch_collect_errors_total, dpwatch_events_lost_total{stage="collect"}), every other probe
keeps collecting, and the probe recovers when its input is good again.

Fixtures are realistic samples of each file (trimmed) plus Hypothesis mutations of them and
random text/bytes. Netlink messages are real pyroute2 messages encoded to bytes, mutated, and
decoded again before the MTU audit reads them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpwatch.daemon.host import btf
from dpwatch.daemon.host import paths
from dpwatch.daemon.host import snmp
from dpwatch.daemon.host import tracefs
from dpwatch.daemon.collector import DpwatchCollector
from dpwatch.daemon.config import Config
from dpwatch.daemon.manager import ProbeManager
from dpwatch.probes.conntrack import probe as conntrack
from dpwatch.probes.frag import probe as frag
from dpwatch.probes.base import Mode, Probe, State
from fakes import FakeFeatures

FUZZED = {"inputs": 0}  # how many inputs the Hypothesis tests below fed in (printed at the end)
SETTINGS = settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck), database=None)

SNMP = """Ip: Forwarding DefaultTTL InReceives InHdrErrors FragOKs FragFails FragCreates ReasmReqds ReasmOKs ReasmFails ReasmTimeout
Ip: 1 64 1234 0 5 1 10 4 2 1 1
Icmp: InMsgs InErrors InDestUnreachs OutMsgs OutDestUnreachs
Icmp: 9 0 3 7 2
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
Udp: 100 3 0 90 2 0
"""
SNMP6 = """Ip6InReceives                   	42
Ip6FragCreates                  	6
Ip6ReasmFails                   	1
Icmp6OutDestUnreachs            	2
"""
CT_STAT = """entries  clashres found     new      invalid  ignore   delete   chainlength insert   insert_failed drop     early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000040  00000000 00000000 00000000 00000003 00000000 00000000 00000000 00000000 00000001 00000024 00000002 00000000  00000000 00000000 00000000 00000000
00000040  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000005
"""
FORMAT = """name: kfree_skb
ID: 1234
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:unsigned short protocol;	offset:24;	size:2;	signed:0;
	field:enum skb_drop_reason reason;	offset:28;	size:4;	signed:0;

print fmt: "skbaddr=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 0x4, "PKT_TOO_SMALL" })
"""


def mutations(sample: str) -> st.SearchStrategy[str]:
    """The sample with lines dropped, duplicated, truncated, or characters replaced, plus
    wholly random text."""
    lines = sample.splitlines(keepends=True)
    edits = st.lists(st.tuples(st.integers(0, max(0, len(lines) - 1)),
                               st.sampled_from(["drop", "dup", "cut", "junk", "swap"]),
                               st.text(min_size=0, max_size=12)), max_size=4)

    def apply(ops):
        out = list(lines)
        for i, op, junk in ops:
            if not out:
                break
            i %= len(out)
            if op == "drop":
                out.pop(i)
            elif op == "dup":
                out.insert(i, out[i])
            elif op == "cut":
                out[i] = out[i][: len(out[i]) // 2]
            elif op == "junk":
                pos = len(junk) % max(1, len(out[i]))
                out[i] = out[i][:pos] + junk + out[i][pos:]
            else:
                out[i] = out[i].replace("0", junk[:1] or "x", 1)
        return "".join(out)
    return st.one_of(edits.map(apply), st.text(max_size=400))


def must_degrade_cleanly(fn, *args, error=ValueError):
    """Call a parser: it returns, or it raises ``error``; anything else is a bug."""
    FUZZED["inputs"] += 1
    try:
        return fn(*args)
    except error:
        return None


def all_ints(d) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in d.values())


@SETTINGS
@given(mutations(SNMP))
def test_snmp_parser(text):
    out = must_degrade_cleanly(snmp.parse_snmp, text)
    if out is not None:
        assert all(isinstance(t, dict) and all_ints(t) for t in out.values())


@SETTINGS
@given(mutations(SNMP6))
def test_snmp6_parser(text):
    out = must_degrade_cleanly(snmp.parse_snmp6, text)
    if out is not None:
        assert all_ints(out)


@SETTINGS
@given(mutations(SNMP), mutations(SNMP6))
def test_frag_counters_from_snmp(v4text, v6text):
    v4 = must_degrade_cleanly(snmp.parse_snmp, v4text)
    v6 = must_degrade_cleanly(snmp.parse_snmp6, v6text)
    if v4 is not None and v6 is not None:
        out = frag.counters_from_snmp(v4, v6)
        assert all(isinstance(v, int) for v in out.values())


@SETTINGS
@given(mutations(CT_STAT))
def test_conntrack_proc_stat_parser(text):
    out = must_degrade_cleanly(conntrack.parse_proc_stat, text)
    if out is not None:
        assert set(out) == set(conntrack.STAT_FIELDS) and all_ints(out)


@SETTINGS
@given(mutations(FORMAT))
def test_tracefs_format_parser(text):
    fmt = must_degrade_cleanly(tracefs.parse_format, text, "skb", "kfree_skb")
    if fmt is not None:
        names = fmt.symbolic("reason")
        assert all(isinstance(k, int) and isinstance(v, str) for k, v in names.items())
        assert all(f.offset >= 0 and f.size >= 0 for f in fmt.fields.values())


def test_tracefs_fixture_is_read_exactly():
    assert tracefs.parse_format(FORMAT).symbolic("reason") == {2: "NOT_SPECIFIED", 3: "NO_SOCKET",
                                                               4: "PKT_TOO_SMALL"}


@SETTINGS
@given(st.binary(max_size=512), st.data())
def test_btf_parser(blob, data):
    # A valid 24-byte header (magic 0xeb9f, version 1) followed by junk reaches the type walk.
    if data.draw(st.booleans()):
        import struct
        body = data.draw(st.binary(max_size=256))
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body) // 2, len(body) // 2,
                          len(body) - len(body) // 2)
        blob = hdr + body
    out = must_degrade_cleanly(btf.parse_enum, blob, "skb_drop_reason", error=btf.BTFError)
    if out is not None:
        assert all(isinstance(k, int) and isinstance(v, str) for k, v in out.items())


# ---- netlink: real pyroute2 messages, mutated on the wire ---------------------------------------

def _link_bytes() -> bytes:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    m = ifinfmsg()
    m["index"], m["flags"], m["ifi_type"] = 3, 1, 1
    m["attrs"] = [("IFLA_IFNAME", "vxlan42"), ("IFLA_MTU", 1450), ("IFLA_LINK", 7),
                  ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "vxlan"),
                                               ("IFLA_INFO_DATA", {"attrs": [("IFLA_VXLAN_LINK", 2),
                                                                             ("IFLA_VXLAN_LOCAL", "10.0.0.1")]})]})]
    m.encode()
    return bytes(m.data)


def _route_bytes() -> bytes:
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    m = rtmsg()
    m["family"], m["dst_len"], m["table"], m["type"] = 2, 24, 254, 1
    m["attrs"] = [("RTA_DST", "198.18.0.0"), ("RTA_OIF", 3), ("RTA_TABLE", 254),
                  ("RTA_METRICS", {"attrs": [("RTAX_MTU", 1400)]})]
    m.encode()
    return bytes(m.data)


def byte_mutations(sample: bytes) -> st.SearchStrategy[bytes]:
    flips = st.lists(st.tuples(st.integers(0, len(sample) - 1), st.integers(0, 255)), max_size=6)

    def apply(args):
        cut, edits = args
        b = bytearray(sample)
        for i, v in edits:
            b[i] = v
        return bytes(b[:cut])
    return st.tuples(st.integers(0, len(sample)), flips).map(apply)


def decode(cls, raw: bytes):
    msg = cls(raw)
    msg.decode()
    return msg


def test_netlink_fixtures_are_read_exactly():
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    from dpwatch.probes.mtu import netlink as mtuaudit
    link = mtuaudit._link_record(decode(ifinfmsg, _link_bytes()))
    assert (link["name"], link["kind"], link["mtu"], link["lower"]) == ("vxlan42", "vxlan", 1450, 2)
    route = mtuaudit._route_record(decode(rtmsg, _route_bytes()))
    assert (route["dst"], route["dst_len"], route["oif"], route["mtu"]) == ("198.18.0.0", 24, 3, 1400)


@SETTINGS
@given(byte_mutations(_link_bytes()))
def test_mtu_audit_link_records_from_mutated_netlink(raw):
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from dpwatch.probes.mtu import netlink as mtuaudit
    FUZZED["inputs"] += 1
    try:  # pyroute2 decodes what the kernel sent; the audit reads the result
        rec = mtuaudit._link_record(decode(ifinfmsg, raw))
    except Exception:  # noqa: BLE001  the audit runs on the sampler thread, which logs and goes on
        return
    assert isinstance(rec["index"], int) and isinstance(rec["mtu"], int), (raw, rec)
    assert isinstance(rec["name"], str) and isinstance(rec["kind"], str), (raw, rec)
    assert all(rec[k] is None or type(rec[k]) is int for k in ("master", "link", "link_netnsid", "lower")), rec


@SETTINGS
@given(byte_mutations(_route_bytes()))
def test_mtu_audit_route_records_from_mutated_netlink(raw):
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    from dpwatch.probes.mtu import netlink as mtuaudit
    FUZZED["inputs"] += 1
    try:
        rec = mtuaudit._route_record(decode(rtmsg, raw))
    except Exception:  # noqa: BLE001
        return
    if rec is not None:
        assert isinstance(rec["dst_len"], int) and rec["family"] in (2, 10)
        assert rec["dst"] is None or isinstance(rec["dst"], str), rec
        assert all(rec[k] is None or type(rec[k]) is int for k in ("oif", "mtu", "expires")), (raw, rec)


# ---- a probe with malformed input loses that reading only ----------------------------------------

class _SteadyProbe(Probe):
    """A user-space probe that always reads fine: the one that must keep going."""
    name = "steady"
    modes = (Mode("constant", (), bpf=False),)

    def attach(self, module):
        self.module, self._attached, self.n = module, [], 0

    def collect(self, inputs=None):
        self.n += 1
        return {"counters": {"ticks": {("t",): self.n}}, "gauges": {}}


def test_malformed_proc_degrades_one_probe_and_it_recovers(tmp_path):
    # A copy of the fixture /proc: SnmpFiles holds <root>/thread-self/net/snmp open and rereads
    # it, so rewriting the file in place feeds the probe bad text, then good text again.
    root = tmp_path / "proc"
    shutil.copytree(Path(__file__).parent / "fixtures" / "proc", root, symlinks=True)
    snmp_file = root / "4242" / "net" / "snmp"
    good_text = snmp_file.read_text()
    with paths.roots(proc_root=str(root)):
        _degrade_and_recover(snmp_file, good_text)


def _degrade_and_recover(snmp_file: Path, good_text: str) -> None:
    cfg = Config()
    cfg.probes = ["frag", "steady"]
    features = FakeFeatures(kernel_release="test", bcc=False)
    mgr = ProbeManager(cfg, features, probe_classes=(frag.FragProbe, _SteadyProbe))
    mgr.plan()
    mgr.load()
    try:
        assert mgr.status["frag"].state == State.ATTACHED and mgr.status["steady"].state == State.ATTACHED
        good = mgr.collect()
        assert good["frag"]["counters"]["snmp"][("frag_creates", "ipv4")] == 10
        for bad in ("Ip: Forwarding DefaultTTL\nIp: 1\n", "Ip: a b\nIp: x y\n", "\x00\xff garbage"):
            snmp_file.write_text(bad)
            r = mgr.collect()
            assert "frag" not in r and r["steady"]["counters"]["ticks"]
        assert mgr.collect_errors["frag"] == 3
        r = mgr.collect()
        assert r["_manager"]["counters"]["events_lost"][("frag", "collect")] == 4
        # Scrapes go on: the collector exports the errors and the rest.
        fams = {f.name: f for f in DpwatchCollector(mgr, features).collect()}
        assert [s.value for s in fams["dpwatch_collect_errors"].samples if s.labels["probe"] == "frag"] == [5]
        assert "dpwatch_ip_fragments_created" not in fams  # no frag reading, no invented values
        snmp_file.write_text(good_text)  # good again: the probe's readings come back
        assert mgr.collect()["frag"]["counters"]["snmp"][("frag_creates", "ipv4")] == 10
        assert mgr.status["frag"].state == State.ATTACHED
    finally:
        mgr.close()


def test_zz_report_how_many_inputs_were_fuzzed(capsys):
    with capsys.disabled():
        print(f"\nfuzzed inputs (parsers + netlink): {FUZZED['inputs']}")
    assert FUZZED["inputs"] == 0 or FUZZED["inputs"] >= 300
