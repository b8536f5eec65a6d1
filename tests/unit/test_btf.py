"""Tests for dpwatch.daemon.btf: synthetic BTF blobs (no root needed) and the running kernel's BTF."""

from __future__ import annotations

import os
import random
import struct

import pytest

from dpwatch.daemon.host import btf
from dpwatch.daemon.host.btf import BTFError, enum_members, parse_enum, read_enum, strip_prefix


class Builder:
    """Encodes a small raw BTF blob, one helper per kind; each helper returns the new type id."""

    def __init__(self, order: str = "<") -> None:
        self.order = order
        self.strtab = bytearray(b"\0")
        self._offsets: dict[str, int] = {"": 0}
        self.types: list[bytes] = []

    def s(self, text: str) -> int:
        if text not in self._offsets:
            self._offsets[text] = len(self.strtab)
            self.strtab += text.encode() + b"\0"
        return self._offsets[text]

    def u32(self, *vals: int) -> bytes:
        return struct.pack(self.order + "I" * len(vals), *vals)

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, tail: bytes = b"",
            kflag: int = 0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types.append(self.u32(self.s(name), info, size_or_type) + tail)
        return len(self.types)

    # One method per kind, in kind order.
    def int_(self, name: str, size: int = 4, bits: int = 32, signed: bool = True) -> int:
        return self.add(name, 1, 0, size, self.u32(((1 if signed else 0) << 24) | bits))

    def ptr(self, to: int) -> int:
        return self.add("", 2, 0, to)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self.add("", 3, 0, 0, self.u32(elem, index, nelems))

    def struct_(self, name: str, size: int, members: list[tuple[str, int, int]], kind: int = 4) -> int:
        tail = b"".join(self.u32(self.s(m), t, off) for m, t, off in members)
        return self.add(name, kind, len(members), size, tail)

    def union(self, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        return self.struct_(name, size, members, kind=5)

    def enum(self, name: str, members: list[tuple[str, int]], signed: bool = True, size: int = 4) -> int:
        fmt = self.order + ("Ii" if signed else "II")
        tail = b"".join(struct.pack(fmt, self.s(m), v if signed else v & 0xFFFFFFFF)
                        for m, v in members)
        return self.add(name, 6, len(members), size, tail, kflag=int(signed))

    def fwd(self, name: str, union: bool = False) -> int:
        return self.add(name, 7, 0, 0, kflag=int(union))

    def typedef(self, name: str, to: int) -> int:
        return self.add(name, 8, 0, to)

    def volatile(self, to: int) -> int:
        return self.add("", 9, 0, to)

    def const(self, to: int) -> int:
        return self.add("", 10, 0, to)

    def restrict(self, to: int) -> int:
        return self.add("", 11, 0, to)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self.add(name, 12, linkage, proto)  # vlen carries the linkage, no trailing data

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        tail = b"".join(self.u32(self.s(p), t) for p, t in params)
        return self.add("", 13, len(params), ret, tail)

    def var(self, name: str, typ: int, linkage: int = 1) -> int:
        return self.add(name, 14, 0, typ, self.u32(linkage))

    def datasec(self, name: str, size: int, vars_: list[tuple[int, int, int]]) -> int:
        tail = b"".join(self.u32(t, off, sz) for t, off, sz in vars_)
        return self.add(name, 15, len(vars_), size, tail)

    def float_(self, name: str, size: int = 8) -> int:
        return self.add(name, 16, 0, size)

    def decl_tag(self, name: str, to: int, component_idx: int = -1) -> int:
        return self.add(name, 17, 0, to, struct.pack(self.order + "i", component_idx))

    def type_tag(self, name: str, to: int) -> int:
        return self.add(name, 18, 0, to)

    def enum64(self, name: str, members: list[tuple[str, int]], signed: bool = False, size: int = 8) -> int:
        tail = b""
        for m, v in members:
            v &= (1 << 64) - 1
            tail += self.u32(self.s(m), v & 0xFFFFFFFF, v >> 32)
        return self.add(name, 19, len(members), size, tail, kflag=int(signed))

    def build(self, layout: list[tuple[int, int]] | None = None, gap: int = 0) -> bytes:
        """Header, types, ``gap`` filler bytes, strings[, layout]. With ``layout`` the header
        is the 32-byte one with layout_off/layout_len."""
        types = b"".join(self.types)
        strs = bytes(self.strtab)
        hdr_len = 32 if layout is not None else 24
        type_off, str_off = 0, len(types) + gap
        head = struct.pack(self.order + "HBBIIIII", 0xEB9F, 1, 0, hdr_len,
                           type_off, len(types), str_off, len(strs))
        body = types + b"\xaa" * gap + strs
        if layout is not None:
            lay = b"".join(struct.pack(self.order + "BBH", i, e, 0) for i, e in layout)
            head += struct.pack(self.order + "II", len(body), len(lay))
            body += lay
        return head + body


NET_REASONS = [
    ("SKB_NOT_DROPPED_YET", 0),
    ("SKB_CONSUMED", 1),
    ("SKB_DROP_REASON_NOT_SPECIFIED", 2),
    ("SKB_DROP_REASON_NO_SOCKET", 3),
    ("SKB_DROP_REASON_MAX", 4),
    ("SKB_DROP_REASON_SUBSYS_MASK", 0xFFFF0000),
]


def every_kind(order: str = "<") -> Builder:
    """A blob with every kind 1..19 placed before and between the enums of interest."""
    b = Builder(order)
    i32 = b.int_("int")
    u8 = b.int_("unsigned char", size=1, bits=8, signed=False)
    p = b.ptr(i32)
    idx = b.int_("__ARRAY_SIZE_TYPE__")
    arr = b.array(u8, idx, 16)
    st = b.struct_("sk_buff", 32, [("len", i32, 0), ("data", p, 64), ("cb", arr, 128)])
    un = b.union("u", 8, [("a", i32, 0), ("b", p, 0)])
    b.fwd("sock")
    b.fwd("some_union", union=True)
    td = b.typedef("skb_t", st)
    b.volatile(td)
    c = b.const(un)
    b.restrict(p)
    fp = b.func_proto(i32, [("skb", p), ("reason", i32), ("", 0)])  # ("", 0): varargs
    b.func("kfree_skb_reason", fp)
    v = b.var("sysctl_x", i32)
    v2 = b.var("sysctl_y", c)
    b.datasec(".data", 64, [(v, 0, 4), (v2, 8, 8)])
    b.float_("double")
    b.decl_tag("tag_on_param", fp, 1)
    b.type_tag("user", p)
    b.func_proto(u8, [("only", i32)])  # one 8-byte param: a wrong element size misaligns all below
    b.enum("other_enum", [("A", 0), ("B", 1)])
    b.enum("skb_drop_reason", NET_REASONS, signed=False)
    b.enum64("big64", [("LOW", 1), ("HIGH", 0xFEDC_BA98_7654_3210), ("TOP", (1 << 64) - 1)])
    b.enum64("neg64", [("MINUS_ONE", -1), ("MIN", -(1 << 63)), ("PLUS", 5)], signed=True)
    b.enum("neg32", [("M1", -1), ("MIN", -(1 << 31)), ("MAX", (1 << 31) - 1)], signed=True)
    b.func_proto(0, [])
    b.struct_("after_everything", 4, [("x", i32, 0)])
    return b


@pytest.mark.parametrize("order", ["<", ">"])
def test_every_kind_is_skipped_and_enums_read_exactly(order):
    blob = every_kind(order).build()
    assert parse_enum(blob, "skb_drop_reason") == {v: n for n, v in NET_REASONS}
    assert parse_enum(blob, "other_enum") == {0: "A", 1: "B"}
    assert parse_enum(blob, "neg32") == {-1: "M1", -(1 << 31): "MIN", (1 << 31) - 1: "MAX"}
    assert parse_enum(blob, "big64") == {1: "LOW", 0xFEDC_BA98_7654_3210: "HIGH", (1 << 64) - 1: "TOP"}
    assert parse_enum(blob, "neg64") == {-1: "MINUS_ONE", -(1 << 63): "MIN", 5: "PLUS"}


def test_enum32_sign_follows_kind_flag():
    b = Builder()
    b.enum("u", [("ALL", -1)], signed=False)  # bit pattern 0xffffffff, unsigned
    b.enum("s", [("ALL", -1)], signed=True)
    blob = b.build()
    assert parse_enum(blob, "u") == {0xFFFFFFFF: "ALL"}
    assert parse_enum(blob, "s") == {-1: "ALL"}


def test_not_found_and_non_enum_names():
    blob = every_kind().build()
    assert parse_enum(blob, "no_such_enum") is None
    assert parse_enum(blob, "sk_buff") is None          # a struct, not an enum
    assert parse_enum(blob, "kfree_skb_reason") is None  # a func
    assert parse_enum(blob, "drop_reason") is None       # only a suffix of an enum name
    assert parse_enum(blob, "skb_drop") is None          # only a prefix
    assert parse_enum(blob, "") is None                  # there is no anonymous enum here
    assert parse_enum(blob, "SKB_CONSUMED") is None      # a member name, not an enum name


def test_anonymous_enum_matches_empty_name():
    b = Builder()
    b.enum("", [("ANON_A", 7)])
    assert parse_enum(b.build(), "") == {7: "ANON_A"}


def test_name_offset_into_middle_of_a_string():
    # An enum whose name_off points at the suffix of a longer string is still found by that suffix.
    b = Builder()
    off = b.s("xx_skb_drop_reason") + 3
    b.types.append(b.u32(off, (6 << 24) | 1, 4) + b.u32(b.s("R"), 9))
    blob = b.build()
    assert parse_enum(blob, "skb_drop_reason") == {9: "R"}
    assert parse_enum(blob, "xx_skb_drop_reason") is None


def test_forward_declared_empty_enum_is_passed_over():
    b = Builder()
    b.enum("skb_drop_reason", [])
    b.int_("int")
    b.enum("skb_drop_reason", [("SKB_CONSUMED", 1)])
    assert parse_enum(b.build(), "skb_drop_reason") == {1: "SKB_CONSUMED"}
    only_empty = Builder()
    only_empty.enum("e", [])
    assert parse_enum(only_empty.build(), "e") == {}
    assert enum_members(only_empty.build(), "e") == []


def test_aliases_first_name_wins_and_members_keep_all():
    b = Builder()
    b.enum("e", [("FIRST", 1), ("ALIAS", 1), ("TWO", 2)])
    blob = b.build()
    assert parse_enum(blob, "e") == {1: "FIRST", 2: "TWO"}
    assert enum_members(blob, "e") == [("FIRST", 1), ("ALIAS", 1), ("TWO", 2)]


def test_bytes_between_sections_and_bytearray_input():
    blob = every_kind().build(gap=12)
    assert parse_enum(bytearray(blob), "other_enum") == {0: "A", 1: "B"}


def test_read_enum_from_a_file(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(every_kind().build())
    assert read_enum("skb_drop_reason", str(path))[3] == "SKB_DROP_REASON_NO_SOCKET"
    assert read_enum("absent", str(path)) is None
    assert btf.drop_reason_names(str(path)) == {
        0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET",
        4: "MAX", 0xFFFF0000: "SUBSYS_MASK"}
    with pytest.raises(FileNotFoundError):
        read_enum("skb_drop_reason", str(tmp_path / "missing"))


def test_strip_prefix():
    members = {v: n for n, v in NET_REASONS}
    assert strip_prefix(members, "SKB_DROP_REASON_") == {
        0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET",
        4: "MAX", 0xFFFF0000: "SUBSYS_MASK"}
    stripped = strip_prefix(members, *btf.DROP_REASON_PREFIXES)
    assert stripped[0] == "NOT_DROPPED_YET" and stripped[1] == "CONSUMED" and stripped[3] == "NO_SOCKET"
    # A name that is only the prefix is kept whole; the input is not modified.
    assert strip_prefix({5: "SKB_", 6: "OTHER"}, "SKB_") == {5: "SKB_", 6: "OTHER"}
    assert members[3] == "SKB_DROP_REASON_NO_SOCKET"
    assert strip_prefix(members) == members


# ---- forward compatibility: the kernel 7.1 layout section ----

def test_unknown_kind_is_skipped_with_a_layout_section():
    b = Builder()
    b.int_("int")
    # kind 25, vlen 2: 4 fixed bytes + 2 x 6 bytes per element, per the layout below.
    b.types.append(b.u32(b.s("future"), (25 << 24) | 2, 0) + b"\x01" * (4 + 2 * 6))
    b.enum("e", [("X", 3)])
    layout = [(0, 0)] * 26
    layout[25] = (4, 6)
    assert parse_enum(b.build(layout=layout), "e") == {3: "X"}
    with pytest.raises(BTFError, match="unknown kind 25"):
        parse_enum(b.build(), "e")                       # no layout: cannot skip it
    with pytest.raises(BTFError, match="unknown kind 25"):
        parse_enum(b.build(layout=layout[:20]), "e")     # layout does not describe kind 25


def test_header_with_layout_fields_but_no_layout():
    b = every_kind()
    blob = b.build(layout=[])
    assert struct.unpack_from("<I", blob, 4)[0] == 32
    assert parse_enum(blob, "other_enum") == {0: "A", 1: "B"}


# ---- malformed input ----

@pytest.mark.parametrize("order", ["<", ">"])
def test_every_truncation_raises_btf_error(order):
    blob = every_kind(order).build()
    for cut in range(len(blob)):
        with pytest.raises(BTFError):
            parse_enum(blob[:cut], "skb_drop_reason")


def _with_header(blob: bytes, **fields: int) -> bytes:
    names = ["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"]
    vals = dict(zip(names, struct.unpack_from("<HBBIIIII", blob)))
    vals.update(fields)
    return struct.pack("<HBBIIIII", *(vals[n] for n in names)) + blob[24:]


def _blob_and_lengths():
    blob = every_kind().build()
    _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", blob)
    return blob, hdr_len, type_len, str_off, str_len


def test_header_errors():
    blob, hdr_len, type_len, str_off, str_len = _blob_and_lengths()
    cases = {
        "magic": _with_header(blob, magic=0x1234),
        "version": _with_header(blob, version=2),
        "smaller than": _with_header(blob, hdr_len=16),
        "runs past the end of the": _with_header(blob, hdr_len=len(blob) + 1),
        "type section": _with_header(blob, type_len=len(blob)),
        "string section": _with_header(blob, str_len=str_len + 1),
        "empty string": _with_header(blob, str_off=str_off + 1, str_len=str_len - 1),
    }
    for match, bad in cases.items():
        with pytest.raises(BTFError, match=match):
            parse_enum(bad, "skb_drop_reason")
    with pytest.raises(BTFError, match="magic"):
        parse_enum(b"\x00" * 64, "x")
    with pytest.raises(BTFError, match="too short"):
        parse_enum(b"", "x")


def test_type_section_errors():
    blob, hdr_len, type_len, str_off, str_len = _blob_and_lengths()
    # Type section ending in the middle of the last record / of a record header.
    for short in (1, 4, 11, 12, 13):
        with pytest.raises(BTFError, match="truncated|runs past"):
            parse_enum(_with_header(blob, type_len=type_len - short), "no_such_enum")

    def one(record: bytes, name: str = "e") -> None:
        b = Builder()
        b.s("e")
        b.types.append(record)
        parse_enum(b.build(), name)

    u32 = Builder().u32
    with pytest.raises(BTFError, match="unknown kind 0"):
        one(u32(0, 0, 0))
    with pytest.raises(BTFError, match="unknown kind 20"):
        one(u32(0, 20 << 24, 0))
    with pytest.raises(BTFError, match="runs past"):
        one(u32(1, (4 << 24) | 0xFFFF, 0))          # struct claiming 65535 members
    with pytest.raises(BTFError, match="runs past"):
        one(u32(1, (1 << 24), 4))                   # INT without its 4 trailing bytes
    with pytest.raises(BTFError, match="outside the string section"):
        one(u32(10_000, (6 << 24), 4))              # enum name offset out of range
    with pytest.raises(BTFError, match="outside the string section"):
        one(u32(1, (6 << 24) | 1, 4) + u32(10_000, 0))  # member name offset out of range


def test_unterminated_and_undecodable_names():
    b = Builder()
    b.s("e")
    b.enum("e", [("M", 1)])
    blob = b.build()
    assert blob.endswith(b"\0e\0M\0")
    # Drop the final NUL of the string section, that of the member name "M".
    _, _, _, _, _, _, str_off, str_len = struct.unpack_from("<HBBIIIII", blob)
    with pytest.raises(BTFError, match="NUL-terminated"):
        parse_enum(_with_header(blob, str_len=str_len - 1)[:-1], "e")
    bad = blob[:-2] + b"\xff\0"
    with pytest.raises(BTFError, match="UTF-8"):
        parse_enum(bad, "e")


def test_random_garbage_and_bit_flips_never_raise_anything_but_btf_error():
    rng = random.Random(20240611)
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        for data in (junk, b"\x9f\xeb\x01\x00" + junk, b"\xeb\x9f\x01\x00" + junk):
            try:
                parse_enum(data, "skb_drop_reason")
            except BTFError:
                pass
    for order in "<>":
        base = bytearray(every_kind(order).build())
        for _ in range(3000):
            data = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                result = parse_enum(bytes(data), "skb_drop_reason")
            except BTFError:
                continue
            assert result is None or isinstance(result, dict)

def test_the_kernels_btf_under_the_sys_root():
    """tests/unit/fixtures/sys/kernel/btf/vmlinux: the first 16 drop reasons of 6.18, MAX and
    SUBSYS_MASK, and two FUNCs (tcp_v4_rcv, ip_defrag); no udp_rcv (see test_host_features)."""
    from dpwatch.daemon.host import paths
    sys_root = os.path.join(os.path.dirname(__file__), "fixtures", "sys")
    with paths.roots(sys_root=sys_root):
        assert btf.vmlinux_path() == btf.VMLINUX_BTF == f"{sys_root}/kernel/btf/vmlinux"
        names = btf.drop_reason_names()
        assert btf.find_type_id("tcp_v4_rcv", "FUNC") and btf.find_type_id("udp_rcv", "FUNC") is None
    assert names[0] == "NOT_DROPPED_YET" and names[3] == "NO_SOCKET" and names[12] == "NETFILTER_DROP"
    assert names[14] == "MAX" and names[-65536] == "SUBSYS_MASK" and len(names) == 16


def test_no_import_time_side_effects():
    # The module only defines things; reading happens in read_enum/drop_reason_names.
    assert btf.VMLINUX_BTF == "/sys/kernel/btf/vmlinux"
    assert issubclass(BTFError, ValueError)


# ---- the running kernel ----

needs_vmlinux = pytest.mark.skipif(not os.path.exists(btf.VMLINUX_BTF),
                                   reason=f"{btf.VMLINUX_BTF} does not exist (kernel without BTF)")


@needs_vmlinux
def test_real_vmlinux_skb_drop_reason():
    raw = read_enum("skb_drop_reason")
    assert raw, "the running kernel's BTF has no enum skb_drop_reason"
    names = btf.drop_reason_names()
    by_name = {n: v for v, n in names.items()}
    assert "NO_SOCKET" in by_name
    assert raw[by_name["NO_SOCKET"]] == "SKB_DROP_REASON_NO_SOCKET"
    assert names.get(0) == "NOT_DROPPED_YET"
    assert names.get(1) == "CONSUMED"
    assert "NOT_SPECIFIED" in by_name


@needs_vmlinux
def test_real_vmlinux_matches_kfree_skb_tracepoint_format():
    from dpwatch.daemon.host import tracefs

    base = tracefs.find_tracefs()
    if base is None:
        pytest.skip("tracefs is not mounted, so the kfree_skb format file is missing")
    path = os.path.join(base, "events", "skb", "kfree_skb", "format")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        pytest.skip(f"cannot read {path}: {exc}")
    symbolic = tracefs.parse_format(text, "skb", "kfree_skb").symbolic("reason")
    if not symbolic:
        pytest.skip(f"{path} has no __print_symbolic list for REC->reason")
    names = btf.drop_reason_names()
    by_name = {n: v for v, n in names.items()}
    sym_by_name = {n: v for v, n in symbolic.items()}
    assert by_name["NO_SOCKET"] == sym_by_name["NO_SOCKET"]
    # Every value the tracepoint prints has the same name in BTF.
    assert {v: names.get(v) for v in symbolic} == symbolic
