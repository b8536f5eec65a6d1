"""Configuration: one dataclass, filled from flags or DPWATCH_* environment variables.

The daemon's own settings are the fields of ``DaemonConfig`` below. Each probe's settings are
declared once, in ``probes/<name>/params.py``; ``Config`` adds them as fields (named after the
flag with "_" for "-") and ``validate()`` checks them from the same
declarations. Every value is validated here, so a bad flag or variable names the problem and
the process exits non-zero before anything touches the kernel.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, ClassVar

from dpwatch.probes import params as params_mod
from dpwatch.probes.registry import PROBES, probe_names


class ConfigError(params_mod.ParamError):
    pass


def parse_duration(text: str, name: str = "duration") -> float:
    """'30s', '5m', '1h', '500ms', '90' (seconds) -> seconds. Raises ConfigError."""
    return params_mod.parse_duration(text, name, ConfigError)


def parse_ports(value: str | list, flag: str) -> list[int]:
    """'53,5353' or [53, 5353] -> [53, 5353]: 1 to 8 distinct UDP ports in 1..65535."""
    return params_mod.parse_ports(value, flag, ConfigError)


def probe_params(probes=PROBES) -> list[tuple[type, params_mod.Param]]:
    """(probe class, param) for every declared probe param, in registry order."""
    return [(probe, p) for probe in probes for p in probe.params]


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


def parse_probe_list(text: str | list[str], flag: str, known: list[str] | None = None) -> list[str]:
    items = text if isinstance(text, list) else [p for p in re.split(r"[,\s]+", text) if p]
    known = known if known is not None else probe_names()
    bad = [p for p in items if p not in known and p != "all"]
    if bad:
        raise ConfigError(f"{flag}: unknown probe(s) {', '.join(bad)}; known: {', '.join(known)}")
    if "all" in items:
        return list(known)
    return items


@dataclass
class DaemonConfig:
    """The daemon's own settings; Config (below) adds every probe's declared params."""
    listen: str = "0.0.0.0:9400"
    probes: list[str] = field(default_factory=probe_names)
    disable: list[str] = field(default_factory=list)
    require: list[str] = field(default_factory=list)
    strict: bool = False
    snapshot_interval: float = 5.0
    max_window: float = 3600.0
    default_window: float = 60.0
    log_level: str = "info"
    report_format: str = "text"  # `dpwatch diagnose --format`
    report_url: str = ""         # `dpwatch diagnose --url`: ask a running daemon
    report_window_given: bool = False  # --window given with --url (else the daemon's default)
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

    probe_classes: ClassVar[tuple] = ()  # the probes whose params the generated subclass holds

    def validate(self) -> "Config":
        parse_listen(self.listen)
        known = [p.name for p in self.probe_classes] if self.probe_classes else None
        self.probes = parse_probe_list(self.probes, "--probes", known)
        self.disable = parse_probe_list(self.disable, "--disable", known)
        self.require = parse_probe_list(self.require, "--require", known)
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
        self._validate_probe_params()
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

    def _validate_probe_params(self) -> None:
        """Each probe's params from their declarations, then each probe's cross checks."""
        for probe, param in probe_params(self.probe_classes):
            setattr(self, param.attr, param.check(getattr(self, param.attr), ConfigError))
        for probe in self.probe_classes:
            for check in probe.param_checks:
                check(self, ConfigError)

    @property
    def enabled_probes(self) -> list[str]:
        return [p for p in self.probes if p not in self.disable]

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _probe_field(param: params_mod.Param):
    if isinstance(param.default, (list, dict, set)):
        return field(default_factory=lambda d=param.default: copy.copy(d))
    return field(default=param.default)


def config_class(probes=PROBES, name: str = "Config") -> type:
    """DaemonConfig plus one field per declared param of ``probes`` (generated, not hand-kept)."""
    return make_dataclass(
        name, [(p.attr, Any, _probe_field(p)) for _probe, p in probe_params(probes)],
        bases=(DaemonConfig,), namespace={
            "__module__": __name__, "probe_classes": tuple(probes),
            "__doc__": "Every setting: DaemonConfig's fields and each probe's params "
                       "(probes/<name>/params.py)."})


Config = config_class()
