"""The Prometheus collector: reads the maps at scrape time through the probe manager."""

from __future__ import annotations

import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from dpwatch import __version__
from dpwatch.probes.base import State
from dpwatch.daemon.limits import DEFAULT_MAX_SERIES, SeriesLimiter

log = logging.getLogger("dpwatch.collector")


class DpwatchCollector(Collector):
    def __init__(self, manager, features):
        self.manager = manager
        self.features = features
        cap = int(getattr(manager.config, "max_series_per_metric", 0) or DEFAULT_MAX_SERIES)
        self.limiter = SeriesLimiter(cap)

    def collect(self):
        start = time.monotonic()
        readings = self.manager.collect()
        yield from self._probe_families(readings)
        yield from self._status_families()
        own = readings.get("_manager", {})
        yield from self._manager_families(own.get("counters", {}), own.get("gauges", {}))
        if getattr(self.manager.config, "bpf_stats", False):
            yield from self._program_families()
        yield GaugeMetricFamily("dpwatch_bpf_compile_seconds", "Time spent compiling the BPF "
                                "module at start-up.", value=self.manager.compile_seconds)
        yield GaugeMetricFamily("dpwatch_scrape_collect_seconds", "Time this scrape spent "
                                "reading the maps.", value=time.monotonic() - start)

    def _probe_families(self, readings):
        for name, probe in self.manager.active().items():
            reading = readings.get(name)
            if reading is None:
                continue
            try:
                # Collected first, then yielded: a probe that fails half-way yields nothing.
                families = [self.limiter.apply(fam) for fam in probe.metrics(reading)]
            except Exception as exc:  # one probe's bug must not break the scrape
                log.warning("probe %s metrics failed: %s", name, exc)
                continue
            yield from families

    def _status_families(self):
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

    def _manager_families(self, mgr, gauges):
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
        yield from collect_health(gauges)

        lost = CounterMetricFamily("dpwatch_events_lost", "Events a probe saw but could not "
                                   "record, by stage: map_update (an in-kernel map was full), "
                                   "collect (a read of the maps failed), or a probe's own stage "
                                   "(e.g. a perf or ring buffer overrun).", labels=["probe", "stage"])
        for (probe, stage), value in sorted(mgr.get("events_lost", {}).items()):
            lost.add_metric([probe, stage], value)
        yield lost

        over = CounterMetricFamily("dpwatch_series_overflow", "Label sets of a metric folded into "
                                   "its \"other\" series because the metric reached "
                                   "--max-series-per-metric.", labels=["metric"])
        for metric, value in sorted(self.limiter.overflow().items()):
            over.add_metric([metric], value)
        yield over

    def _program_families(self):
        secs = CounterMetricFamily("dpwatch_bpf_program_run_seconds", "Time spent running each "
                                   "dpwatch BPF program in kernel (needs --bpf-stats).",
                                   labels=["probe", "program"])
        runs = CounterMetricFamily("dpwatch_bpf_program_runs", "Runs of each dpwatch BPF program "
                                   "(needs --bpf-stats).", labels=["probe", "program"])
        for probe, prog, ns, cnt in self.manager.program_stats():
            secs.add_metric([probe, prog], ns / 1e9)
            runs.add_metric([probe, prog], cnt)
        yield secs
        yield runs


def collect_health(gauges: dict) -> list:
    """The manager's per-probe outcome of the last collect(), like node_exporter's
    node_scrape_collector_success and _duration_seconds."""
    ok = GaugeMetricFamily("dpwatch_probe_collect_success", "1 when the probe's last collect "
                           "(its read of maps and files) succeeded, 0 when it failed (its "
                           "metrics are then missing from this scrape).", labels=["probe"])
    for (name,), value in sorted(gauges.get("collect_success", {}).items()):
        ok.add_metric([name], float(value))
    secs = GaugeMetricFamily("dpwatch_probe_collect_duration_seconds", "Time the probe's last "
                             "collect took (reading its maps and files).", labels=["probe"])
    for (name,), value in sorted(gauges.get("collect_seconds", {}).items()):
        secs.add_metric([name], float(value))
    return [ok, secs]


class SyntheticCollector(Collector):
    """Benchmark only (--synthetic-series N): N extra series, to measure the collector's
    cost at high series counts without a cluster's worth of traffic."""

    def __init__(self, count: int):
        self.count = count

    def collect(self):
        fam = GaugeMetricFamily("dpwatch_synthetic_series", "Synthetic series for benchmarks.",
                                labels=["series"])
        for i in range(self.count):
            fam.add_metric([str(i)], float(i))
        yield fam


def make_registry(manager, features) -> CollectorRegistry:
    from prometheus_client import ProcessCollector
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DpwatchCollector(manager, features))
    synthetic = int(getattr(manager.config, "synthetic_series", 0) or 0)
    if synthetic:
        registry.register(SyntheticCollector(synthetic))
    ProcessCollector(registry=registry)  # process_* : the daemon's own CPU and memory
    return registry
