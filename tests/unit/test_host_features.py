"""Kernel feature detection (daemon/features.py) on the fixture tree tests/unit/fixtures/sys.

The tree has tracefs at kernel/tracing with a few events (skb:kfree_skb with a reason field,
the irq softirq events, net:netif_receive_skb), a kprobe PMU, available_filter_functions, and
a small kernel/btf/vmlinux without udp_rcv, so the fentry check stops before it loads anything.
"""

from __future__ import annotations

from pathlib import Path

from dpwatch.daemon import features
from dpwatch.daemon.host import paths

SYS = str(Path(__file__).parent / "fixtures" / "sys")


def test_detect_reads_the_sys_root():
    with paths.roots(sys_root=SYS):
        f = features.detect()
        assert f.kprobe_target("tcp_v4_rcv") and f.kprobe_target("nf_conntrack_in")  # "[module]" cut
        assert not f.kprobe_target("no_such_function")
    assert f.tracefs == f"{SYS}/kernel/tracing"
    assert f.tracepoints == {"skb:kfree_skb", "irq:softirq_entry", "irq:softirq_exit", "irq:softirq_raise",
                             "net:netif_receive_skb"}
    assert f.has_tracepoint("skb:kfree_skb") and f.kfree_skb_reason and f.raw_tracepoints
    assert (f.kprobes, f.kprobes_reason) == (True, "kprobe PMU present")
    assert f.btf and (f.fentry, f.fentry_reason) == (False, "udp_rcv not in BTF")
    assert f.summary()["tracepoints"] == 5


def test_detect_on_a_bare_sys_root(tmp_path):
    with paths.roots(sys_root=str(tmp_path)):
        f = features.detect()
        assert f.kprobe_target("tcp_v4_rcv") is False  # no tracefs: answers "kprobes", which is off
    assert f.tracefs is None and f.tracepoints == frozenset() and not f.raw_tracepoints
    assert not f.kprobes and "no kprobe PMU" in f.kprobes_reason
    assert not f.btf and (f.fentry, f.fentry_reason) == (False, "no kernel BTF")
    assert not f.kfree_skb_reason


def test_kprobe_events_in_tracefs_stand_for_a_missing_pmu(tmp_path):
    tracing = tmp_path / "kernel" / "tracing"
    (tracing / "events").mkdir(parents=True)
    (tracing / "kprobe_events").write_text("")
    with paths.roots(sys_root=str(tmp_path)):
        f = features.detect()
    assert (f.kprobes, f.kprobes_reason) == (True, "kprobe_events present in tracefs")
