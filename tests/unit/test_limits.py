"""Unit tests for the series cap (daemon/limits.py), its wiring in the collector, and the
bounds of every user-space structure the daemon keeps (snapshot ring, symbol cache, auth
cache, series memory). The collector test uses tests/fakes.py's manager: the kernel tier
(tests/kernel/test_faults_kernel.py) runs the same cap over real maps."""

from __future__ import annotations

import subprocess
import shutil

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from dpwatch.daemon.collector import DpwatchCollector
from dpwatch.daemon.config import Config
from dpwatch.daemon.host.kallsyms import KallsymsResolver
from dpwatch.daemon.limits import OTHER, SeriesLimiter
from dpwatch.daemon.snapshots import SnapshotRing
from dpwatch.probes.base import Probe
from fakes import FakeFeatures, FakeManager


def family(values: dict[tuple[str, str], float]) -> CounterMetricFamily:
    fam = CounterMetricFamily("dpwatch_test_things", "things", labels=["reason", "protocol"])
    for labels, v in values.items():
        fam.add_metric(list(labels), v)
    return fam


def series(fam) -> dict[tuple, float]:
    return {(s.labels["reason"], s.labels["protocol"]): s.value for s in fam.samples}


def test_cap_keeps_the_largest_and_folds_the_rest_into_other():
    lim = SeriesLimiter(3)
    out = lim.apply(family({("a", "ipv4"): 5, ("b", "ipv4"): 50, ("c", "ipv4"): 1,
                            ("d", "ipv6"): 20, ("e", "ipv6"): 2}))
    assert series(out) == {("b", "ipv4"): 50, ("d", "ipv6"): 20, ("a", "ipv4"): 5,
                           (OTHER, OTHER): 3}
    assert lim.overflow() == {"dpwatch_test_things": 2}


def test_a_probes_own_other_series_is_not_an_overflow():
    """DNS labels servers past --dns-top-servers "other" itself: under the cap that series is
    kept as it is and nothing counts as folded; over the cap the folded ones join it."""
    lim = SeriesLimiter(3)
    out = lim.apply(family({("a", "x"): 5, (OTHER, OTHER): 7}))
    assert series(out) == {("a", "x"): 5, (OTHER, OTHER): 7}
    assert lim.overflow().get("dpwatch_test_things", 0) == 0
    out = lim.apply(family({("a", "x"): 5, ("b", "x"): 4, ("c", "x"): 3, ("d", "x"): 2, (OTHER, OTHER): 7}))
    assert series(out) == {("a", "x"): 5, ("b", "x"): 4, ("c", "x"): 3, (OTHER, OTHER): 9}
    assert lim.overflow()["dpwatch_test_things"] == 1  # d only


def test_admission_is_sticky_and_overflow_counts_distinct_label_sets():
    lim = SeriesLimiter(2)
    lim.apply(family({("a", "x"): 10, ("b", "x"): 9, ("c", "x"): 1}))
    # c grows past a and b: it still folds (a series never moves once it has its own).
    out = lim.apply(family({("a", "x"): 11, ("b", "x"): 9, ("c", "x"): 100}))
    assert series(out) == {("a", "x"): 11, ("b", "x"): 9, (OTHER, OTHER): 100}
    assert lim.overflow()["dpwatch_test_things"] == 1  # c again: not counted twice
    out = lim.apply(family({("a", "x"): 12, ("b", "x"): 9, ("c", "x"): 100, ("d", "x"): 7}))
    assert series(out)[(OTHER, OTHER)] == 107
    assert lim.overflow()["dpwatch_test_things"] == 2


def test_under_the_cap_nothing_changes_and_unlabelled_families_pass():
    lim = SeriesLimiter(5)
    fam = family({("a", "x"): 1, ("b", "x"): 2})
    assert lim.apply(fam) is fam
    g = GaugeMetricFamily("dpwatch_test_single", "one", value=3)
    assert lim.apply(g) is g
    assert lim.overflow() == {"dpwatch_test_things": 0}


def test_idle_series_free_their_slot():
    now = [0.0]
    lim = SeriesLimiter(1, idle_seconds=60, clock=lambda: now[0])
    lim.apply(family({("a", "x"): 1}))
    out = lim.apply(family({("b", "x"): 1}))
    assert series(out) == {(OTHER, OTHER): 1}
    now[0] = 61.0  # a has not been seen for a minute: b gets the slot
    out = lim.apply(family({("b", "x"): 2}))
    assert series(out) == {("b", "x"): 2}


def test_folded_memory_is_bounded():
    lim = SeriesLimiter(2)
    for i in range(1000):
        lim.apply(family({("keep1", "x"): 9, ("keep2", "x"): 9, (f"r{i}", "x"): 1}))
    fam = lim._families["dpwatch_test_things"]
    assert len(fam.admitted) == 2
    assert len(fam.folded) == 8  # 4 * max_series
    assert lim.overflow()["dpwatch_test_things"] == 1000


