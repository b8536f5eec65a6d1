"""Declared probe parameters: one declaration per setting, everything else generated.

A probe lists its settings as ``params = (Param(...), ...)``. From each declaration the daemon
generates the ``--flag`` (in the probe's own ``--help`` group), the ``DPWATCH_*`` environment
twin, the ``Config`` attribute and its validation, so a probe's settings live in one place:

    Param("dns-timeout", "duration", 5.0, "a query unanswered this long counts as a timeout",
          min=0.1, max=300)

gives ``--dns-timeout 5s``, ``DPWATCH_DNS_TIMEOUT=5s`` and ``config.dns_timeout == 5.0``, and
``--dns-timeout 0.01s`` exits 64 with "--dns-timeout: 10ms is outside 100ms..300s".

Types: ``int``, ``float``, ``bool`` (a store-true flag; the variable takes 1/0, true/false),
``str``, ``duration`` (500ms, 30s, 5m, 1h; the value is seconds), ``choice`` (one of
``choices``) and ``ports`` (1 to 8 distinct port numbers, comma-separated).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

TYPES = ("int", "float", "bool", "str", "duration", "choice", "ports")


class ParamError(ValueError):
    """A bad value for a declared parameter (the daemon's ConfigError subclasses it)."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: Any, name: str = "duration", error: type[Exception] = ParamError) -> float:
    """'30s', '5m', '1h', '500ms', '90' (seconds) -> seconds."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise error(f"{name}: {text!r} is not a duration; use a number with a unit "
                    "such as 500ms, 30s, 5m or 1h")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def format_duration(seconds: float) -> str:
    """5.0 -> '5s', 0.2 -> '200ms', 3600 -> '1h', 60 -> '60s': the form a user would type."""
    if seconds and seconds < 0.001:
        return f"{seconds * 1e6:g}us"
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"


def _number(value: float) -> str:
    """10000000 -> '10000000' (not 1e+07), 0.5 -> '0.5'."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def parse_ports(value: Any, flag: str, error: type[Exception] = ParamError) -> list[int]:
    """'53,5353' or [53, 5353] -> [53, 5353]: 1 to 8 distinct ports in 1..65535."""
    items = value if isinstance(value, (list, tuple)) else [p for p in re.split(r"[,\s]+", str(value)) if p]
    ports: list[int] = []
    for item in items:
        try:
            port = int(item)
        except (TypeError, ValueError):
            raise error(f"{flag}: {item!r} is not a port number") from None
        if not 1 <= port <= 65535:
            raise error(f"{flag}: port {port} is outside 1..65535")
        if port not in ports:
            ports.append(port)
    if not 1 <= len(ports) <= 8:
        raise error(f"{flag}: give 1 to 8 ports (got {len(ports)})")
    return ports


def parse_bool(text: str, name: str, error: type[Exception] = ParamError) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise error(f"{name}: {text!r} is not a boolean (use 1/0, true/false)")


def env_name(flag: str) -> str:
    return "DPWATCH_" + flag.upper().replace("-", "_")


@dataclass(frozen=True)
class Param:
    flag: str                 # without "--"; the Config attribute is flag with "_" for "-"
    type: str
    default: Any
    help: str                 # "(default: ...)" is appended unless the help has %(default)s
    min: float | None = None  # inclusive bounds (durations in seconds)
    max: float | None = None
    min_exclusive: bool = False  # (0, 100] rather than [0, 100]
    choices: tuple[str, ...] = ()
    power_of_two: bool = False
    cli: bool = True          # False: a Config value with no flag or variable (tests, bench)
    metavar: str | None = None
    hint: str = ""            # appended to a range error: what the value means
    pattern: str = ""         # str: a regular expression the whole value must match
    what: str = ""            # str with a pattern: what the value must be ("a domain name")

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise TypeError(f"param {self.flag}: unknown type {self.type!r}; one of {', '.join(TYPES)}")
        if self.type == "choice" and self.default not in self.choices:
            raise TypeError(f"param {self.flag}: default {self.default!r} is not one of its choices")
        if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", self.flag):
            raise TypeError(f"param {self.flag!r}: a flag is lower-case words joined by '-'")

    @property
    def attr(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return env_name(self.flag)

    @property
    def option(self) -> str:
        return "--" + self.flag

    def shown_default(self) -> str:
        """The default as --help shows it and as a user would type it."""
        if self.type == "duration":
            return format_duration(self.default)
        if self.type == "ports":
            return ",".join(str(p) for p in self.default)
        return str(self.default)

    # -- values -----------------------------------------------------------------
    def from_text(self, text: str, source: str, error: type[Exception] = ParamError) -> Any:
        """A flag's or variable's text -> the typed value (not yet range-checked)."""
        if self.type == "int":
            try:
                return int(text)
            except ValueError:
                raise error(f"{source}: {text!r} is not an integer") from None
        if self.type == "float":
            try:
                return float(text)
            except ValueError:
                raise error(f"{source}: {text!r} is not a number") from None
        if self.type == "bool":
            return parse_bool(text, source, error)
        if self.type == "duration":
            return parse_duration(text, source, error)
        if self.type == "ports":
            return parse_ports(text, source, error)
        return text

    def check(self, value: Any, error: type[Exception] = ParamError) -> Any:
        """Validate a typed value (from a flag, a variable or Config(...)); returns it normalised."""
        if self.type == "ports":
            return parse_ports(value, self.option, error)
        if self.type == "duration" and isinstance(value, str):
            value = parse_duration(value, self.option, error)
        if self.type == "choice":
            if value not in self.choices:
                names = ", ".join(self.choices[:-1]) + f" or {self.choices[-1]}"
                raise error(f"{self.option}: {value!r} is not {names}")
            return value
        if self.type in ("int", "float", "duration"):
            self._check_range(value, error)
        if self.type == "str" and self.pattern and not re.fullmatch(self.pattern, value or ""):
            raise error(f"{self.option}: {value!r} is not {self.what or 'valid'}")
        return value

    def _check_range(self, value: float, error: type[Exception]) -> None:
        show = format_duration if self.type == "duration" else _number
        if self.power_of_two and not (self.min <= value <= self.max and int(value) == value
                                      and int(value) & (int(value) - 1) == 0):
            raise error(f"{self.option}: {value} must be a power of two within "
                        f"{show(self.min)}..{show(self.max)}")
        low_ok = self.min is None or (value > self.min if self.min_exclusive else value >= self.min)
        high_ok = self.max is None or value <= self.max
        if not (low_ok and high_ok):
            lo = "" if self.min is None else show(self.min)
            hi = "" if self.max is None else show(self.max)
            if self.min_exclusive:
                span = f"({lo}, {hi}]" if hi else f"> {lo}"
            elif self.max is None:
                span = f">= {lo}"
            else:
                span = f"{lo}..{hi}"
            word = "must be" if span[0] in "<>" else "is outside"
            hint = f" ({self.hint})" if self.hint else ""
            raise error(f"{self.option}: {show(value)} {word} {span}{hint}")

    def env_value(self, error: type[Exception] = ParamError) -> Any:
        """The DPWATCH_* twin's typed value, or None when it is not set."""
        raw = os.environ.get(self.env)
        if raw is None:
            return None
        return self.from_text(raw, self.env, error)
