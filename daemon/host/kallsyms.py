"""Resolve kernel text addresses to ``symbol+0xoff`` through /proc/kallsyms.

The symbol table is large (100k+ lines), so it is never held in memory: a batch of unknown
addresses is resolved with one streaming pass, and results stay in a bounded cache.
Call it from a background thread, not from a request handler.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from typing import Iterable

from dpwatch.daemon.host import paths

# kallsyms.KALLSYMS: /proc/kallsyms under the proc root in force when it is read.
__getattr__ = paths.lazy_paths(__name__, KALLSYMS=lambda: paths.proc("kallsyms"))


class KallsymsResolver:
    def __init__(self, path: str | None = None, cache_size: int = 4096):
        self.path = path or paths.proc("kallsyms")  # under the proc root at construction
        self.cache_size = cache_size
        self._cache: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, addr: int) -> str | None:
        with self._lock:
            name = self._cache.get(addr)
            if name is not None:
                self._cache.move_to_end(addr)
            return name

    def name(self, addr: int) -> str:
        """Cached name, or the hex address while it is not resolved yet."""
        return self.cached(addr) or f"0x{addr:x}"

    def resolve(self, addrs: Iterable[int]) -> dict[int, str]:
        addrs = list(addrs)  # read twice below: a generator would give an empty answer
        wanted = sorted({a for a in addrs if a and self.cached(a) is None})
        names: dict[int, str] = {}
        if wanted:
            found = self._scan(wanted)
            with self._lock:
                for addr in wanted:
                    names[addr] = self._cache[addr] = found.get(addr, f"0x{addr:x}")
                    self._cache.move_to_end(addr)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        # Names found in this pass are answered even if a batch larger than the cache evicted them.
        return {a: names.get(a) or self.name(a) for a in addrs}

    def _scan(self, wanted: list[int]) -> dict[int, str]:
        """One pass: for each wanted address keep the closest text symbol at or below it."""
        best: list[tuple[int, str] | None] = [None] * len(wanted)
        try:
            with open(self.path, "rb") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) < 3 or parts[1] not in (b"t", b"T", b"w", b"W"):
                        continue
                    start = int(parts[0], 16)
                    if start == 0 or start > wanted[-1]:
                        continue
                    # best[i] is the highest symbol start <= wanted[i] seen so far; it never
                    # decreases with i, so stop at the first address this symbol cannot improve.
                    i = bisect.bisect_left(wanted, start)
                    while i < len(wanted):
                        cur = best[i]
                        if cur is not None and cur[0] >= start:
                            break
                        best[i] = (start, parts[2].decode(errors="replace")
                                   + (f" [{parts[3].decode(errors='replace').strip('[]')}]"
                                      if len(parts) > 3 else ""))
                        i += 1
        except OSError:
            return {}
        out = {}
        for addr, hit in zip(wanted, best):
            if hit is not None:
                start, sym = hit
                if " [" in sym:
                    base, mod = sym.split(" [", 1)
                    out[addr] = f"{base}+0x{addr - start:x} [{mod}"
                else:
                    out[addr] = f"{sym}+0x{addr - start:x}"
        return out
