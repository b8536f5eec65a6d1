"""Unit tests for dpwatch.daemon.kallsyms on a synthetic /proc/kallsyms."""

from __future__ import annotations

import pytest

from dpwatch.daemon.host.kallsyms import KallsymsResolver

# Unsorted on purpose; data symbols (d/D/b/r) must be skipped; module symbols carry [mod]
# after a tab, as in the real file; a zero address (what non-root readers see) is skipped.
KALLSYMS = (
    "ffffffff81000300 t baz\n"
    "ffffffff81000000 T foo\n"
    "ffffffff81000100 d some_data\n"
    "ffffffffc0000100 t qux\t[mymod]\n"
    "ffffffff81000180 D other_data\n"
    "ffffffff81000200 T bar_text\n"
    "ffffffffc0000000 t bar\t[mymod]\n"
    "ffffffff81000280 b bss_thing\n"
    "ffffffff81000290 r rodata_thing\n"
    "ffffffff81000400 W weak_fn\n"
    "0000000000000000 T zero_sym\n"
    "short line\n"
)

FOO = 0xffffffff81000000


@pytest.fixture
def kallsyms(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    return path


@pytest.mark.parametrize("addr, name", [
    (FOO + 0x10, "foo+0x10"),
    (FOO, "foo+0x0"),                       # exactly at a symbol start
    (FOO + 0x150, "foo+0x150"),             # a 'd' symbol at 0x100 is not text
    (FOO + 0x190, "foo+0x190"),             # nor is 'D' at 0x180
    (FOO + 0x200, "bar_text+0x0"),
    (FOO + 0x2ff, "bar_text+0xff"),         # 'b' and 'r' symbols are skipped too
    (FOO + 0x310, "baz+0x10"),
    (FOO + 0x408, "weak_fn+0x8"),
    (0xffffffffc0000000, "bar+0x0 [mymod]"),
    (0xffffffffc0000042, "bar+0x42 [mymod]"),
    (0xffffffffc0000123, "qux+0x23 [mymod]"),
    (0xffffffff80000000, "0xffffffff80000000"),  # below every symbol
])
def test_resolve_one(kallsyms, addr, name):
    r = KallsymsResolver(str(kallsyms))
    assert r.resolve([addr]) == {addr: name}
    assert r.name(addr) == name


def test_resolve_batch(kallsyms):
    r = KallsymsResolver(str(kallsyms))
    addrs = [0xffffffffc0000042, FOO + 0x10, 0xffffffff80000000, FOO + 0x200, FOO + 0x310, 0]
    assert r.resolve(addrs) == {
        0xffffffffc0000042: "bar+0x42 [mymod]",
        FOO + 0x10: "foo+0x10",
        0xffffffff80000000: "0xffffffff80000000",
        FOO + 0x200: "bar_text+0x0",
        FOO + 0x310: "baz+0x10",
        0: "0x0",
    }
    assert r.cached(0) is None  # address 0 is never looked up


def test_resolve_generator(kallsyms):
    r = KallsymsResolver(str(kallsyms))
    assert r.resolve(a for a in [FOO + 0x10, FOO + 0x310]) == {FOO + 0x10: "foo+0x10",
                                                               FOO + 0x310: "baz+0x10"}


def test_name_before_resolve_is_hex(kallsyms):
    r = KallsymsResolver(str(kallsyms))
    assert r.name(FOO + 0x10) == "0xffffffff81000010"
    assert r.cached(FOO + 0x10) is None


def test_missing_file_falls_back_to_hex(tmp_path):
    r = KallsymsResolver(str(tmp_path / "nope"))
    assert r.resolve([FOO]) == {FOO: "0xffffffff81000000"}


def test_cached_addresses_are_not_rescanned(kallsyms, monkeypatch):
    r = KallsymsResolver(str(kallsyms))
    scans = []
    real_scan = r._scan
    monkeypatch.setattr(r, "_scan", lambda wanted: scans.append(list(wanted)) or real_scan(wanted))
    first = r.resolve([FOO + 0x10, 0xffffffffc0000000])
    assert first == {FOO + 0x10: "foo+0x10", 0xffffffffc0000000: "bar+0x0 [mymod]"}
    assert scans == [[FOO + 0x10, 0xffffffffc0000000]]
    kallsyms.unlink()
    assert r.resolve([FOO + 0x10, 0xffffffffc0000000]) == first
    assert scans == [[FOO + 0x10, 0xffffffffc0000000]]
    assert r.name(FOO + 0x10) == "foo+0x10"
    # Only the uncached address is scanned for, and with the file gone it stays hex.
    assert r.resolve([FOO + 0x10, FOO + 0x310]) == {FOO + 0x10: "foo+0x10",
                                                    FOO + 0x310: "0xffffffff81000310"}
    assert scans[-1] == [FOO + 0x310]


def test_cache_bound_is_lru(kallsyms):
    r = KallsymsResolver(str(kallsyms), cache_size=2)
    a, b, c = FOO + 0x10, FOO + 0x200, FOO + 0x310
    r.resolve([a])
    r.resolve([b])
    assert r.name(a) == "foo+0x10"   # touching a makes b the least recently used
    r.resolve([c])
    assert len(r._cache) == 2
    assert r.cached(b) is None
    assert r.cached(a) == "foo+0x10"
    assert r.cached(c) == "baz+0x10"


def test_batch_larger_than_cache(kallsyms):
    r = KallsymsResolver(str(kallsyms), cache_size=2)
    addrs = [FOO + 0x10, FOO + 0x200, FOO + 0x310]
    # Every name found in the pass is answered, although only two stay cached.
    assert r.resolve(addrs) == {FOO + 0x10: "foo+0x10", FOO + 0x200: "bar_text+0x0",
                                FOO + 0x310: "baz+0x10"}
    assert len(r._cache) == 2
