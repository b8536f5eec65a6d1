"""The mtu probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "mtu probe"

PARAMS = (
    Param("mtu-all-netns", "bool", False,
          "audit links in every netns (pod sides of veth pairs included), not just the daemon's"),
    Param("mtu-audit-interval", "duration", 30.0, "how often the MTU audit runs", min=5, max=3600),
    Param("mtu-max-netns", "int", 64, "most namespaces audited with --mtu-all-netns",
          min=1, max=4096, cli=False),
    Param("mtu-recent-entries", "int", 256, "LRU of recent frag-needed events", min=1, max=65536,
          cli=False),
    Param("mtu-max-interfaces", "int", 512, "interfaces with their own interface_mtu series",
          min=1, max=65536, cli=False),
)
