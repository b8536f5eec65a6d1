"""Where the kernel's pseudo file systems are: /proc and /sys, or a fixture tree in tests.

Every reader builds its paths here instead of hard-coding "/proc/..." (node_exporter's
--path.procfs idea), so unit tests read fixture trees under tests/unit/fixtures/ and a
container that mounts the host's /proc elsewhere can say so (DPWATCH_PROC_ROOT,
DPWATCH_SYS_ROOT; read once, at first use).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_roots = {"proc": None, "sys": None}


def _root(kind: str) -> str:
    if _roots[kind] is None:
        _roots[kind] = os.environ.get(f"DPWATCH_{kind.upper()}_ROOT", f"/{kind}").rstrip("/") or "/"
    return _roots[kind]


def proc(*parts: str) -> str:
    """proc("net", "snmp") -> "/proc/net/snmp" (or under the configured root)."""
    return os.path.join(_root("proc"), *parts)


def sys(*parts: str) -> str:
    """sys("class", "net") -> "/sys/class/net" (or under the configured root)."""
    return os.path.join(_root("sys"), *parts)


def set_roots(proc_root: str | None = None, sys_root: str | None = None) -> None:
    if proc_root is not None:
        _roots["proc"] = proc_root.rstrip("/") or "/"
    if sys_root is not None:
        _roots["sys"] = sys_root.rstrip("/") or "/"


def pids() -> list[int]:
    """The process ids listed under the proc root, in order ([] when it cannot be listed)."""
    try:
        return sorted(int(p) for p in os.listdir(_root("proc")) if p.isdigit())
    except OSError:
        return []


def lazy_paths(module: str, **builders: Callable[[], Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for path constants kept for their importers:
    ``__getattr__ = paths.lazy_paths(__name__, SOFTNET_STAT=lambda: paths.proc("net", "softnet_stat"))``
    makes ``procnet.SOFTNET_STAT`` the path under the root in force at each access."""
    def __getattr__(name: str) -> Any:
        if name in builders:
            return builders[name]()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__


@contextmanager
def roots(proc_root: str | None = None, sys_root: str | None = None) -> Iterator[None]:
    """Read fixture trees for the duration of a block (tests)."""
    saved = dict(_roots)
    set_roots(proc_root, sys_root)
    try:
        yield
    finally:
        _roots.update(saved)


_libc = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once for every module that calls it (setns, bpf, malloc_trim...)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc
