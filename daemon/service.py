"""The running daemon: feature detection, the probe manager, the snapshot ring and the
sampler thread. The HTTP app and the one-shot CLI commands both drive this."""

from __future__ import annotations

import logging
import threading
import time

from dpwatch.daemon import features as features_mod
from dpwatch.daemon.host import tracefs
from dpwatch.daemon.manager import ProbeManager
from dpwatch.daemon.snapshots import SnapshotRing

log = logging.getLogger("dpwatch.service")


class Daemon:
    def __init__(self, config):
        self.config = config
        self.features = None
        self.manager: ProbeManager | None = None
        self.ring = SnapshotRing.for_window(config.max_window, config.snapshot_interval)
        self.started_mono = time.monotonic()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self.stats = None

    def load(self) -> None:
        path, note = tracefs.ensure_mounted()
        log.info("%s", note)
        self.features = features_mod.detect()
        if self.features.headers and not self.features.headers_exact:
            log.warning("%s", self.features.headers_note)
        if getattr(self.config, "bpf_stats", False):
            from dpwatch.daemon.host.bpfstats import StatsSession
            self.stats = StatsSession()
            if not self.stats.start():
                log.warning("--bpf-stats: %s", self.stats.error)
        self.manager = ProbeManager(self.config, self.features)
        self.manager.plan()
        self.manager.load()
        for st in self.manager.status.values():
            log.info("probe %-10s %-11s mode=%s %s", st.name, st.state.value, st.mode, st.reason)
        self.snapshot()  # the baseline every window starts from until the ring fills

    def snapshot(self) -> None:
        # "info" holds non-counter detail (recent events) that only fresh readings need.
        readings = self.manager.collect()
        self.ring.append({name: {k: v for k, v in r.items() if k != "info"}
                          for name, r in readings.items()})

    def start_sampler(self) -> None:
        self._sampler = threading.Thread(target=self._sample_loop, name="dpwatch-sampler", daemon=True)
        self._sampler.start()

    def _sample_loop(self) -> None:
        interval = self.config.snapshot_interval
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
            try:
                self.snapshot()
                self.manager.background()
            except Exception:
                log.exception("snapshot failed")

    @property
    def ready(self) -> bool:
        return bool(self.manager and self.manager.loaded and self.manager.active())

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        if self.manager is not None:
            self.manager.close()
        if self.stats is not None:
            self.stats.close()
