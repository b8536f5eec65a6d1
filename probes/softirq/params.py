"""The softirq probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "softirq probe"

PARAMS = (
    Param("softirq-hooks", "choice", "auto",
          "auto (the cheapest the kernel has), raw_tracepoint, tracepoint, or procfs (no BPF: "
          "softnet_stat and /proc/stat only)",
          choices=("auto", "raw_tracepoint", "tracepoint", "procfs")),
    Param("softirq-saturated-percent", "float", 50.0,
          "share of a CPU's time in NET_RX+NET_TX that raises softirq.cpu_saturated",
          min=0, max=100, min_exclusive=True),
    Param("softirq-imbalance-ratio", "float", 1.5,
          "busiest CPU's net softirq time over the mean of all CPUs that raises softirq.imbalance",
          min=1, min_exclusive=True,
          hint="the busiest CPU's net softirq time over the mean of all CPUs"),
    Param("softirq-latency-threshold", "duration", 0.001,
          "p99 raise-to-run latency of NET_RX/NET_TX that raises softirq.latency_high",
          min=1e-6, max=10),
    Param("softirq-squeeze-rate", "float", 1.0,
          "time squeezes per second that raise softnet.time_squeeze",
          min=0, min_exclusive=True, hint="time squeezes per second"),
    Param("softirq-steal-percent", "float", 5.0, "CPU steal share that raises cpu.steal",
          min=0, max=100, min_exclusive=True),
    Param("softirq-napi-devices", "int", 256,
          "devices counted by name for NAPI budget exhaustion; more are counted as device "
          "\"(overflow)\"", min=1, max=65536),
    Param("softirq-sample", "int", 8,
          "time one softirq run in N per CPU and vector (a power of two; 1 = every run; runs are "
          "always counted)", min=1, max=1024, power_of_two=True),
)
