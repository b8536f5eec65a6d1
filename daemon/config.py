"""Configuration: one dataclass, filled from flags or DPWATCH_* environment variables.

Every value is validated here, so a bad flag or variable names the problem and the process
exits non-zero before anything touches the kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from dpwatch.probes.registry import probe_names


class ConfigError(ValueError):
    pass


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str, name: str = "duration") -> float:
    """'30s', '5m', '1h', '500ms', '90' (seconds) -> seconds. Raises ConfigError."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ConfigError(f"{name}: {text!r} is not a duration; use a number with a unit "
                          "such as 500ms, 30s, 5m or 1h")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


DEFAULT_UNIX_SOCKET = "/run/dpwatch/dpwatch.sock"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes, with the terminating NUL


def check_unix_socket(path: str, flag: str = "--unix-socket") -> str:
    """'' (off) or an absolute path short enough for sun_path. Raises ConfigError."""
    if not path:
        return ""
    if not path.startswith("/") or "\0" in path:
        raise ConfigError(f"{flag}: {path!r} is not an absolute path ('' turns the socket off)")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"{flag}: {path!r} is longer than the {UNIX_PATH_MAX} bytes a unix socket path can have")
    if path.endswith("/"):
        raise ConfigError(f"{flag}: {path!r} names a directory, not a socket file")
    return path


def parse_listen(text: str) -> tuple[str, int]:
    """'0.0.0.0:9400', ':9400', '[::]:9400', '127.0.0.1:0' -> (host, port)."""
    m = re.match(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$", text.strip())
    if not m:
        raise ConfigError(f"--listen: {text!r} is not HOST:PORT (e.g. 0.0.0.0:9400 or [::]:9400)")
    port = int(m.group("port"))
    if port > 65535:
        raise ConfigError(f"--listen: port {port} is out of range 0-65535")
    host = m.group("v6") or m.group("host") or "0.0.0.0"
    return host, port


def parse_probe_list(text: str | list[str], flag: str) -> list[str]:
    items = text if isinstance(text, list) else [p for p in re.split(r"[,\s]+", text) if p]
    known = probe_names()
    bad = [p for p in items if p not in known and p != "all"]
    if bad:
        raise ConfigError(f"{flag}: unknown probe(s) {', '.join(bad)}; known: {', '.join(known)}")
    if "all" in items:
        return list(known)
    return items


def parse_ports(value: str | list, flag: str) -> list[int]:
    """'53,5353' or [53, 5353] -> [53, 5353]: 1 to 8 distinct UDP ports in 1..65535."""
    items = value if isinstance(value, list) else [p for p in re.split(r"[,\s]+", str(value)) if p]
    ports: list[int] = []
    for item in items:
        try:
            port = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag}: {item!r} is not a port number") from None
        if not 1 <= port <= 65535:
            raise ConfigError(f"{flag}: port {port} is outside 1..65535")
        if port not in ports:
            ports.append(port)
    if not 1 <= len(ports) <= 8:
        raise ConfigError(f"{flag}: give 1 to 8 ports (got {len(ports)})")
    return ports


