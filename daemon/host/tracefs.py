"""Read-only helpers for tracefs: where it is, which events exist, and event formats.

Nothing here mounts anything or writes to the kernel: detection must have no side effects.
The daemon's ``run`` path calls :func:`ensure_mounted` explicitly, once, before loading BPF.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

from dpwatch.daemon.host import paths


def default_candidates() -> tuple[str, ...]:
    """Where tracefs is looked for, under the sys root: kernel/tracing (4.1+), then the older
    kernel/debug/tracing inside debugfs."""
    return paths.sys("kernel", "tracing"), paths.sys("kernel", "debug", "tracing")


# tracefs.TRACEFS_CANDIDATES: default_candidates() at the time it is read.
__getattr__ = paths.lazy_paths(__name__, TRACEFS_CANDIDATES=default_candidates)


def find_tracefs(candidates: tuple[str, ...] | None = None) -> str | None:
    """Return the first mounted tracefs directory (it has an ``events`` folder), or None.
    ``candidates`` defaults to :func:`default_candidates` (under the sys root)."""
    for path in default_candidates() if candidates is None else candidates:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def ensure_mounted() -> tuple[str | None, str]:
    """Mount tracefs at /sys/kernel/tracing (under the sys root) when no tracefs is mounted.

    BCC needs tracefs to attach tracepoints. Returns (path or None, a note for the log).
    """
    found = find_tracefs()
    if found:
        return found, f"tracefs at {found}"
    target = default_candidates()[0]
    try:
        subprocess.run(["mount", "-t", "tracefs", "tracefs", target],
                       check=True, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"tracefs is not mounted and mounting it at {target} failed: {exc}"
    found = find_tracefs()
    return found, (f"mounted tracefs at {found}" if found else "mounted tracefs but found no events folder")


@dataclass
class EventField:
    ctype: str
    name: str
    offset: int
    size: int
    signed: bool


@dataclass
class EventFormat:
    system: str
    event: str
    fields: dict[str, EventField] = field(default_factory=dict)
    print_fmt: str = ""

    def symbolic(self, field_name: str) -> dict[int, str]:
        """The value->name table of ``__print_symbolic(REC->field_name, ...)`` in print fmt."""
        return parse_print_symbolic(self.print_fmt, field_name)


_FIELD_RE = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);")


def parse_format(text: str, system: str = "", event: str = "") -> EventFormat:
    """Parse the text of ``events/<system>/<event>/format``."""
    fmt = EventFormat(system=system, event=event)
    for line in text.splitlines():
        m = _FIELD_RE.search(line)
        if m:
            decl = m.group("decl").strip()
            # "unsigned short protocol", "char name[16]", "__data_loc char[] name"
            name_part = decl.split()[-1]
            name = name_part.split("[", 1)[0]
            ctype = decl[: len(decl) - len(name_part)].strip()
            fmt.fields[name] = EventField(ctype, name, int(m.group("off")), int(m.group("size")),
                                          m.group("signed") == "1")
        elif line.startswith("print fmt:"):
            fmt.print_fmt = line[len("print fmt:"):].strip()
    return fmt


_SYM_ENTRY_RE = re.compile(r'\{\s*(-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*"([^"]*)"\s*\}')


def parse_print_symbolic(print_fmt: str, field_name: str) -> dict[int, str]:
    """Extract ``{ value, "NAME" }`` pairs of the __print_symbolic call on REC->field_name."""
    marker = re.search(r"__print_symbolic\(\s*REC->" + re.escape(field_name) + r"\s*,", print_fmt)
    if not marker:
        return {}
    # Walk to the matching close paren of __print_symbolic( ... ).
    start = marker.end()
    depth, i, in_str = 1, start, False
    while i < len(print_fmt) and depth:
        ch = print_fmt[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        i += 1
    body = print_fmt[start: i - 1]
    return {int(v, 0): name for v, name in _SYM_ENTRY_RE.findall(body)}


def read_format(system: str, event: str, tracefs: str | None = None) -> EventFormat | None:
    base = tracefs or find_tracefs()
    if not base:
        return None
    path = os.path.join(base, "events", system, event, "format")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_format(fh.read(), system, event)
    except OSError:
        return None


def event_exists(system: str, event: str, tracefs: str | None = None) -> bool:
    base = tracefs or find_tracefs()
    return bool(base) and os.path.isdir(os.path.join(base, "events", system, event))