def test_histograms_fold_whole_series():
    from prometheus_client.core import HistogramMetricFamily
    fam = HistogramMetricFamily("dpwatch_test_seconds", "latency", labels=["rcode"])
    for i, rc in enumerate(("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED")):
        fam.add_metric([rc], [("0.1", i + 1), ("1.0", 2 * (i + 1)), ("+Inf", 3 * (i + 1))], 0.5 * (i + 1))
    lim = SeriesLimiter(2)
    out = lim.apply(fam)
    rows = {(s.name, s.labels.get("rcode"), s.labels.get("le")): s.value for s in out.samples}
    # REFUSED (4) and SERVFAIL (3) keep theirs; NOERROR (1) and NXDOMAIN (2) fold, bucket by bucket.
    assert rows[("dpwatch_test_seconds_bucket", "other", "0.1")] == 3
    assert rows[("dpwatch_test_seconds_bucket", "other", "+Inf")] == 9
    assert rows[("dpwatch_test_seconds_count", "other", None)] == 9
    assert rows[("dpwatch_test_seconds_sum", "other", None)] == 1.5
    assert {r for _n, r, _le in rows} == {"REFUSED", "SERVFAIL", "other"}
    assert lim.overflow() == {"dpwatch_test_seconds": 2}
    reg = CollectorRegistry(auto_describe=False)

    class _C:
        def collect(self, inputs=None):
            yield out
    reg.register(_C())
    text = generate_latest(reg).decode()
    promtool = shutil.which("promtool")
    if promtool:
        res = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_limiter_rejects_a_zero_cap():
    with pytest.raises(ValueError):
        SeriesLimiter(0)


# ---- the collector: cap applied to probe families, overflow exported ------------------------

class _ManyProbe(Probe):
    name = "many"

    def __init__(self, config, n):
        super().__init__(config)
        self.n = n

    def metrics(self, reading):
        fam = CounterMetricFamily("dpwatch_many_events", "events by key", labels=["key"])
        for i in range(self.n):
            fam.add_metric([f"k{i:03d}"], float(i + 1))
        yield fam


def _manager(cfg, n):
    """One probe with ``n`` series, no kernel; a full map counted in the manager's block."""
    return FakeManager([_ManyProbe(cfg, n)], {"many": {"counters": {}, "gauges": {}}}, config=cfg,
                       counters={"map_update_errors": {("many", "m"): 3}})


def test_collector_caps_series_and_exports_overflow_and_events_lost():
    cfg = Config()
    cfg.max_series_per_metric = 10
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DpwatchCollector(_manager(cfg, 25), FakeFeatures()))
    text = generate_latest(reg).decode()
    rows = [ln for ln in text.splitlines() if ln.startswith("dpwatch_many_events_total{")]
    assert len(rows) == 11  # 10 of their own + other
    # The 10 largest keep their series; the 15 smallest (1..15) sum to 120 in "other".
    assert 'dpwatch_many_events_total{key="other"} 120.0' in rows
    assert 'dpwatch_many_events_total{key="k024"} 25.0' in rows
    assert 'dpwatch_series_overflow_total{metric="dpwatch_many_events"} 15.0' in text
    assert 'dpwatch_events_lost_total{probe="many",stage="map_update"} 3.0' in text
    assert 'dpwatch_bpf_map_update_errors_total{map="m",probe="many"} 3.0' in text
    promtool = shutil.which("promtool")
    if promtool:  # Debian prometheus: installed by deploy/setup.sh --test
        res = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


# ---- bounds of the other user-space structures ------------------------------------------------

def test_snapshot_ring_never_grows_past_its_size():
    ring = SnapshotRing(5)
    for i in range(1000):
        ring.append({"x": i})
    assert len(ring) == 5 and ring.oldest().readings == {"x": 995}


def test_config_bounds_the_ring_by_max_window():
    from dpwatch.daemon.service import Daemon
    cfg = Config()
    cfg.snapshot_interval, cfg.max_window = 1.0, 300.0
    assert Daemon(cfg).ring.maxlen == 302
    cfg.snapshot_interval, cfg.max_window = 5.0, 3600.0  # the defaults: tiers, not 722
    assert Daemon(cfg).ring.maxlen == 119


def test_symbol_cache_is_bounded(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("".join(f"{0xffffffff81000000 + i * 0x100:x} T fn{i}\n" for i in range(100)))
    res = KallsymsResolver(str(path), cache_size=16)
    for start in range(0, 100, 10):
        res.resolve([0xffffffff81000000 + i * 0x100 + 4 for i in range(start, start + 10)])
    assert len(res._cache) == 16


def test_basic_auth_success_cache_is_bounded():
    import bcrypt
    from dpwatch.daemon.httpsec import BasicAuth
    users = {f"u{i}": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) for i in range(BasicAuth.CACHE + 20)}
    auth = BasicAuth(users)
    for user in users:
        assert auth.check(user, "pw")
    assert len(auth._ok) == BasicAuth.CACHE


def test_perf_paranoid_hint(tmp_path):
    """Debian/Ubuntu kernels refuse perf_event_open without CAP_SYS_ADMIN at paranoid >= 3:
    the attach failure then says which sysctl to set (seen in the 6.1 guest under capsh)."""
    from dpwatch.daemon.manager import perf_paranoid_hint
    paranoid, status = tmp_path / "paranoid", tmp_path / "status"
    status.write_text("Name:\tdpwatch\nCapEff:\t000000c000003000\n")  # BPF, PERFMON, NET_ADMIN, NET_RAW
    paranoid.write_text("3\n")
    hint = perf_paranoid_hint(str(paranoid), str(status))
    assert "kernel.perf_event_paranoid=3" in hint and "sysctl -w kernel.perf_event_paranoid=2" in hint
    paranoid.write_text("2\n")
    assert perf_paranoid_hint(str(paranoid), str(status)) == ""
    paranoid.write_text("4\n")
    status.write_text("CapEff:\t000001ffffffffff\n")  # root: CAP_SYS_ADMIN held
    assert perf_paranoid_hint(str(paranoid), str(status)) == ""
    paranoid.write_text("garbage\n")
    assert perf_paranoid_hint(str(paranoid), str(status)) == ""
