"""The frag probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "frag probe"

PARAMS = (
    Param("frag-rate-warning", "float", 1.0,
          "fragments created per second that raise frag.fragmentation_active",
          min=0, min_exclusive=True, hint="fragments per second"),
)
