"""The conntrack probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "conntrack probe"

PARAMS = (
    Param("conntrack-all-netns", "bool", False,
          "watch every netns under /run/netns and /proc/*/ns/net, labelled by netns inode "
          "(default: only the daemon's own)"),
    Param("conntrack-max-netns", "int", 64, "most namespaces watched with --conntrack-all-netns",
          min=1, max=4096),
    Param("conntrack-pressure-percent", "float", 80.0, "table fill that raises conntrack.table_pressure",
          min=0, max=100, min_exclusive=True),
    Param("conntrack-full-percent", "float", 95.0, "table fill that raises conntrack.table_full",
          min=0, max=100, min_exclusive=True),
    Param("conntrack-recent-entries", "int", 256, "LRU of recent single drops (kprobe mode)",
          min=1, max=65536, cli=False),
)


def check_fill(cfg, error) -> None:
    if not cfg.conntrack_pressure_percent <= cfg.conntrack_full_percent:
        raise error("conntrack thresholds: need 0 < --conntrack-pressure-percent <= "
                    "--conntrack-full-percent <= 100")


CHECKS = (check_fill,)
