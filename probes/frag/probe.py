"""frag: IP fragmentation and reassembly, from the kernel's own counters.

Counters: /proc/net/snmp (Ip: FragCreates, FragOKs, FragFails, ReasmReqds, ReasmOKs,
ReasmFails, ReasmTimeout; Icmp: In/OutDestUnreachs) and /proc/net/snmp6 (the Ip6 and Icmp6
equivalents), of the daemon's own netns. The frag-related drop reasons (PKT_TOO_BIG,
FRAG_REASM_TIMEOUT, DUP_FRAG, FRAG_TOO_FAR) come from the drops probe's maps when it is
attached: the same skb:kfree_skb attach, read again, never a second one. The reassembly
sysctls (ipfrag_time, ipfrag_high_thresh) are read in collect, into the reading's info.
Findings: probes/frag/findings.py (one function per finding id).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily

from dpwatch.daemon.host import paths, sysctl
from dpwatch.daemon.host.snmp import SnmpFiles
from dpwatch.probes.drops.readings import reason_totals
from dpwatch.probes.frag import params as params_mod
from dpwatch.probes.frag import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window
from dpwatch.probes.frag import findings
from dpwatch.probes.frag.findings import FRAG_DROP_REASONS, SYSCTLS

# Our counter name -> (snmp table, key) for IPv4, and the snmp6 key for IPv6.
COUNTERS = {
    "frag_creates": (("Ip", "FragCreates"), "Ip6FragCreates"),
    "frag_oks": (("Ip", "FragOKs"), "Ip6FragOKs"),
    "frag_fails": (("Ip", "FragFails"), "Ip6FragFails"),
    "reasm_reqds": (("Ip", "ReasmReqds"), "Ip6ReasmReqds"),
    "reasm_oks": (("Ip", "ReasmOKs"), "Ip6ReasmOKs"),
    "reasm_fails": (("Ip", "ReasmFails"), "Ip6ReasmFails"),
    "reasm_timeout": (("Ip", "ReasmTimeout"), "Ip6ReasmTimeout"),
    "dest_unreach_in": (("Icmp", "InDestUnreachs"), "Icmp6InDestUnreachs"),
    "dest_unreach_out": (("Icmp", "OutDestUnreachs"), "Icmp6OutDestUnreachs"),
}


def parse_sockstat_frag(text: str, tag: str) -> int | None:
    """Bytes held by IP reassembly: the memory of the ``tag`` line ("FRAG:" in /proc/net/sockstat,
    "FRAG6:" in sockstat6: 'FRAG: inuse 5 memory 21736'), None when there is none."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == tag:
            fields = dict(zip(parts[1::2], parts[2::2]))
            try:
                return int(fields["memory"])
            except (KeyError, ValueError):
                return None
    return None


def counters_from_snmp(v4: dict[str, dict[str, int]], v6: dict[str, int]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for name, ((table, key), key6) in COUNTERS.items():
        if key in v4.get(table, {}):
            out[(name, "ipv4")] = v4[table][key]
        if key6 in v6:
            out[(name, "ipv6")] = v6[key6]
    return out


class FragProbe(Probe):
    name = "frag"
    bpf_source = None
    description = "IP fragments created, fragmentation failures, reassembly failures and timeouts"
    finding_ids = ('frag.fragmentation_active', 'frag.fragmentation_failed', 'frag.reassembly_failures')
    chart_series = charts.SERIES
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    # frag drop reasons (DUP_FRAG, FRAG_TOO_FAR, ...) from drops; the node's own links from mtu's audit
    needs = ("drops", "mtu")
    modes = (
        Mode("snmp", (Hook("procfs", paths.proc("net", "snmp")),),
             "kernel snmp counters of the daemon's netns, plus frag drop reasons from the drops probe",
             bpf=False),
    )

    def __init__(self, config: Any):
        super().__init__(config)
        self.files: SnmpFiles | None = None
        self._sockstat: dict[str, Any] = {}  # family -> held /proc/thread-self/net/sockstat(6)
        self._sysctls = sysctl.Watched(SYSCTLS)  # read in collect, quoted by the findings

    def attach(self, module) -> None:
        self.module = module
        self._attached = []
        self.files = SnmpFiles()  # bound to the attaching thread's netns
        for family, name in (("ipv4", "sockstat"), ("ipv6", "sockstat6")):
            try:
                self._sockstat[family] = open(paths.proc("thread-self", "net", name), "rb", buffering=0)
            except OSError:  # IPv6 disabled: no reassembly memory to read
                pass

    def close(self) -> None:
        if self.files:
            self.files.close()
            self.files = None
        for fh in self._sockstat.values():
            fh.close()
        self._sockstat.clear()
        super().close()

    def collect(self, inputs=None) -> Reading:
        v4, v6 = self.files.read()
        counters: dict[str, dict] = {"snmp": counters_from_snmp(v4, v6)}
        if "drops" in (inputs or {}):
            counters["drop_reasons"] = reason_totals(inputs["drops"], FRAG_DROP_REASONS)
        memory: dict[tuple[str], int] = {}
        for family, fh in self._sockstat.items():
            try:
                value = parse_sockstat_frag(os.pread(fh.fileno(), 1 << 14, 0).decode(),
                                            "FRAG:" if family == "ipv4" else "FRAG6:")
            except OSError:
                value = None
            if value is not None:
                memory[(family,)] = value
        # read here, not in a finding: frag.reassembly_failures quotes them (None: unreadable)
        info: dict[str, Any] = {"sysctls": self._sysctls.read()}
        if "mtu" in (inputs or {}):
            info["mtu_links"] = list(inputs["mtu"].get("info", {}).get("own_links", []))
        return {"counters": counters, "gauges": {"frag_memory": memory}, "info": info}

    def metrics(self, reading: Reading) -> Iterable:
        fams = {
            "frag_creates": ("dpwatch_ip_fragments_created", "IP fragments this node created."),
            "frag_fails": ("dpwatch_ip_fragmentation_failed", "Packets that needed fragmenting but "
                           "could not be (DF set, or IPv6 in transit): dropped."),
            "reasm_fails": ("dpwatch_ip_reassembly_failed", "Reassembly failures (fragments dropped)."),
            "reasm_timeout": ("dpwatch_ip_reassembly_timeouts", "Fragment sets that timed out "
                              "incomplete (ipfrag_time)."),
            "reasm_reqds": ("dpwatch_ip_fragments_received", "IP fragments received for reassembly."),
        }
        out = {k: CounterMetricFamily(n, h, labels=["family"]) for k, (n, h) in fams.items()}
        unreach = CounterMetricFamily("dpwatch_icmp_dest_unreachable", "ICMP destination unreachable "
                                      "messages, by direction.", labels=["family", "direction"])
        for (name, family), value in sorted(reading["counters"]["snmp"].items()):
            if name in out:
                out[name].add_metric([family], value)
            elif name == "dest_unreach_in":
                unreach.add_metric([family, "received"], value)
            elif name == "dest_unreach_out":
                unreach.add_metric([family, "sent"], value)
        yield from out.values()
        yield unreach

    def diagnose(self, window: Window) -> list[Finding]:
        found = (findings.fragmentation_active(window, self.config.frag_rate_warning),
                 findings.fragmentation_failed(window),
                 findings.reassembly_failures(window))
        return [f for f in found if f is not None]
