"""Kernel tier: the probe manager's isolation. A probe that cannot compile, a probe whose
hook the kernel lacks, and a probe whose attach fails are each reported with a reason, and
the drops probe keeps counting real traffic. The misbehaving probes are test-only classes
(real BPF compiles and attaches; only their faults are made up)."""

from __future__ import annotations

import socket
import time

import pytest

from dpwatch.daemon import features as features_mod
from dpwatch.daemon.host import tracefs
from dpwatch.daemon.config import Config
from dpwatch.daemon.manager import ProbeManager
from dpwatch.probes.base import Hook, Mode, Probe, State
from dpwatch.probes.drops.probe import DropsProbe
from netlab import closed_udp_port, udp_send


class BrokenCompileProbe(Probe):
    name = "broken"
    bpf_source = "broken.c"
    modes = (Mode("tracepoint", (Hook("tracepoint", "sched:sched_process_exit"),)),)

    def source_text(self) -> str:
        return "int broken_probe_fn(void) { return this_is_not_declared; }\n"


class MissingHookProbe(Probe):
    name = "missinghook"
    bpf_source = "missing.c"
    modes = (Mode("tracepoint", (Hook("tracepoint", "dpwatch_nosuch:event"),)),)


class AttachFailProbe(Probe):
    name = "attachfail"
    bpf_source = "attachfail.c"
    modes = (Mode("tracepoint", (Hook("tracepoint", "sched:sched_process_exit"),)),)

    def source_text(self) -> str:
        return ("TRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }\n")

    def attach(self, module) -> None:
        super().attach(module)  # really attaches, then fails after: it must be detached
        raise RuntimeError("injected attach failure")


def make_manager(classes):
    tracefs.ensure_mounted()
    cfg = Config()
    cfg.probes = [c.name for c in classes]
    mgr = ProbeManager(cfg, features_mod.detect(), probe_classes=tuple(classes))
    mgr.plan()
    mgr.load()
    return mgr


@pytest.mark.host_only  # five compiles of manager logic; the guest runs the real-daemon degrade test (CI time)
def test_faulty_probes_degrade_and_drops_keeps_counting(lab):
    mgr = make_manager([DropsProbe, BrokenCompileProbe, MissingHookProbe, AttachFailProbe])
    try:
        st = mgr.status
        assert st["drops"].state == State.ATTACHED
        assert st["broken"].state == State.FAILED
        assert "this_is_not_declared" in st["broken"].reason
        assert st["missinghook"].state == State.UNSUPPORTED
        assert "tracepoint:dpwatch_nosuch:event" in st["missinghook"].reason
        assert st["attachfail"].state == State.FAILED
        assert "injected attach failure" in st["attachfail"].reason
        # One combined compile failed, each bpf probe alone (3), then the good ones together.
        assert mgr.compiles == 5
        assert {s.name for s in mgr.failures()} == {"broken", "missinghook", "attachfail"}
        assert mgr.failures(required_only=True) == []
        assert set(mgr.active()) == {"drops"}

        port = closed_udp_port(lab.node, socket.AF_INET6)
        before = mgr.collect()["drops"]["counters"]["drops"].get(("NO_SOCKET", "ipv6"), 0)
        udp_send(lab.pod.ns, lab.pod.node_ip6, port, 50, family=socket.AF_INET6)
        time.sleep(0.2)
        after = mgr.collect()["drops"]["counters"]["drops"].get(("NO_SOCKET", "ipv6"), 0)
        assert after - before == 50
    finally:
        mgr.close()


def test_compile_once_when_all_good():
    mgr = make_manager([DropsProbe])
    try:
        assert mgr.compiles == 1
        assert mgr.status["drops"].state == State.ATTACHED
    finally:
        mgr.close()
