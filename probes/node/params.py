"""The node probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "node audit"

PARAMS = (
    Param("node-audit-interval", "duration", 60.0,
          "how often the node audit (sysctls, sockets, netfilter rules) runs", min=5, max=3600),
    Param("netfilter-rules-warning", "int", 10000,
          "netfilter rules (nftables plus iptables-legacy) that raise netfilter.rule_count_high",
          min=1, max=10_000_000),
)
