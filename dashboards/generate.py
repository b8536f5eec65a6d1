"""Write dpwatch's Grafana dashboards (dashboards/*.json) from this one description.

    .venv/bin/python dashboards/generate.py          # rewrite the JSON files
    .venv/bin/python dashboards/generate.py --check  # exit 1 if a JSON file is not what this writes

Plain Python, no dependency: the JSON it writes is what users import, and the tests check that
JSON itself (tests/unit/test_dashboards.py: @grafana/schema types through tsc; every metric exists
in a real daemon's /metrics; tests/e2e/test_prometheus_e2e.py: every query runs in a real
Prometheus). dashboards/README.md says why it is JSON checked with tsc and not grafana-foundation-sdk.

Every panel gets a unit, thresholds and a description (the builder has no defaults for them).
Thresholds are the daemon's finding levels and the alert rules' (deploy/alerts/dpwatch.rules.yml).
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # board.py beside this file, also when imported by the tests
from board import (BLUE, CLUSTER, GREEN, NET_VECTORS, NODE, ORANGE, RCODE_ERRORS, RED,  # noqa: E402
                   UP_DOWN, Board, dashboard, levels, link, rate, target)


def _node_health_row(b: Board) -> None:
    b.row("Probe health")
    b.stat("Probes attached", "dpwatch_probe_up per probe: 1 when attached (a degraded fallback mode counts), "
           "0 when disabled, unsupported by this kernel (mode none) or failed. GET /probes on the node says why.",
           "none", levels((GREEN, 1), base=RED),
           target(f"dpwatch_probe_up{{{NODE}}}", "{{probe}} ({{mode}})"), w=10, mappings=UP_DOWN)
    b.stat("BPF compile at start-up", "dpwatch_bpf_compile_seconds: how long the one BPF compile took when "
           "the daemon started (the start-up budget is 5 s).",
           "s", levels((ORANGE, 5), (RED, 30)), target(f"dpwatch_bpf_compile_seconds{{{NODE}}}"), w=4)
    b.stat("Scrape collect time", "dpwatch_scrape_collect_seconds: time the last scrape spent reading the "
           "kernel maps. The benchmark's p99 budget for a whole scrape is 20 ms.",
           "s", levels((ORANGE, 0.02), (RED, 0.08)), target(f"dpwatch_scrape_collect_seconds{{{NODE}}}"), w=4)
    b.stat("Daemon memory", "process_resident_memory_bytes of the daemon. deploy/daemonset.yaml requests "
           "160 MiB and limits it to 512 MiB (BENCHMARKS.md: ~153 MiB steady, 217 MiB peak at start-up).",
           "bytes", levels((ORANGE, 400 * 2**20), (RED, 480 * 2**20)),
           target(f"process_resident_memory_bytes{{{NODE}}}"), w=6)
    b.timeseries("Map update errors and collect errors", "Failed in-kernel map updates (a bounded map was "
                 "full: dpwatch_bpf_map_update_errors_total) and failed map reads (dpwatch_collect_errors_total). "
                 "Any non-zero rate means counts are being lost.",
                 "ops", levels((RED, 0.001)),
                 target(f"sum by (probe, map) ({rate('dpwatch_bpf_map_update_errors_total')})", "update {{probe}}/{{map}}"),
                 target(f"sum by (probe) ({rate('dpwatch_collect_errors_total')})", "collect {{probe}}"), w=12)
    b.timeseries("Daemon CPU", "CPU the daemon process uses (process_cpu_seconds_total), in cores. BPF programs "
                 "run in the kernel's softirq context and are not in this number (see the softirq row). The "
                 "DaemonSet's limit is 0.5 core; idle use is ~0.2% of a core.",
                 "percentunit", levels((ORANGE, 0.25), (RED, 0.45)),
                 target(f"{rate('process_cpu_seconds_total')}", "cpu"), w=12)


def _node_drops_row(b: Board) -> None:
    b.row("Drops by reason")
    b.timeseries("Drops by reason", "Packets the kernel dropped per second, by its own drop reason "
                 "(skb:kfree_skb; names read from the running kernel). Orange and red are the daemon's "
                 "--drops-rate-warning (50/s) and --drops-rate-critical (1000/s); the DpwatchPacketDropsHigh "
                 "alert fires above 50/s for 10 minutes. /diagnose names the kernel locations.",
                 "pps", levels((ORANGE, 50), (RED, 1000)),
                 target(f"sum by (reason) ({rate('dpwatch_skb_drops_total')})", "{{reason}}"), stack=True, w=16)
    b.timeseries("Drops by protocol", "The same drops split by protocol class (ipv4, ipv6, arp, other).",
                 "pps", levels((ORANGE, 50), (RED, 1000)),
                 target(f"sum by (protocol) ({rate('dpwatch_skb_drops_total')})", "{{protocol}}"), stack=True, w=8)
    b.table("Top drop reasons over the time range", "The ten reasons with the most drops in the dashboard's "
            "time range (increase of dpwatch_skb_drops_total). Colour: orange from 3,000 drops an hour.",
            "short", levels((ORANGE, 3000), (RED, 60000)),
            target(f"topk(10, sum by (reason) (increase(dpwatch_skb_drops_total{{{NODE}}}[$__range])))",
                   "{{reason}}", instant=True, fmt="table"), w=24, h=7)


def _node_conntrack_row(b: Board) -> None:
    b.row("Conntrack")
    b.stat("Table fill", "dpwatch_conntrack_entries / dpwatch_conntrack_max_entries (per netns with "
           "--conntrack-all-netns). Orange at 80% (conntrack.table_pressure, the DpwatchConntrackTableNearlyFull "
           "alert), red at 95% (conntrack.table_full): new connections are dropped when it is full.",
           "percentunit", levels((ORANGE, 0.8), (RED, 0.95)),
           target(f"max(dpwatch_conntrack_entries{{{NODE}}} / dpwatch_conntrack_max_entries{{{NODE}}})"),
           w=4, h=8)
    b.timeseries("Entries and maximum", "Conntrack entries in use against nf_conntrack_max.",
                 "short", levels((ORANGE, 0.8 * 262144), (RED, 0.95 * 262144)),
                 target(f"sum(dpwatch_conntrack_entries{{{NODE}}})", "entries"),
                 target(f"max(dpwatch_conntrack_max_entries{{{NODE}}})", "nf_conntrack_max"), w=10)
    b.timeseries("Drops, early drops, insert failures", "Per second: packets dropped because no entry could "
                 "be created (table full: conntrack.table_full, DpwatchConntrackDrops fires on any), entries "
                 "evicted to make room, insert failures (the UDP race: conntrack.insert_failed) and packets "
                 "conntrack could not track.",
                 "pps", levels((RED, 0.001)),
                 target(f"sum({rate('dpwatch_conntrack_drops_total')})", "drops (table full)"),
                 target(f"sum({rate('dpwatch_conntrack_early_drops_total')})", "early drops"),
                 target(f"sum({rate('dpwatch_conntrack_insert_failed_total')})", "insert failed"),
                 target(f"sum({rate('dpwatch_conntrack_invalid_total')})", "invalid"), w=10)


def _node_mtu_row(b: Board) -> None:
    b.row("Fragmentation and MTU")
    b.stat("Links with an MTU mismatch", "dpwatch_mtu_mismatches: links the MTU audit flags (veth ends that "
           "differ, tunnels bigger than their underlay, bridge ports that differ). Any is red: mtu.mismatch, "
           "the DpwatchMTUMismatch alert. /diagnose gives the exact ip link command.",
           "none", levels((RED, 1)), target(f"max(dpwatch_mtu_mismatches{{{NODE}}})"), w=4, h=8)
    b.timeseries("Fragments created and failures", "IP fragments this node created per second and packets it "
                 "could not fragment, by family. Orange at 1/s: frag.fragmentation_active "
                 "(--frag-rate-warning), the DpwatchFragmentationActive alert.",
                 "pps", levels((ORANGE, 1)),
                 target(f"sum by (family) ({rate('dpwatch_ip_fragments_created_total')})", "created {{family}}"),
                 target(f"sum by (family) ({rate('dpwatch_ip_fragmentation_failed_total')})", "failed {{family}}"),
                 w=10)
    b.timeseries("Reassembly", "Fragments received, reassembly failures and timeouts per second "
                 "(frag.reassembly_failures: any failure is orange).",
                 "pps", levels((ORANGE, 0.001)),
                 target(f"sum by (family) ({rate('dpwatch_ip_fragments_received_total')})", "received {{family}}"),
                 target(f"sum by (family) ({rate('dpwatch_ip_reassembly_failed_total')})", "failed {{family}}"),
                 target(f"sum by (family) ({rate('dpwatch_ip_reassembly_timeouts_total')})", "timeouts {{family}}"),
                 w=10)
    b.timeseries("ICMP frag-needed and destination unreachable", "Frag-needed (IPv4) / packet-too-big (IPv6) "
                 "sent and received (mtu.pmtu_frag_needed), and all destination-unreachable messages. IPv4 "
                 "frag-needed received is counted only in the mtu probe's kprobe mode.",
                 "pps", levels((ORANGE, 0.001)),
                 target(f"sum by (family) ({rate('dpwatch_icmp_frag_needed_sent_total')})", "frag-needed sent {{family}}"),
                 target(f"sum by (family) ({rate('dpwatch_icmp_frag_needed_received_total')})",
                        "frag-needed received {{family}}"),
                 target(f"sum by (family, direction) ({rate('dpwatch_icmp_dest_unreachable_total')})",
                        "unreachable {{direction}} {{family}}"), w=12)
    b.table("Interface MTUs", "dpwatch_interface_mtu_bytes for each interface of the node's netns (capped at "
            "512). Blue marks jumbo frames (above 1500).",
            "bytes", levels((BLUE, 1501)),
            target(f"max by (interface, kind) (dpwatch_interface_mtu_bytes{{{NODE}}})", "{{interface}}",
                   instant=True, fmt="table"), w=12)


def _node_softirq_row(b: Board) -> None:
    b.row("Softirq and softnet")
    b.heatmap("NET_RX + NET_TX softirq time per CPU", "Share of each CPU spent in the network softirqs "
              "(dpwatch_softirq_seconds_total, vectors NET_RX and NET_TX). One hot row is one CPU doing all the "
              "receive work: softirq.cpu_saturated / softirq.imbalance; spread it with RSS/RPS/RFS.",
              "percentunit", levels((ORANGE, 0.5), (RED, 0.9)),
              target(f"sum by (cpu) ({rate('dpwatch_softirq_seconds_total', extra=NET_VECTORS)})", "cpu {{cpu}}"))
    b.timeseries("Softirq time by vector", "CPU time per second in each softirq vector, all CPUs summed "
                 "(1 = one full CPU).",
                 "percentunit", levels((ORANGE, 0.5), (RED, 0.9)),
                 target(f"sum by (vector) ({rate('dpwatch_softirq_seconds_total')})", "{{vector}}"),
                 stack=True, w=12)
    b.timeseries("Softnet backlog drops and time squeeze", "Per CPU, per second: packets dropped because the "
                 "input backlog was full (softnet.backlog_drops: net.core.netdev_max_backlog; any is red, the "
                 "DpwatchSoftnetDrops alert) and NAPI rounds cut short by budget or time "
                 "(softnet.time_squeeze: net.core.netdev_budget, netdev_budget_usecs).",
                 "pps", levels((RED, 0.001)),
                 target(f"sum by (cpu) ({rate('dpwatch_softnet_dropped_total')})", "dropped cpu {{cpu}}"),
                 target(f"sum by (cpu) ({rate('dpwatch_softnet_time_squeeze_total')})", "squeezed cpu {{cpu}}"),
                 w=8)
    b.timeseries("Packets processed per CPU", "Packets each CPU's softnet processed per second "
                 "(dpwatch_softnet_processed_total). Uneven lines are the imbalance the heatmap shows.",
                 "pps", levels((ORANGE, 500000)),
                 target(f"sum by (cpu) ({rate('dpwatch_softnet_processed_total')})", "cpu {{cpu}}"), w=8)
    b.timeseries("CPU steal", "Time the hypervisor gave this vCPU's time to someone else "
                 "(dpwatch_cpu_steal_seconds_total). Orange at 5%: cpu.steal, latency jitter from a noisy "
                 "neighbour.",
                 "percentunit", levels((ORANGE, 0.05), (RED, 0.2)),
                 target(f"sum by (cpu) ({rate('dpwatch_cpu_steal_seconds_total')})", "cpu {{cpu}}"), w=8)
    b.timeseries("Softirq raise-to-run latency p99", "99th percentile of the time from a softirq being raised "
                 "to it running, per vector (dpwatch_softirq_raise_latency_seconds): softirq.latency_high. "
                 "Orange from 1 ms, red from 10 ms.",
                 "s", levels((ORANGE, 0.001), (RED, 0.01)),
                 target("histogram_quantile(0.99, sum by (vector, le) "
                        f"({rate('dpwatch_softirq_raise_latency_seconds_bucket')}))", "p99 {{vector}}"), w=12)
    b.timeseries("NAPI polls that used their whole budget", "Per device, per second "
                 "(dpwatch_napi_budget_exhausted_total): the driver had more packets than one poll may take. "
                 "Sustained, it precedes time squeeze and backlog drops.",
                 "ops", levels((ORANGE, 100)),
                 target(f"sum by (device) ({rate('dpwatch_napi_budget_exhausted_total')})", "{{device}}"), w=12)


def _node_dns_row(b: Board) -> None:
    b.row("DNS")
    b.timeseries("Queries by type", "DNS queries per second seen on the node, by query type "
                 "(dpwatch_dns_queries_total). Orange from 1,000/s: a busy node where NodeLocal DNSCache pays off.",
                 "reqps", levels((ORANGE, 1000)),
                 target(f"sum by (qtype) ({rate('dpwatch_dns_queries_total')})", "{{qtype}}"), stack=True, w=8)
    b.timeseries("Responses by rcode", "DNS responses per second by response code. SERVFAIL and REFUSED above "
                 "5% of responses: dns.errors, the DpwatchDNSErrors alert; a high NXDOMAIN rate: "
                 "dns.nxdomain_rate, often the ndots:5 search-path storm (dns.search_path_amplification).",
                 "reqps", levels((ORANGE, 1000)),
                 target(f"sum by (rcode) ({rate('dpwatch_dns_responses_total')})", "{{rcode}}"), stack=True, w=8)
    b.timeseries("Timeouts, errors and malformed", "Share of queries never answered (dns.timeouts: the "
                 "DpwatchDNSTimeouts alert above 1%), share of SERVFAIL/REFUSED answers (dns.errors, above 5%), "
                 "and per second: responses that matched no query, and malformed DNS packets.",
                 "percentunit", levels((ORANGE, 0.01), (RED, 0.05)),
                 target(f"sum({rate('dpwatch_dns_timeouts_total')}) / sum({rate('dpwatch_dns_queries_total')})",
                        "timeouts / queries"),
                 target(f"sum({rate('dpwatch_dns_responses_total', extra=RCODE_ERRORS)}) / "
                        f"sum({rate('dpwatch_dns_responses_total')})", "SERVFAIL+REFUSED / responses"),
                 target(f"sum({rate('dpwatch_dns_unmatched_responses_total')})", "unmatched responses/s"),
                 target(f"sum({rate('dpwatch_dns_malformed_packets_total')})", "malformed packets/s"), w=8)
    b.heatmap("Response time", "How long DNS answers took (dpwatch_dns_request_duration_seconds buckets, "
              "0.25 ms to 8 s), all rcodes.",
              "s", levels((ORANGE, 0.2), (RED, 1)),
              target(f"sum by (le) (increase(dpwatch_dns_request_duration_seconds_bucket{{{NODE}}}[$__rate_interval]))",
                     "{{le}}", fmt="heatmap"), scheme="Blues")
    b.timeseries("Response time p50 / p90 / p99", "Quantiles of DNS response time. Orange: the "
                 "DpwatchDNSLatencyHigh alert's p99 of 200 ms (dns.latency_high).",
                 "s", levels((ORANGE, 0.2), (RED, 1)),
                 *[target(f"histogram_quantile({q}, sum by (le) "
                          f"({rate('dpwatch_dns_request_duration_seconds_bucket')}))", f"p{int(q * 100)}")
                   for q in (0.5, 0.9, 0.99)], w=12, h=9)


def node_dashboard() -> dict:
    b = Board()
    _node_health_row(b)
    _node_drops_row(b)
    _node_conntrack_row(b)
    _node_mtu_row(b)
    _node_softirq_row(b)
    _node_dns_row(b)
    return dashboard("dpwatch-node", "dpwatch / Node datapath",
                     "One node's datapath as dpwatch sees it: probe health, drops by reason, conntrack, "
                     "fragmentation and MTU, softirq and softnet, DNS. For the why and the fix: "
                     "curl <node>:9400/diagnose.", b, instance_multi=False,
                     links=[link("dpwatch dashboards", "dpwatch")])


def _cluster_fleet_row(b: Board) -> None:
    b.row("Fleet")
    b.stat("Nodes scraped", "dpwatch targets Prometheus scraped successfully (up == 1).",
           "none", levels((GREEN, 1), base=RED), target(f"count(up{{{CLUSTER}}} == 1) or vector(0)"), w=4)
    b.stat("Nodes down", "dpwatch targets Prometheus cannot scrape (the DpwatchDown alert after 5 minutes).",
           "none", levels((RED, 1)), target(f"count(up{{{CLUSTER}}} == 0) or vector(0)"), w=4)
    b.stat("Failed probes", "Probes that have a mode but are not attached (they failed to compile or attach: "
           "DpwatchProbeDown). Disabled or unsupported probes (mode none) are not counted.",
           "none", levels((ORANGE, 1)),
           target(f'count(dpwatch_probe_up{{{CLUSTER}, mode!="none"}} == 0) or vector(0)'), w=4)
    b.stat("Nodes with MTU mismatches", "Nodes whose MTU audit flags at least one link (DpwatchMTUMismatch).",
           "none", levels((RED, 1)), target(f"count(dpwatch_mtu_mismatches{{{CLUSTER}}} > 0) or vector(0)"), w=4)
    b.stat("Worst conntrack fill", "The fullest conntrack table in the cluster (80% warning, 95% full).",
           "percentunit", levels((ORANGE, 0.8), (RED, 0.95)),
           target(f"max(dpwatch_conntrack_entries{{{CLUSTER}}} / dpwatch_conntrack_max_entries{{{CLUSTER}}})"), w=4)
    b.stat("Cluster drops", "Packets dropped per second on all nodes together.",
           "pps", levels((ORANGE, 50), (RED, 1000)),
           target(f"sum({rate('dpwatch_skb_drops_total', CLUSTER)})"), w=4)


def _cluster_datapath_row(b: Board) -> None:
    b.row("Datapath by node")
    b.timeseries("Drops per node (top 10)", "The ten nodes dropping the most packets per second, all reasons. "
                 "Orange: 50/s for 10 minutes is the DpwatchPacketDropsHigh alert.",
                 "pps", levels((ORANGE, 50), (RED, 1000)),
                 target(f"topk(10, sum by (instance) ({rate('dpwatch_skb_drops_total', CLUSTER)}))", "{{instance}}"))
    b.timeseries("Conntrack fill per node", "Conntrack entries / nf_conntrack_max, per node (worst netns).",
                 "percentunit", levels((ORANGE, 0.8), (RED, 0.95)),
                 target(f"max by (instance) (dpwatch_conntrack_entries{{{CLUSTER}}} / "
                        f"dpwatch_conntrack_max_entries{{{CLUSTER}}})", "{{instance}}"))
    b.timeseries("Conntrack drops per node", "Packets dropped because the conntrack table was full.",
                 "pps", levels((RED, 0.001)),
                 target(f"sum by (instance) ({rate('dpwatch_conntrack_drops_total', CLUSTER)})", "{{instance}}"))
    b.timeseries("Fragments created per node", "IP fragments created per second (orange from 1/s: "
                 "DpwatchFragmentationActive).",
                 "pps", levels((ORANGE, 1)),
                 target(f"sum by (instance) ({rate('dpwatch_ip_fragments_created_total', CLUSTER)})", "{{instance}}"))
    b.timeseries("Softnet backlog drops per node", "Packets dropped at a full input backlog "
                 "(DpwatchSoftnetDrops).",
                 "pps", levels((RED, 0.001)),
                 target(f"sum by (instance) ({rate('dpwatch_softnet_dropped_total', CLUSTER)})", "{{instance}}"))
    b.timeseries("Busiest CPU's network softirq share per node", "Per node, the highest share of one CPU spent "
                 "in NET_RX/NET_TX. Near 1 means receive processing is bound to one saturated CPU.",
                 "percentunit", levels((ORANGE, 0.5), (RED, 0.9)),
                 target(f"max by (instance) (sum by (instance, cpu) "
                        f"({rate('dpwatch_softirq_seconds_total', CLUSTER, NET_VECTORS)}))", "{{instance}}"))
    b.timeseries("Worst CPU steal per node", "Per node, the most-stolen vCPU (orange at 5%: cpu.steal).",
                 "percentunit", levels((ORANGE, 0.05), (RED, 0.2)),
                 target(f"max by (instance) ({rate('dpwatch_cpu_steal_seconds_total', CLUSTER)})", "{{instance}}"))


def _cluster_dns_row(b: Board) -> None:
    b.row("DNS by node")
    b.timeseries("DNS p99 per node", "99th percentile DNS response time per node (orange: 200 ms, "
                 "DpwatchDNSLatencyHigh).",
                 "s", levels((ORANGE, 0.2), (RED, 1)),
                 target("histogram_quantile(0.99, sum by (instance, le) "
                        f"({rate('dpwatch_dns_request_duration_seconds_bucket', CLUSTER)}))", "{{instance}}"))
    b.timeseries("DNS timeouts per node", "Share of DNS queries never answered (orange at 1%: "
                 "DpwatchDNSTimeouts).",
                 "percentunit", levels((ORANGE, 0.01), (RED, 0.05)),
                 target(f"sum by (instance) ({rate('dpwatch_dns_timeouts_total', CLUSTER)}) / "
                        f"sum by (instance) ({rate('dpwatch_dns_queries_total', CLUSTER)})", "{{instance}}"))
    b.timeseries("DNS SERVFAIL + REFUSED per node", "Share of DNS responses that are SERVFAIL or REFUSED "
                 "(orange at 5%: DpwatchDNSErrors).",
                 "percentunit", levels((ORANGE, 0.05), (RED, 0.2)),
                 target(f"sum by (instance) ({rate('dpwatch_dns_responses_total', CLUSTER, RCODE_ERRORS)}) / "
                        f"sum by (instance) ({rate('dpwatch_dns_responses_total', CLUSTER)})", "{{instance}}"))


def _cluster_inventory_row(b: Board) -> None:
    b.row("Inventory")
    b.table("Nodes: dpwatch version and kernel", "dpwatch_build_info per node: the dpwatch version and the "
            "running kernel (the probes' modes depend on it). Value 1 is green; a node missing here is not "
            "scraped.",
            "none", levels((GREEN, 1), base=RED),
            target(f"max by (instance, version, kernel) (dpwatch_build_info{{{CLUSTER}}})", instant=True, fmt="table"),
            w=24, h=8)


def cluster_dashboard() -> dict:
    b = Board()
    _cluster_fleet_row(b)
    _cluster_datapath_row(b)
    _cluster_dns_row(b)
    _cluster_inventory_row(b)
    return dashboard("dpwatch-cluster", "dpwatch / Cluster overview",
                     "Every node dpwatch watches: which are down, which drop, whose conntrack or DNS is in "
                     "trouble. Pick a node, then open dpwatch / Node datapath for it.", b, instance_multi=True,
                     links=[link("dpwatch dashboards", "dpwatch")])


DASHBOARDS = {"dpwatch-node.json": node_dashboard, "dpwatch-cluster.json": cluster_dashboard}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run: .venv/bin/python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