@dataclass
class Config:
    listen: str = "0.0.0.0:9400"
    probes: list[str] = field(default_factory=probe_names)
    disable: list[str] = field(default_factory=list)
    require: list[str] = field(default_factory=list)
    strict: bool = False
    snapshot_interval: float = 5.0
    max_window: float = 3600.0
    default_window: float = 60.0
    drops_rate_warning: float = 50.0
    drops_rate_critical: float = 1000.0
    drops_location_entries: int = 1024
    drops_other_entries: int = 256
    drops_location_sample: int = 16
    log_level: str = "info"
    report_format: str = "text"  # `dpwatch diagnose --format`
    report_url: str = ""         # `dpwatch diagnose --url`: ask a running daemon
    report_window_given: bool = False  # --window given with --url (else the daemon's default)
    conntrack_all_netns: bool = False
    conntrack_max_netns: int = 64
    conntrack_recent_entries: int = 256
    conntrack_full_percent: float = 95.0
    conntrack_pressure_percent: float = 80.0
    frag_rate_warning: float = 1.0
    mtu_all_netns: bool = False
    mtu_max_netns: int = 64
    mtu_audit_interval: float = 30.0
    mtu_recent_entries: int = 256
    mtu_max_interfaces: int = 512
    dns_ports: list[int] = field(default_factory=lambda: [53])  # UDP server ports the DNS probe parses
    dns_timeout: float = 5.0              # a query unanswered this long is a timeout
    dns_names: str = "suffix"             # privacy mode of names in /diagnose: full, suffix, hashed, off
    dns_top_servers: int = 10             # servers with their own `server` label; the rest "other"
    dns_hook: str = "auto"                # auto (tcx, else socket), tcx, socket or tc
    dns_pending_entries: int = 16384      # in-kernel LRU of outstanding queries
    dns_names_entries: int = 1024         # in-kernel LRU of recent names
    dns_servers_entries: int = 256        # in-kernel LRU of per-server counters
    dns_latency_p99: float = 0.2          # seconds: p99 at or above raises dns.latency_high
    dns_timeout_percent: float = 1.0      # timeouts (% of queries) that raise dns.timeouts
    dns_error_percent: float = 1.0        # SERVFAIL+REFUSED (% of responses) that raise dns.errors
    dns_nxdomain_percent: float = 20.0    # NXDOMAIN (% of responses) that raise dns.nxdomain_rate
    dns_search_nxdomain_min: int = 10     # NXDOMAIN of all search-list walks in a window: amplification
    dns_cluster_domain: str = "cluster.local"
    dns_resolv_conf: str = "/etc/resolv.conf"  # the node's search list is read from here
    node_audit_interval: float = 60.0    # how often the node audit runs (sampler thread)
    netfilter_rules_warning: int = 10000  # netfilter rules that raise netfilter.rule_count_high
    softirq_hooks: str = "auto"           # auto, raw_tracepoint, tracepoint or procfs
    softirq_saturated_percent: float = 50.0
    softirq_imbalance_ratio: float = 1.5
    softirq_latency_threshold: float = 0.001  # seconds
    softirq_squeeze_rate: float = 1.0     # time squeezes per second
    softirq_steal_percent: float = 5.0
    softirq_napi_devices: int = 256
    softirq_sample: int = 8               # time one softirq run in N (power of two)
    bpf_stats: bool = False       # export per-program run time (enables kernel BPF stats)
    synthetic_series: int = 0     # benchmark only: extra synthetic series on /metrics
    # HTTP hardening (daemon/httpsec.py) and bounds (daemon/limits.py)
    web_config_file: str = ""     # exporter-toolkit web config: TLS, basic auth, headers
    restrict_diagnose: str = "off"  # "loopback": /diagnose and /probes for loopback clients only
    diagnose_token: str = field(default="", repr=False)  # or a token (X-Dpwatch-Token / Bearer)
    max_concurrent_requests: int = 16
    max_series_per_metric: int = 2000
    # Reachable while the conntrack table is full (daemon/notrack.py, daemon/unixsock.py)
    notrack: bool = True          # nftables table inet dpwatch: the listen port kept out of conntrack
    unix_socket: str = DEFAULT_UNIX_SOCKET  # the API on a unix socket too ('' = off); diagnose asks it

    def validate(self) -> "Config":
        parse_listen(self.listen)
        self.probes = parse_probe_list(self.probes, "--probes")
        self.disable = parse_probe_list(self.disable, "--disable")
        self.require = parse_probe_list(self.require, "--require")
        off = [p for p in self.require if p in self.disable or p not in self.probes]
        if off:
            raise ConfigError(f"--require: probe(s) {', '.join(off)} are required but not enabled")
        if not 0.2 <= self.snapshot_interval <= 300:
            raise ConfigError(f"--snapshot-interval: {self.snapshot_interval}s is outside 0.2s..300s")
        if not self.snapshot_interval <= self.max_window <= 7 * 86400:
            raise ConfigError(f"--max-window: {self.max_window}s must be between the snapshot "
                              "interval and 7d")
        if not 1 <= self.default_window <= self.max_window:
            raise ConfigError(f"--window: {self.default_window}s must be between 1s and "
                              f"--max-window ({self.max_window:g}s)")
        if self.drops_rate_warning <= 0 or self.drops_rate_critical < self.drops_rate_warning:
            raise ConfigError("--drops-rate-warning must be > 0 and <= --drops-rate-critical")
        if not 0 <= self.drops_location_entries <= 65536:
            raise ConfigError("--drops-location-entries must be within 0..65536 (0 turns it off)")
        s = self.drops_location_sample
        if not (1 <= s <= 4096 and s & (s - 1) == 0):
            raise ConfigError(f"--drops-location-sample: {s} must be a power of two within 1..4096")
        if not 1 <= self.drops_other_entries <= 65536:
            raise ConfigError("--drops-other-entries must be within 1..65536")
        if not 1 <= self.conntrack_max_netns <= 4096:
            raise ConfigError("--conntrack-max-netns must be within 1..4096")
        if not 1 <= self.conntrack_recent_entries <= 65536:
            raise ConfigError("--conntrack-recent-entries must be within 1..65536")
        if not 0 < self.conntrack_pressure_percent <= self.conntrack_full_percent <= 100:
            raise ConfigError("conntrack thresholds: need 0 < --conntrack-pressure-percent <= "
                              "--conntrack-full-percent <= 100")
        if self.frag_rate_warning <= 0:
            raise ConfigError("--frag-rate-warning must be > 0 (fragments per second)")
        if not 1 <= self.mtu_max_netns <= 4096:
            raise ConfigError("--mtu-max-netns must be within 1..4096")
        if not 5 <= self.mtu_audit_interval <= 3600:
            raise ConfigError(f"--mtu-audit-interval: {self.mtu_audit_interval}s is outside 5s..1h")
        if not 5 <= self.node_audit_interval <= 3600:
            raise ConfigError(f"--node-audit-interval: {self.node_audit_interval}s is outside 5s..1h")
        if not 1 <= self.netfilter_rules_warning <= 10_000_000:
            raise ConfigError("--netfilter-rules-warning must be within 1..10000000")
        if not 1 <= self.mtu_recent_entries <= 65536:
            raise ConfigError("--mtu-recent-entries must be within 1..65536")
        if self.softirq_hooks not in ("auto", "raw_tracepoint", "tracepoint", "procfs"):
            raise ConfigError(f"--softirq-hooks: {self.softirq_hooks!r} is not auto, raw_tracepoint, "
                              "tracepoint or procfs")
        if not 0 < self.softirq_saturated_percent <= 100:
            raise ConfigError(f"--softirq-saturated-percent: {self.softirq_saturated_percent:g} is outside (0, 100]")
        if not self.softirq_imbalance_ratio > 1:
            raise ConfigError(f"--softirq-imbalance-ratio: {self.softirq_imbalance_ratio:g} must be > 1 "
                              "(the busiest CPU's net softirq time over the mean of all CPUs)")
        if not 1e-6 <= self.softirq_latency_threshold <= 10:
            raise ConfigError(f"--softirq-latency-threshold: {self.softirq_latency_threshold:g}s is "
                              "outside 1us..10s")
        if not self.softirq_squeeze_rate > 0:
            raise ConfigError("--softirq-squeeze-rate must be > 0 (time squeezes per second)")
        if not 0 < self.softirq_steal_percent <= 100:
            raise ConfigError(f"--softirq-steal-percent: {self.softirq_steal_percent:g} is outside (0, 100]")
        if not 1 <= self.softirq_napi_devices <= 65536:
            raise ConfigError("--softirq-napi-devices must be within 1..65536")
        n = self.softirq_sample
        if not (1 <= n <= 1024 and n & (n - 1) == 0):
            raise ConfigError(f"--softirq-sample: {n} must be a power of two within 1..1024")
        self._validate_dns()
        if not 0 <= self.synthetic_series <= 1_000_000:
            raise ConfigError("--synthetic-series must be within 0..1000000")
        if self.restrict_diagnose not in ("off", "loopback"):
            raise ConfigError(f"--restrict-diagnose: {self.restrict_diagnose!r} is not off or loopback")
        if not 1 <= self.max_concurrent_requests <= 4096:
            raise ConfigError(f"--max-concurrent-requests: {self.max_concurrent_requests} is outside 1..4096")
        if not 1 <= self.max_series_per_metric <= 1_000_000:
            raise ConfigError(f"--max-series-per-metric: {self.max_series_per_metric} is outside 1..1000000")
        self.unix_socket = check_unix_socket(self.unix_socket)
        if self.web_config_file:
            from dpwatch.daemon.httpsec import load_web_config
            load_web_config(self.web_config_file)  # raises ConfigError naming the problem
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"--log-level: {self.log_level!r} is not debug, info, warning or error")
        return self

    def _validate_dns(self) -> None:
        self.dns_ports = parse_ports(self.dns_ports, "--dns-ports")
        if not 0.1 <= self.dns_timeout <= 300:
            raise ConfigError(f"--dns-timeout: {self.dns_timeout:g}s is outside 100ms..300s")
        if self.dns_names not in ("full", "suffix", "hashed", "off"):
            raise ConfigError(f"--dns-names: {self.dns_names!r} is not full, suffix, hashed or off")
        if self.dns_hook not in ("auto", "tcx", "tc", "socket"):
            raise ConfigError(f"--dns-hook: {self.dns_hook!r} is not auto, tcx, socket or tc")
        if not 0 <= self.dns_top_servers <= 1000:
            raise ConfigError(f"--dns-top-servers: {self.dns_top_servers} is outside 0..1000")
        for flag, value, lo, hi in (("--dns-pending-entries", self.dns_pending_entries, 64, 1 << 20),
                                    ("--dns-names-entries", self.dns_names_entries, 16, 65536),
                                    ("--dns-servers-entries", self.dns_servers_entries, 4, 65536),
                                    ("--dns-search-nxdomain-min", self.dns_search_nxdomain_min, 2, 1 << 30)):
            if not lo <= value <= hi:
                raise ConfigError(f"{flag}: {value} is outside {lo}..{hi}")
        if not 0.0001 <= self.dns_latency_p99 <= 60:
            raise ConfigError(f"--dns-latency-p99: {self.dns_latency_p99:g}s is outside 100us..60s")
        for flag, value in (("--dns-timeout-percent", self.dns_timeout_percent),
                            ("--dns-error-percent", self.dns_error_percent),
                            ("--dns-nxdomain-percent", self.dns_nxdomain_percent)):
            if not 0 < value <= 100:
                raise ConfigError(f"{flag}: {value:g} is outside (0, 100]")
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$",
                        self.dns_cluster_domain or ""):
            raise ConfigError(f"--dns-cluster-domain: {self.dns_cluster_domain!r} is not a domain name")

    @property
    def enabled_probes(self) -> list[str]:
        return [p for p in self.probes if p not in self.disable]

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
