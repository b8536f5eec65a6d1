"""The softirq probe's procfs side: the /proc parsers of daemon/host/procnet.py against
contents recorded on a real kernel (and malformed variants), and probes/softirq/procfs.py
reading a fixture tree (paths.roots): counter wrap, bad and missing files, vector names."""

from __future__ import annotations

from dpwatch.daemon.host import paths
from dpwatch.daemon.host import procnet
from dpwatch.probes.softirq import procfs

# -- recorded contents ------------------------------------------------------------------------
# Recorded 2026-11-21 on the dev VM (kernel 6.18.44-fc, 2 vCPUs), verbatim. softnet_stat has 15
# columns there (processed, dropped, time_squeeze, 5 zeros, cpu_collision, received_rps,
# flow_limit_count, backlog length, CPU index, input and process queue lengths).
SOFTNET_618 = (
    "0054bcf3 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000\n"
    "0002199c 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000000\n"
)
STAT_618 = (
    "cpu  6241 0 3031 27363 233 0 831 13 0 0\n"
    "cpu0 2228 0 1454 14392 7 0 763 5 0 0\n"
    "cpu1 4012 0 1577 12970 226 0 68 7 0 0\n"
    "intr 1234 0 0\n"
    "ctxt 99\n"
)
SOFTIRQS_618 = (
    "                    CPU0       CPU1       \n"
    "          HI:          0          0\n"
    "       TIMER:       5713       5081\n"
    "      NET_TX:         62         62\n"
    "      NET_RX:    5553600     136092\n"
    "       BLOCK:          0      47453\n"
    "    IRQ_POLL:          0          0\n"
    "     TASKLET:          1          1\n"
    "       SCHED:      14575      11383\n"
    "     HRTIMER:          0         22\n"
    "         RCU:      14171      17007\n"
)
VECTORS = ["HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU"]


# -- parsers ----------------------------------------------------------------------------------

def test_softnet_recorded():
    p = procnet.parse_softnet_stat(SOFTNET_618)
    assert p.bad == 0
    assert p.data == {0: {"processed": 0x54BCF3, "dropped": 0, "time_squeeze": 0},
                      1: {"processed": 0x2199C, "dropped": 0, "time_squeeze": 0}}


def test_softnet_cpu_index_column_skips_offline_cpus():
    # 13 columns (the 6.1 layout): the 13th is the CPU index, so CPU 1 (offline) is absent.
    text = ("00000010 00000002 00000003 0 0 0 0 0 0 0 0 0 00000000\n"
            "00000020 00000004 00000005 0 0 0 0 0 0 0 0 0 00000002\n")
    p = procnet.parse_softnet_stat(text)
    assert p.data == {0: {"processed": 16, "dropped": 2, "time_squeeze": 3},
                      2: {"processed": 32, "dropped": 4, "time_squeeze": 5}}


def test_softnet_old_layout_uses_the_row_number():
    p = procnet.parse_softnet_stat("0000000a 00000001 00000002 0 0 0 0 0 0 0\n0000000b 0 0 0 0 0 0 0 0 0\n")
    assert p.data == {0: {"processed": 10, "dropped": 1, "time_squeeze": 2},
                      1: {"processed": 11, "dropped": 0, "time_squeeze": 0}}


def test_softnet_malformed_lines_are_counted_not_raised():
    text = ("zzzz 0 0\n"               # not hex
            "00000001 00000002\n"      # too short
            "\n"
            "00000005 00000006 00000007 0 0 0 0 0 0 0 0 0 00000001\n"
            "00000009 00000009 00000009 0 0 0 0 0 0 0 0 0 00000001\n"  # CPU 1 again
            "\x00\xff garbage\n")
    p = procnet.parse_softnet_stat(text)
    assert p.data == {1: {"processed": 5, "dropped": 6, "time_squeeze": 7}}
    assert p.bad == 4
    assert procnet.parse_softnet_stat("").data == {}


def test_proc_stat_recorded():
    p = procnet.parse_proc_stat(STAT_618)
    assert p.bad == 0
    assert p.data == {0: {"steal": 5, "softirq": 763, "total": 2228 + 1454 + 14392 + 7 + 763 + 5},
                      1: {"steal": 7, "softirq": 68, "total": 4012 + 1577 + 12970 + 226 + 68 + 7}}


