"""drops: packet drops by the kernel's own drop reason (tracepoint skb:kfree_skb).

Reason names come from the running kernel: the tracepoint format's __print_symbolic list,
or else the BTF enum skb_drop_reason. Numbers differ between kernels, so there is no table
here. Kernel side: bpf/drops.c, with the constants both sides share in bpf/drops.h.
Findings: probes/drops/findings.py.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily

from dpwatch.daemon.host import paths, sysctl
from dpwatch.daemon.host.kallsyms import KallsymsResolver
from dpwatch.daemon.host import tracefs
from dpwatch.probes import cdefs
from dpwatch.probes.drops import findings
from dpwatch.probes.drops.findings import NOT_DROPS
from dpwatch.probes.drops import params as params_mod
from dpwatch.probes.drops import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window

# Protocol class index -> name: DROPS_PCLASS_* of bpf/drops.h ("ipv4", "ipv6", "arp", "other").
PROTOCOLS = cdefs.names_by_value("drops.h", "DROPS_PCLASS_", "DROPS_PCLASSES")
# Per CPU and (reason, protocol): locations of the first drops are all recorded (bpf/drops.h).
LOC_EXACT = cdefs.defines("drops.h")["DROPS_LOC_EXACT"]
MAX_DENSE_REASONS = 1024
SUBSYS_SHIFT = 16  # enum skb_drop_reason_subsys: reason = (subsys << 16) | code


def load_reason_names(tracefs_path: str | None = None) -> tuple[dict[int, str], str]:
    """Drop reason value -> name from the running kernel, and where the names came from."""
    fmt = tracefs.read_format("skb", "kfree_skb", tracefs_path)
    if fmt is not None:
        names = fmt.symbolic("reason")
        if names:
            return names, "tracefs:skb/kfree_skb/format"
    try:
        from dpwatch.daemon.host import btf
        members = btf.read_enum("skb_drop_reason")
    except Exception:  # a malformed BTF blob must not stop the probe
        members = None
    if members:
        return btf.strip_prefix(members, "SKB_DROP_REASON_"), "btf:enum skb_drop_reason"
    return {}, "none (reasons shown as numbers)"


def protocol_name(pclass: int) -> str:
    """A protocol class of bpf/drops.h by name; an index the header does not know is "other"."""
    return PROTOCOLS[pclass] if 0 <= pclass < len(PROTOCOLS) else "other"


def reason_name(names: dict[int, str], value: int) -> str:
    name = names.get(value)
    if name:
        return name
    if value >> SUBSYS_SHIFT:
        return f"SUBSYS_{value >> SUBSYS_SHIFT}_{value & 0xFFFF}"
    return f"UNKNOWN_{value}"


class DropsProbe(Probe):
    name = "drops"
    bpf_source = "drops.c"
    description = "packet drops by kernel drop reason and protocol, with top drop locations"
    finding_ids = ('drops.socket_receive_buffer', 'drops.listen_overflow', 'drops.netfilter', 'drops.top_reasons')
    chart_series = charts.SERIES
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    param_checks = params_mod.CHECKS
    modes = (
        Mode("tracepoint",
             (Hook("tracepoint", "skb:kfree_skb"), Hook("tracepoint_field", "skb:kfree_skb:reason")),
             "skb:kfree_skb with the reason field"),
        Mode("tracepoint-noreason", (Hook("tracepoint", "skb:kfree_skb"),),
             "skb:kfree_skb has no reason field (kernel before 5.17): drops counted without reasons",
             degraded=True),
    )
    error_slots = {"DROPS_ERR_OTHER": "drops_other", "DROPS_ERR_LOC": "drops_locs"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.names: dict[int, str] = {}
        self.name_source = ""
        self.max_reason = 1
        self.kallsyms = KallsymsResolver(paths.proc("kallsyms"))
        # read in collect, not in a finding (diagnose reads nothing)
        self._sysctls = sysctl.Watched(findings.SYSCTLS)

    def cflags(self, features) -> list[str]:
        if self.mode is not None and self.mode.name == "tracepoint":
            self.names, self.name_source = load_reason_names(features.tracefs)
            # Dense array for every named reason; anything above goes to the small hash.
            top = max(self.names, default=0)
            self.max_reason = max(1, min(MAX_DENSE_REASONS, top + 1))
            flags = ["-DDROPS_HAVE_REASON=1"]
            consumed = [v for v, n in self.names.items() if n == "CONSUMED"]
            if consumed:
                flags.append(f"-DDROPS_CONSUMED={consumed[0]}")
        else:
            self.names, self.name_source = {0: "UNKNOWN"}, "no reason field on this kernel"
            self.max_reason = 1
            flags = []
        flags += [
            f"-DDROPS_MAX_REASON={self.max_reason}",
            f"-DDROPS_OTHER_MAX={int(self.config.drops_other_entries)}",
            f"-DDROPS_LOC_MAX={int(self.config.drops_location_entries)}",
            f"-DDROPS_LOC_SAMPLE={int(self.config.drops_location_sample)}",
        ]
        return flags

    # -- collection -----------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        drops: dict[tuple[str, str], int] = {}
        counts = self.table("drops_counts")
        for key, per_cpu in counts.items():
            total = sum(per_cpu)
            if not total:
                continue
            idx = key.value
            pclass, reason = divmod(idx, self.max_reason)
            k = (reason_name(self.names, reason), protocol_name(pclass))
            drops[k] = drops.get(k, 0) + total
        for key, per_cpu in self.table("drops_other").items():
            total = sum(per_cpu)
            k = (reason_name(self.names, key.reason), protocol_name(key.pclass))
            drops[k] = drops.get(k, 0) + total
        locations: dict[tuple[int, str], int] = {}
        if int(self.config.drops_location_entries) > 0:
            for key, value in self.table("drops_locs").items():
                locations[(int(key.location), reason_name(self.names, key.reason))] = int(value.value)
        return {"counters": {"drops": drops, "locations": locations}, "gauges": {},
                "info": {"sysctls": self._sysctls.read()}}


    def metrics(self, reading: Reading) -> Iterable:
        fam = CounterMetricFamily(
            "dpwatch_skb_drops", "Packets dropped by the kernel (skb:kfree_skb), by drop reason "
            "and protocol (ipv4, ipv6, arp, other).", labels=["reason", "protocol"])
        for (reason, proto), value in sorted(reading["counters"]["drops"].items()):
            if reason not in NOT_DROPS:
                fam.add_metric([reason, proto], value)
        yield fam

    def info(self) -> dict[str, Any]:
        return {"reason_names": len(self.names), "reason_name_source": self.name_source,
                "dense_reasons": self.max_reason,
                "location_entries": int(self.config.drops_location_entries),
                "location_sample": int(self.config.drops_location_sample)}

    # -- findings ---------------------------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        """One function per finding id (findings.py) over this window and the sysctls collect()
        read; kernel addresses are named through the cached kallsyms resolver."""
        cfg = self.config
        w = findings.DropsWindow.of(window, self.kallsyms.resolve)
        found = [findings.socket_receive_buffer(w, cfg.drops_rate_critical),
                 findings.listen_overflow(w, cfg.drops_rate_critical),
                 findings.netfilter(w, cfg.drops_rate_critical),
                 findings.top_reasons(w, cfg.drops_rate_warning, cfg.drops_rate_critical,
                                      getattr(cfg, "enabled_probes", ()))]
        return [f for f in found if f is not None]
