"""probes/base.py: the one table of hook kinds, and what a probe declares to the manager."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from dpwatch.daemon.config import Config
from dpwatch.daemon.manager import ProbeManager
from dpwatch.probes.base import HOOK_KINDS, Hook, Mode, Probe, State, hook_available
from dpwatch.probes.registry import PROBES

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from fakes import FakeFeatures  # noqa: E402


def test_an_unknown_hook_kind_is_an_error_not_a_present_hook():
    with pytest.raises(ValueError, match="unknown hook kind 'tracpoint'"):
        Hook("tracpoint", "skb:kfree_skb")


def test_every_registered_hook_has_a_kind_from_the_table():
    kinds = {h.kind for p in PROBES for m in p.modes for h in m.hooks}
    assert kinds <= set(HOOK_KINDS) and {"tracepoint", "kprobe", "procfs", "probe"} <= kinds


def test_availability_and_program_names_come_from_the_table():
    f = SimpleNamespace(has_tracepoint=lambda t: t == "skb:kfree_skb", raw_tracepoints=True,
                        kprobes=False, kprobe_target=lambda t: True, fentry=False,
                        headers_exact=False, kfree_skb_reason=True)
    assert hook_available(Hook("tracepoint", "skb:kfree_skb"), f)
    assert not hook_available(Hook("tracepoint", "skb:consume_skb"), f)
    assert not hook_available(Hook("raw_tracepoint", "irq:softirq_entry"), f)
    assert not hook_available(Hook("kprobe", "__nf_conntrack_alloc"), f)  # no kprobes here
    assert hook_available(Hook("tracepoint_field", "skb:kfree_skb:reason"), f)
    assert HOOK_KINDS["tracepoint"].program(Hook("tracepoint", "skb:kfree_skb")) == "tracepoint__skb__kfree_skb"
    assert HOOK_KINDS["kretprobe"].program(Hook("kretprobe", "early_drop")) == "kretprobe__early_drop"
    assert HOOK_KINDS["raw_tracepoint"].program(Hook("raw_tracepoint", "irq:softirq_raise")) == \
        "raw_tracepoint__softirq_raise"
    assert HOOK_KINDS["socket_filter"].attach is None  # the probe attaches its own


class _Source(Probe):
    name = "source"
    modes = (Mode("user", (Hook("netlink", "x"),), bpf=False),)

    def collect(self, inputs=None):
        return {"counters": {"n": {(): 7}}, "gauges": {}}


class _Reader(Probe):
    """Reads the source's reading when it runs; its best mode cannot work without it."""
    name = "reader"
    needs = ("source",)
    modes = (Mode("with-source", (Hook("probe", "source"),), bpf=False),
             Mode("alone", (Hook("netlink", "y"),), bpf=False))
    seen = None

    def collect(self, inputs=None):
        type(self).seen = dict(inputs or {})
        return {"counters": {}, "gauges": {}}


def manager(classes, enabled):
    cfg = Config(probes=enabled, require=[])
    mgr = ProbeManager(cfg, FakeFeatures(), probe_classes=tuple(classes))
    mgr.plan()
    mgr.load()
    return mgr


def test_needs_decide_the_order_and_hand_over_readings():
    # The reader comes first in the list; the manager still collects the source first.
    mgr = manager([_Reader, _Source], ["reader", "source"])
    assert mgr.order() == ["source", "reader"]
    assert mgr.status["reader"].mode == "with-source"
    mgr.collect()
    assert _Reader.seen == {"source": {"counters": {"n": {(): 7}}, "gauges": {}}}
    gauges = mgr.collect()["_manager"]["gauges"]
    assert gauges["collect_success"] == {("source",): 1, ("reader",): 1}
    mgr.close()


def test_a_mode_that_needs_a_probe_that_is_down_falls_back():
    mgr = manager([_Reader, _Source], ["reader"])  # source disabled
    st = mgr.status["reader"]
    assert st.state == State.DEGRADED and st.mode == "alone", st.reason
    assert "needs the readings of the source probe, which is not running" in st.reason
    mgr.collect()
    assert _Reader.seen == {}
    mgr.close()