def test_proc_stat_malformed():
    text = ("cpu0 1 2 3\n"                        # too few columns (no steal)
            "cpuX 1 2 3 4 5 6 7 8 9 10\n"         # not a CPU number
            "cpu1 1 2 3 4 5 6 7 -8 0 0\n"         # negative
            "cpu2 1 1 1 1 1 1 1 9 0 0\n"
            "cpu2 1 1 1 1 1 1 1 9 0 0\n"          # duplicate
            "cpu3 a b c d e f g h\n")
    p = procnet.parse_proc_stat(text)
    assert p.data == {2: {"steal": 9, "softirq": 1, "total": 16}}
    assert p.bad == 5


def test_softirqs_recorded():
    p = procnet.parse_softirqs(SOFTIRQS_618)
    assert p.bad == 0
    assert p.extra == VECTORS
    assert p.data[(0, "NET_RX")] == 5553600 and p.data[(1, "BLOCK")] == 47453
    assert len(p.data) == 20


def test_softirqs_malformed():
    text = ("  CPU0  CPU1\n"
            " NET_RX: 5 6\n"
            " NET_TX: 7\n"          # one count for two CPUs
            " TIMER 1 2\n"          # no colon
            " RCU: x y\n"           # not numbers
            " NET_RX: 1 1\n")       # duplicate name
    p = procnet.parse_softirqs(text)
    assert p.data == {(0, "NET_RX"): 5, (1, "NET_RX"): 6}
    assert p.extra == ["NET_RX"]
    assert p.bad == 4
    bad_head = procnet.parse_softirqs("  CPU0 CPUx\n NET_RX: 1 2\n")
    assert (bad_head.data, bad_head.bad) == ({}, 1)
    assert procnet.parse_softirqs("").data == {}


def test_default_route_device_and_cpu_mask():
    route = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
             "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
             "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert procnet.default_route_device(route) == "eth0"
    assert procnet.default_route_device(route.splitlines()[0]) is None
    assert procnet.cpu_mask([0, 1, 2, 3]) == "f"
    assert procnet.cpu_mask([1]) == "2"
    assert procnet.cpu_mask(range(40)) == "ff,ffffffff"
    assert procnet.cpu_mask([33]) == "2,00000000"
    assert procnet.cpu_mask([]) == "0"


# -- the probe's reader over a fixture tree -----------------------------------------------------

def write(root, rel: str, text: str | None) -> None:
    path = root / rel
    if text is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_counters_degrade_on_malformed_and_missing_files(tmp_path):
    write(tmp_path, "net/softnet_stat", "ffffffff 00000001 00000000 0 0 0 0 0 0 0 0 0 00000000\nbroken line\n")
    reader = procfs.ProcCounters()
    with paths.roots(proc_root=str(tmp_path)):
        softnet_path, stat_path = procfs.softnet_stat_path(), procfs.stat_path()
        assert reader.softnet() == {(0, "processed"): 0xFFFFFFFF, (0, "dropped"): 1, (0, "time_squeeze"): 0}
        assert reader.cpu_ticks() == {}
        assert reader.malformed == {softnet_path: 1}
        assert reader.read_errors == {stat_path: 1}
        # The 32-bit counter wraps: 0xffffffff -> 0x10 is 17 more packets, not a reset.
        write(tmp_path, "net/softnet_stat", "00000010 00000001 00000000 0 0 0 0 0 0 0 0 0 00000000\n")
        write(tmp_path, "stat", "cpu0 garbage\n")
        assert reader.softnet()[(0, "processed")] == 0xFFFFFFFF + 17
        assert reader.cpu_ticks() == {}
        assert reader.malformed == {softnet_path: 1, stat_path: 1}
        # A file that vanished keeps the last totals.
        write(tmp_path, "net/softnet_stat", None)
        assert reader.softnet()[(0, "processed")] == 0xFFFFFFFF + 17
    assert softnet_path == str(tmp_path / "net" / "softnet_stat")


def test_cpu_ticks_recorded(tmp_path):
    write(tmp_path, "stat", STAT_618)
    with paths.roots(proc_root=str(tmp_path)):
        ticks = procfs.ProcCounters().cpu_ticks()
    assert ticks[(1, "steal")] == 7 and ticks[(0, "softirq")] == 763 and len(ticks) == 6


def test_vector_names_fall_back_to_proc_softirqs(tmp_path, monkeypatch):
    monkeypatch.setattr(procfs.tracefs, "read_format", lambda *a, **k: None)
    write(tmp_path, "softirqs", SOFTIRQS_618)
    with paths.roots(proc_root=str(tmp_path)):
        names, source = procfs.load_vector_names()
        assert names == dict(enumerate(VECTORS)) and source == "/proc/softirqs row order"
        write(tmp_path, "softirqs", None)
        assert procfs.load_vector_names() == ({}, "none (vectors shown as numbers)")
    assert procfs.vector_name({}, 3) == "VEC_3"
