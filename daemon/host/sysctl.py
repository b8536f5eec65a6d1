"""Read sysctls through /proc/sys (the daemon's own netns for net.* keys)."""

from __future__ import annotations

from dpwatch.daemon.host import paths

# sysctl.PROC_SYS: /proc/sys under the proc root in force when it is read.
__getattr__ = paths.lazy_paths(__name__, PROC_SYS=lambda: paths.proc("sys"))


def path_of(key: str) -> str:
    """"net.core.somaxconn" -> "/proc/sys/net/core/somaxconn" (under the proc root)."""
    return paths.proc("sys", *key.split("."))


def read(key: str) -> str | None:
    try:
        with open(path_of(key)) as fh:
            return fh.read().strip()
    except OSError:
        return None


def read_int(key: str) -> int | None:
    value = read(key)
    if value is None:
        return None
    try:
        return int(value.split()[0])
    except (ValueError, IndexError):
        return None


class Watched:
    """A fixed set of sysctls that a probe reads in every collect() for its findings: read()
    gives {key: int or None}, the same dict object while no value changes, so the readings
    kept in the snapshot ring share one dict instead of a copy per snapshot."""

    def __init__(self, keys) -> None:
        self.keys = tuple(keys)
        self._last: dict[str, int | None] = {}

    def read(self) -> dict[str, int | None]:
        values = {key: read_int(key) for key in self.keys}
        if values != self._last:
            self._last = values
        return self._last
