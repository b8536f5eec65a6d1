"""The dashboards and alert rules against the real thing: `dpwatch run` in a "node" netns under
real traffic, scraped every second by Debian's Prometheus (also in that netns), with
deploy/alerts/dpwatch.rules.yml loaded as its rule file.

- Every metric a dashboard or an alert uses exists in the daemon's /metrics (histogram and
  counter families matched by base name; `up` is Prometheus's own).
- Every PromQL expression of every dashboard panel and every alert runs through the HTTP API
  with status success. Dashboard variables are substituted as Grafana would: $job, $instance,
  $__rate_interval (5s at this 1 s scrape interval), $__interval, $__range.
- What the test drives returns data: 20,000 UDP datagrams to a closed port (NO_SOCKET drops,
  enough for DpwatchPacketDropsHigh's 50/s over its 5m window), a veth pair in the node netns with ends
  of 1500 and 1400 (DpwatchMTUMismatch), a second target nobody listens on (DpwatchDown), conntrack on in the
  node netns. Every dashboard query whose metrics have samples returns series; alerts whose
  scenario is not driven (a full conntrack table) return nothing.
- Prometheus itself evaluates every rule: all healthy, and the driven alerts are pending.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import pytest
import yaml

from netlab import Lab, closed_udp_port, http_get, sh, udp_send
from test_daemon_e2e import NFT_RULES, DaemonProc

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from promql import MetricFamilies, metric_names, substitute  # noqa: E402

# PromQL over the same metric names on every kernel: not rerun in the 6.1 guest (make test-kernels).
pytestmark = pytest.mark.host_only

RULES = REPO / "deploy" / "alerts" / "dpwatch.rules.yml"
DASHBOARDS = sorted((REPO / "dashboards").glob("dpwatch-*.json"))
DPW_PORT, PROM_PORT, DEAD_PORT = 9431, 9432, 9433
PROMETHEUS_ONLY = {"up"}  # series Prometheus makes itself, not in any /metrics
DROPS_SENT = 20000
# Dashboard queries that may be empty although their metrics have samples, and why.
MAY_BE_EMPTY = {
    # SERVFAIL/REFUSED share: no such answer exists unless the test sends DNS traffic
    'rcode=~"(?i)servfail|refused"',
}


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for f in DASHBOARDS:
        dash = json.loads(f.read_text())
        for p in dash["panels"]:
            for t in p.get("targets", []):
                out.append((f"{f.stem}: {p['title']} [{t['refId']}]", t["expr"]))
    return out


def alert_rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


class Prometheus:
    def __init__(self, ns: str, workdir: pathlib.Path):
        self.ns = ns
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(RULES)],
               "scrape_configs": [{"job_name": "dpwatch", "static_configs": [
                   {"targets": [f"127.0.0.1:{DPW_PORT}"]},
                   {"targets": [f"127.0.0.1:{DEAD_PORT}"]}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "w+")
        prom = shutil.which("prometheus")
        assert prom, "prometheus missing: run deploy/setup.sh --test"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, prom, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{PROM_PORT}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        status, _, body = http_get(self.ns, "127.0.0.1", PROM_PORT, f"/api/v1/{path}?{query}" if query else f"/api/v1/{path}")
        data = json.loads(body)
        assert status in (200, 400, 422), (status, body)
        return data

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def wait(self, what: str, ok, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.output()}"
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus: {what} not within {timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def samples(prom: Prometheus, expr: str) -> int:
    r = prom.query(expr)
    assert r["status"] == "success", r
    return len(r["data"]["result"])


@pytest.fixture(scope="module")
def stack(dpwatch_bin):
    work = pathlib.Path(tempfile.mkdtemp(prefix="dpwatch-prom-"))
    with Lab(pods=1) as lab:
        sh("nft", "-f", "-", ns=lab.node, input=NFT_RULES)  # conntrack on in the node netns
        # a veth pair in the node netns whose ends differ (1500 / 1400): the MTU audit flags it
        sh("ip", "link", "add", "dpwmtua", "mtu", "1500", "type", "veth", "peer", "name", "dpwmtub", "mtu", "1400",
           ns=lab.node)
        sh("ip", "link", "set", "dpwmtua", "up", ns=lab.node)
        sh("ip", "link", "set", "dpwmtub", "up", ns=lab.node)
        daemon = DaemonProc(dpwatch_bin, lab.node, DPW_PORT)
        prom = None
        try:
            daemon.wait_ready()
            prom = Prometheus(lab.node, work)
            inst = f"127.0.0.1:{DPW_PORT}"
            # two scrapes of the daemon before the traffic, so rate() has a baseline
            prom.wait("two scrapes", lambda: samples(
                prom, f'count_over_time(up{{job="dpwatch",instance="{inst}"}}[1m]) >= 2') == 1)
            sent = udp_send(lab.pod.ns, lab.pod.node_ip4, closed_udp_port(lab.node), DROPS_SENT)
            assert sent == DROPS_SENT
            # the drops scraped, and every rule evaluated at least once since
            prom.wait("the drops scraped", lambda: samples(
                prom, f'increase(dpwatch_skb_drops_total{{instance="{inst}",reason="NO_SOCKET"}}[1m]) '
                      f'>= {DROPS_SENT * 0.9}') >= 1)
            time.sleep(2.5)
            yield lab, daemon, prom, inst
        finally:
            if prom:
                prom.stop()
            daemon.stop()
            shutil.rmtree(work, ignore_errors=True)


def test_every_metric_used_exists_in_metrics(stack):
    _, daemon, _, _ = stack
    status, _, text = daemon.get("/metrics")
    assert status == 200
    fams = MetricFamilies(text)
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries() + [(f"alert {a}", e) for a, e in alert_rules().items()]:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where.split(":")[0])
    assert len(used) >= 30
    missing = {n: sorted(w) for n, w in used.items() if n not in PROMETHEUS_ONLY and not fams.has(n)}
    assert not missing, f"used but not exported by the daemon: {missing}"


def test_every_dashboard_query_runs(stack):
    _, _, prom, inst = stack
    _, daemon, _, _ = stack
    present = MetricFamilies(daemon.get("/metrics")[2]).samples | PROMETHEUS_ONLY
    empty, ran, required = [], 0, 0
    for where, expr in dashboard_queries():
        q = substitute(expr, job="dpwatch", instance=inst)
        r = prom.query(q)
        assert r["status"] == "success", (where, q, r)
        ran += 1
        if all(n in present for n in metric_names(expr)) and not any(f in expr for f in MAY_BE_EMPTY):
            required += 1
            if not r["data"]["result"]:
                empty.append(f"{where}: {q}")
    assert ran == len(dashboard_queries()) and ran >= 50
    print(f"{ran} dashboard queries ran; {required} had samples for every metric and returned data")
    assert required >= 40
    assert not empty, "queries whose metrics have samples returned nothing:\n" + "\n".join(empty)


def test_driven_dashboard_panels_show_the_traffic(stack):
    _, _, prom, inst = stack
    by_title = {w.split(": ", 1)[1]: e for w, e in dashboard_queries() if w.startswith("dpwatch-node")}
    drops = prom.query(substitute(by_title["Drops by reason [A]"], job="dpwatch", instance=inst))["data"]["result"]
    assert any(s["metric"].get("reason") == "NO_SOCKET" for s in drops)
    top = prom.query(substitute(by_title["Top drop reasons over the time range [A]"], job="dpwatch",
                                instance=inst))["data"]["result"]
    no_socket = next(float(s["value"][1]) for s in top if s["metric"]["reason"] == "NO_SOCKET")
    assert no_socket >= DROPS_SENT * 0.9  # increase() extrapolates, so not exact
    mismatches = prom.query(substitute(by_title["Links with an MTU mismatch [A]"], job="dpwatch",
                                       instance=inst))["data"]["result"]
    assert float(mismatches[0]["value"][1]) >= 1
    fill = prom.query(substitute(by_title["Table fill [A]"], job="dpwatch", instance=inst))["data"]["result"]
    assert 0 <= float(fill[0]["value"][1]) < 0.8
    cluster = [e for w, e in dashboard_queries() if w.startswith("dpwatch-cluster: Nodes down")]
    assert float(prom.query(substitute(cluster[0], job="dpwatch"))["data"]["result"][0]["value"][1]) == 1


def test_every_alert_expression_runs_and_the_driven_ones_fire(stack):
    lab, daemon, prom, inst = stack
    results = {}
    for name, expr in alert_rules().items():
        r = prom.query(expr)
        assert r["status"] == "success", (name, r)
        results[name] = r["data"]["result"]
    dead = f"127.0.0.1:{DEAD_PORT}"
    assert [s["metric"]["instance"] for s in results["DpwatchDown"]] == [dead]
    drops = [s for s in results["DpwatchPacketDropsHigh"] if s["metric"]["instance"] == inst]
    assert drops and float(drops[0]["value"][1]) >= DROPS_SENT * 0.9 / 300
    assert [s["metric"]["instance"] for s in results["DpwatchMTUMismatch"]] == [inst]
    assert results["DpwatchConntrackTableNearlyFull"] == [] and results["DpwatchConntrackDrops"] == []
    # DpwatchProbeDown names exactly the probes /probes says failed (none, on a healthy machine)
    failed = {p["name"] for p in json.loads(daemon.get("/probes")[2])["probes"] if p["state"] == "failed"}
    assert {s["metric"]["probe"] for s in results["DpwatchProbeDown"]} == failed


def test_prometheus_evaluates_every_rule(stack):
    _, _, prom, inst = stack

    def all_evaluated():
        groups = prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == len(alert_rules()) and all(not r["lastEvaluation"].startswith("0001") for r in rules)
    prom.wait("every rule evaluated", all_evaluated, timeout=10)
    rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == set(alert_rules())
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    pending = {(a["labels"]["alertname"], a["labels"]["instance"]) for a in prom.api("alerts")["data"]["alerts"]}
    assert {("DpwatchDown", f"127.0.0.1:{DEAD_PORT}"), ("DpwatchPacketDropsHigh", inst),
            ("DpwatchMTUMismatch", inst)} <= pending
