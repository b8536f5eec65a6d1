"""The Prometheus collector: reads the maps at scrape time through the probe manager."""

from __future__ import annotations

import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..probes.base import State

log = logging.getLogger("dpwatch.collector")


class DpwatchCollector(Collector):
    def __init__(self, manager, features):
        self.manager = manager
        self.features = features

    def collect(self):
        start = time.monotonic()
        readings = self.manager.collect()
        for name, probe in self.manager.active().items():
            reading = readings.get(name)
            if reading is None:
                continue
            try:
                yield from probe.metrics(reading)
            except Exception as exc:  # one probe's bug must not break the scrape
                log.warning("probe %s metrics failed: %s", name, exc)

        up = GaugeMetricFamily("dpwatch_probe_up", "1 when the probe is attached and collecting "
                               "(a degraded fallback mode counts as up), 0 otherwise.",
                               labels=["probe", "mode"])
        for name, st in self.manager.status.items():
            up.add_metric([name, st.mode or "none"],
                          1.0 if st.state in (State.ATTACHED, State.DEGRADED) else 0.0)
        yield up

        info = GaugeMetricFamily("dpwatch_build_info", "dpwatch version and the running kernel.",
                                 labels=["version", "kernel"])
        info.add_metric([__version__, self.features.kernel_release], 1.0)
        yield info

        mgr = readings.get("_manager", {}).get("counters", {})
        errs = CounterMetricFamily("dpwatch_bpf_map_update_errors", "Failed BPF map updates in "
                                   "kernel (map full or out of memory), by probe and map.",
                                   labels=["probe", "map"])
        for (probe, mapname), value in sorted(mgr.get("map_update_errors", {}).items()):
            errs.add_metric([probe, mapname], value)
        yield errs

        cerr = CounterMetricFamily("dpwatch_collect_errors", "Failed reads of a probe's maps.",
                                   labels=["probe"])
        for name in self.manager.active():
            cerr.add_metric([name], mgr.get("collect_errors", {}).get(name, 0))
        yield cerr

        yield GaugeMetricFamily("dpwatch_bpf_compile_seconds", "Time spent compiling the BPF "
                                "module at start-up.", value=self.manager.compile_seconds)
        yield GaugeMetricFamily("dpwatch_scrape_collect_seconds", "Time this scrape spent "
                                "reading the maps.", value=time.monotonic() - start)


def make_registry(manager, features) -> CollectorRegistry:
    from prometheus_client import ProcessCollector
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DpwatchCollector(manager, features))
    ProcessCollector(registry=registry)  # process_* : the daemon's own CPU and memory
    return registry
