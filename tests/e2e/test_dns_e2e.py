"""End-to-end tier for the DNS probe: the real `dpwatch run` in a node netns, real resolvers
(dnsmasq on the node, a dnslib server in a second pod), dnspython clients in a pod, and
everything read over HTTP: /metrics (promtool-checked), /diagnose, /probes. Malformed input
must be counted and must not hurt the daemon; a kill -9 leaves no hook behind with the default
hooks (tcx links, or the socket filter), and the legacy tc filters of --dns-hook tc are removed
when dpwatch starts again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from dnslab import Dnsmasq, ScriptedServer, malformed_payloads, queries, resolve_with_search, route_pods, send_raw
from dpwatch.probes.dns import names as dn
from netlab import Lab, sh
from test_daemon_e2e import DaemonProc, metric

PORT = 9431
SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
FLAGS = ("--probes", "dns", "--dns-timeout", "1s", "--dns-names", "full",
         "--dns-search-nxdomain-min", "10")


@pytest.fixture(scope="module")
def net():
    with Lab(pods=2) as lab:
        route_pods(lab)
        p0, p1 = lab.pod_list
        with Dnsmasq(lab.node, [p0.node_ip4, p0.node_ip6]), ScriptedServer(p1.ns, p1.ip4) as srv:
            yield lab, srv


@pytest.fixture(scope="module")
def daemon(net, dpwatch_bin):
    lab, _ = net
    d = DaemonProc(dpwatch_bin, lab.node, PORT, *FLAGS)
    try:
        d.wait_ready()
        yield d
    finally:
        rc = d.stop()
        assert rc == 0


def scrape(d) -> str:
    status, _, text = d.get("/metrics")
    assert status == 200
    return text


def our_filters(ns: str, dev: str) -> str:
    out = ""
    for hook in ("ingress", "egress"):
        out += sh("tc", "filter", "show", "dev", dev, hook, ns=ns, check=False).stdout
    return out


def default_hook() -> str:
    from dpwatch.probes.dns.probe import tcx_supported
    return "tcx" if tcx_supported()[0] else "socket"


def test_probe_attached_with_the_default_hook(daemon, net):
    lab, _ = net
    status, _, body = daemon.get("/probes")
    dns_probe = next(p for p in json.loads(body)["probes"] if p["name"] == "dns")
    assert dns_probe["state"] == "attached" and dns_probe["mode"] == default_hook(), dns_probe
    if dns_probe["mode"] == "tcx":
        assert set(dns_probe["info"]["interfaces"]) >= {"lo", lab.pod_list[0].veth_node,
                                                        lab.pod_list[1].veth_node}
    assert "dpwatch_dns_" not in our_filters(lab.node, lab.pod_list[0].veth_node)  # no legacy filter


def test_counts_over_http_and_promtool(daemon, net):
    lab, srv = net
    p0, p1 = lab.pod_list
    before = scrape(daemon)
    seen = queries(p0.ns, p0.node_ip4, [("ok.test", "A")] * 12 + [("nx.test", "AAAA")] * 4
                   + [("other.test", "A")] * 3)
    seen6 = queries(p0.ns, p0.node_ip6, [("ok.test", "A")] * 5)
    seen_p1 = queries(p0.ns, p1.ip4, [("servfail.e2e.test", "A")] * 2 + [("delay300.e2e.test", "A")] * 3)
    time.sleep(0.3)
    after = scrape(daemon)
    assert seen == {"NOERROR": 12, "NXDOMAIN": 4, "REFUSED": 3} and seen6 == {"NOERROR": 5}
    assert seen_p1 == {"SERVFAIL": 2, "NOERROR": 3}

    def d(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)
    assert d("dpwatch_dns_queries_total", qtype="A") == 25
    assert d("dpwatch_dns_queries_total", qtype="AAAA") == 4
    assert d("dpwatch_dns_responses_total", rcode="NOERROR") == 20
    assert d("dpwatch_dns_responses_total", rcode="NXDOMAIN") == 4
    assert d("dpwatch_dns_responses_total", rcode="REFUSED") == 3
    assert d("dpwatch_dns_responses_total", rcode="SERVFAIL") == 2
    assert d("dpwatch_dns_unmatched_responses_total") == 0
    # the 300 ms answers: in the 0.512 bucket, none of them at or below 0.256
    le = f"{dn.BUCKET_BOUNDS[dn.bucket_of(0.3)]:.6g}"
    below = f"{dn.BUCKET_BOUNDS[dn.bucket_of(0.3) - 1]:.6g}"
    in_512 = d("dpwatch_dns_request_duration_seconds_bucket", rcode="NOERROR", le=le)
    in_256 = d("dpwatch_dns_request_duration_seconds_bucket", rcode="NOERROR", le=below)
    assert in_512 - in_256 == 3
    assert d("dpwatch_dns_server_queries_total", server=p1.ip4) == 5
    assert not [ln for ln in after.splitlines() if "dpwatch_dns" in ln and "name=" in ln]
    res = subprocess.run(["promtool", "check", "metrics"], input=after.encode(), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_timeouts_over_http(daemon, net):
    lab, srv = net
    p0, p1 = lab.pod_list
    before = metric(scrape(daemon), "dpwatch_dns_timeouts_total", server=p1.ip4)
    seen = queries(p0.ns, p1.ip4, [(f"noreply.e2e{i}.test", "A") for i in range(4)], timeout=0.3)
    assert seen == {"timeout": 4}
    deadline = time.monotonic() + 15   # --dns-timeout 1s, swept every --snapshot-interval 1s
    while time.monotonic() < deadline:
        got = metric(scrape(daemon), "dpwatch_dns_timeouts_total", server=p1.ip4) - before
        if got >= 4:
            break
        time.sleep(0.5)
    assert got == 4
    time.sleep(2)
    assert metric(scrape(daemon), "dpwatch_dns_timeouts_total", server=p1.ip4) - before == 4
    status, _, body = daemon.get("/diagnose?window=30s&format=json")
    ids = [f["id"] for f in json.loads(body)["findings"]]
    assert "dns.timeouts" in ids or "triage.dns_conntrack_race" in ids


def test_malformed_counted_and_daemon_survives(daemon, net):
    lab, _ = net
    p0, p1 = lab.pod_list
    payloads = malformed_payloads(200, seed=42, max_len=300)
    before = scrape(daemon)
    sent = send_raw(p0.ns, p1.node_ip4, payloads, gap=0.001)
    sent += send_raw(p0.ns, p1.node_ip6, payloads[:50], gap=0.001)
    time.sleep(0.3)
    after = scrape(daemon)
    assert sent == 250
    assert metric(after, "dpwatch_dns_malformed_packets_total") - metric(before, "dpwatch_dns_malformed_packets_total") == 250
    assert metric(after, "dpwatch_dns_queries_total") == metric(before, "dpwatch_dns_queries_total")
    assert metric(after, "dpwatch_dns_responses_total") == metric(before, "dpwatch_dns_responses_total")
    assert daemon.proc.poll() is None
    # and it still parses real DNS afterwards
    assert queries(p0.ns, p0.node_ip4, [("ok.test", "A")]) == {"NOERROR": 1}


def test_search_path_amplification_in_diagnose(daemon, net):
    lab, _ = net
    p0 = lab.pod_list[0]
    for _ in range(5):
        answer, _tried = resolve_with_search(p0.ns, p0.node_ip4, "api.example", SEARCH, ndots=5)
        assert answer == "api.example."
    time.sleep(1.5)   # one snapshot later
    status, _, body = daemon.get("/diagnose?window=60s&format=json")
    assert status == 200
    found = {f["id"]: f for f in json.loads(body)["findings"]}
    f = found["dns.search_path_amplification"]
    top = f["evidence"]["names"][0]
    assert top["name"] == "api.example" and top["nxdomain"] == 15
    assert any("ndots" in r for r in f["remediation"])
    status, _, text = daemon.get("/diagnose?window=60s")
    assert "dns.search_path_amplification" in text


def test_default_hook_leaves_nothing_after_kill9(net, dpwatch_bin):
    """tcx links and the socket filter live as long as the process's file descriptors: after
    kill -9 the kernel has freed the DNS program (its id is gone from bpftool)."""
    lab, _ = net
    d = DaemonProc(dpwatch_bin, lab.node, PORT + 3, *FLAGS)
    try:
        d.wait_ready()
        ids = dns_prog_ids() & held_prog_ids(d.proc.pid)  # this daemon's, not another's
        assert ids, "bpftool shows no dns_tc/dns_sock program of this dpwatch while it runs"
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
    finally:
        d.stop()
    deadline = time.monotonic() + 10
    while dns_prog_ids() & ids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not dns_prog_ids() & ids


def held_prog_ids(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                out.update(int(ln.split()[1]) for ln in fh if ln.startswith("prog_id:"))
        except OSError:
            continue
    return out


def dns_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=30)
    return {p["id"] for p in json.loads(out.stdout or "[]") if p.get("name") in ("dns_tc", "dns_sock")}


def test_legacy_tc_sigterm_removes_filters_and_kill9_is_cleaned_at_next_start(net, dpwatch_bin):
    """--dns-hook tc: kill -9 leaves the clsact filters (the kernel keeps them, and the
    program, while the interface lives); the next dpwatch removes filters whose owner pid is
    gone."""
    lab, _ = net
    dev = lab.pod_list[0].veth_node
    first = DaemonProc(dpwatch_bin, lab.node, PORT + 1, *FLAGS, "--dns-hook", "tc")
    try:
        first.wait_ready()
        pid = first.proc.pid
        assert "dpwatch_dns_" in our_filters(lab.node, dev)
        os.kill(pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    left = our_filters(lab.node, dev)
    assert f"dpwatch_dns_{pid}" in left  # what kill -9 leaves
    second = DaemonProc(dpwatch_bin, lab.node, PORT + 2, *FLAGS, "--dns-hook", "tc")
    try:
        second.wait_ready()
        info = next(p for p in json.loads(second.get("/probes")[2])["probes"] if p["name"] == "dns")["info"]
        assert info["stale_filters_removed"] >= 2 * 3  # ingress+egress on lo and both veths
        assert f"dpwatch_dns_{pid}" not in our_filters(lab.node, dev)
        spid = second.proc.pid
        assert f"dpwatch_dns_{spid}" in our_filters(lab.node, dev)
    finally:
        assert second.stop() == 0
    assert f"dpwatch_dns_{spid}" not in our_filters(lab.node, dev)  # SIGTERM: detached
