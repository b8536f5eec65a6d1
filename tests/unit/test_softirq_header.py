"""bpf/softirq.h is the one place of the constants the softirq probe's C and Python sides
share: Python reads them from it, the C file no longer defines them itself, and the flags'
defaults are the ones the C side falls back to."""

from __future__ import annotations

import re

from dpwatch.daemon.config import Config
from dpwatch.probes import cdefs
from dpwatch.probes.softirq import histogram, probe


def test_python_reads_the_header():
    h = cdefs.defines("softirq.h")
    assert histogram.HIST_SLOTS == h["SOFTIRQ_HIST_SLOTS"] == 32
    assert h["SOFTIRQ_HIST_SLOTS"] & (h["SOFTIRQ_HIST_SLOTS"] - 1) == 0
    assert (probe.NVEC_DEFAULT, probe.NVEC_MAX) == (h["SOFTIRQ_NVEC_DEFAULT"], h["SOFTIRQ_NVEC_MAX"])
    assert histogram.LE_SLOTS[-1] == h["SOFTIRQ_HIST_SLOTS"] - 2   # +Inf is the last slot's


def test_flag_defaults_are_the_c_fallbacks():
    h = cdefs.defines("softirq.h")
    c = Config()
    assert c.softirq_napi_devices == h["SOFTIRQ_NAPI_MAX_DEFAULT"]
    assert c.softirq_sample == h["SOFTIRQ_SAMPLE_DEFAULT"]


def test_the_c_file_defines_none_of_them():
    c_text = cdefs.header_text("softirq.c")  # bpf/softirq.c, read the same way
    for name in cdefs.defines("softirq.h"):
        assert not re.search(rf"#\s*define\s+{name}\b", c_text), name
    assert "char name[SOFTIRQ_DEV_NAME_LEN];" in c_text
    assert "hist[SOFTIRQ_HIST_SLOTS]" in c_text
    # The compiled module has the header in front of the C file (Probe.source_text).
    src = probe.SoftirqProbe(Config()).source_text()
    assert src.index("#define SOFTIRQ_HIST_SLOTS") < src.index("struct softirq_vec_stat")
