"""Read sysctls through /proc/sys (the daemon's own netns for net.* keys)."""

from __future__ import annotations

import os

PROC_SYS = "/proc/sys"


def path_of(key: str) -> str:
    return os.path.join(PROC_SYS, *key.split("."))


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
