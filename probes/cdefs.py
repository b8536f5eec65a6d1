"""Constants shared by a probe's C and Python sides, read from its header ``bpf/<name>.h``.

The header is the one place a constant lives: the manager puts it in front of the probe's C
source in the compiled module, and Python reads the same ``#define NAME <integer>`` lines here,
so the two sides cannot drift apart. Only integer defines are read (decimal or hex, optionally
in parentheses); anything else in the header is C's business.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Z_][A-Z0-9_]*)\s+\(?\s*(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*\)?\s*(?:/[*/].*)?$")


def header_text(header: str) -> str:
    return resources.files("dpwatch.bpf").joinpath(header).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def defines(header: str) -> dict[str, int]:
    """{"CT_EV_TABLE_FULL": 0, ...}: every integer #define of bpf/<header>."""
    out: dict[str, int] = {}
    for line in header_text(header).splitlines():
        m = _DEFINE.match(line)
        if m:
            out[m.group(1)] = int(m.group(2), 0)
    return out


def names_by_value(header: str, prefix: str, count: str | None = None) -> tuple[str, ...]:
    """The defines starting with ``prefix``, lower-cased without it, in value order: the
    Python names of a C enumeration (``CT_EV_TABLE_FULL 0`` -> "table_full"). With ``count``,
    the define holding their number must agree (a gap or a missing name raises)."""
    found = {v: k[len(prefix):].lower() for k, v in defines(header).items()
             if k.startswith(prefix) and k != count}
    values = sorted(found)
    if values != list(range(len(values))):
        raise ValueError(f"bpf/{header}: {prefix}* values are not 0..{len(values) - 1}: {values}")
    if count is not None and defines(header).get(count) != len(values):
        raise ValueError(f"bpf/{header}: {count} is {defines(header).get(count)}, "
                         f"but {len(values)} {prefix}* names are defined")
    return tuple(found[v] for v in values)
