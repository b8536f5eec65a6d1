"""The drops probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "drops probe"

PARAMS = (
    Param("drops-rate-warning", "float", 50.0, "drops/s over the window that raise drops.top_reasons",
          min=0, min_exclusive=True),
    Param("drops-rate-critical", "float", 1000.0, "drops/s that make a drops finding critical",
          min=0, min_exclusive=True),
    Param("drops-location-entries", "int", 1024,
          "LRU entries of drop locations kept in kernel; 0 turns it off", min=0, max=65536),
    Param("drops-location-sample", "int", 16,
          "after the first 64 drops of a reason on a CPU, record the location of one drop in N "
          "(a power of two; 1 = every drop)", min=1, max=4096, power_of_two=True),
    Param("drops-other-entries", "int", 256,
          "entries of the in-kernel hash for reasons above the named ones", min=1, max=65536),
)


def check_rates(cfg, error) -> None:
    if cfg.drops_rate_critical < cfg.drops_rate_warning:
        raise error("--drops-rate-warning must be > 0 and <= --drops-rate-critical")


CHECKS = (check_rates,)
