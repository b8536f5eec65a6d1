"""A small, dependency-free reader of raw BTF blobs (such as /sys/kernel/btf/vmlinux).

It exists to read the members of one named enum from the running kernel's type
information, chiefly ``enum skb_drop_reason``: the fallback source of drop-reason
names when the ``skb/kfree_skb`` tracepoint format file cannot be read. Names always
come from the kernel itself; nothing here carries a copied table.

Only what that needs is parsed. The type section is walked record by record, and
for every record only its kind and length are decoded (no per-type Python objects);
the names of enum records are compared in place against the wanted name, and only
the matching enum's members are decoded.

Layout of a raw BTF blob (all integers in the byte order announced by the magic):

* header: u16 magic 0xeB9F, u8 version (1), u8 flags, u32 hdr_len, then u32
  type_off, type_len, str_off, str_len (offsets relative to the end of the
  header). Kernels from 7.1 may append u32 layout_off, layout_len (hdr_len >= 32):
  a table of ``{u8 info_sz, u8 elem_sz, u16 flags}`` indexed by kind that tells a
  reader how to skip kinds it does not know.
* type section: records of ``{u32 name_off, u32 info, u32 size_or_type}``, each
  followed by kind-specific data. ``info`` holds vlen (low bits), kind (bits 24..)
  and kind_flag (bit 31).
* string section: NUL-terminated strings; a name_off indexes into it.

Importing this module has no side effects.
"""

from __future__ import annotations

import struct

from dpwatch.daemon.host import paths

__all__ = [
    "BTFError",
    "VMLINUX_BTF",
    "vmlinux_path",
    "DROP_REASON_ENUM",
    "DROP_REASON_PREFIXES",
    "parse_enum",
    "enum_members",
    "read_enum",
    "find_type_id",
    "strip_prefix",
    "drop_reason_names",
]


def vmlinux_path() -> str:
    """The running kernel's BTF: /sys/kernel/btf/vmlinux under the sys root."""
    return paths.sys("kernel", "btf", "vmlinux")


# btf.VMLINUX_BTF: vmlinux_path() at the time it is read.
__getattr__ = paths.lazy_paths(__name__, VMLINUX_BTF=vmlinux_path)
DROP_REASON_ENUM = "skb_drop_reason"
# "SKB_DROP_REASON_NO_SOCKET" -> "NO_SOCKET", and the two members outside that
# prefix: "SKB_NOT_DROPPED_YET" -> "NOT_DROPPED_YET", "SKB_CONSUMED" -> "CONSUMED".
# This matches the names the kfree_skb tracepoint prints.
DROP_REASON_PREFIXES = ("SKB_DROP_REASON_", "SKB_")

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
_BASE_HDR_LEN = 24       # magic .. str_len
_LAYOUT_HDR_LEN = 32     # ... + layout_off, layout_len
_TYPE_HDR_LEN = 12       # name_off, info, size/type

KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

# Bytes that follow the 12-byte common record, per kind: (fixed part, size per vlen item).
_KIND_SIZES: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0),          # u32 encoding/offset/bits
    KIND_PTR: (0, 0),
    KIND_ARRAY: (12, 0),       # {type, index_type, nelems}
    KIND_STRUCT: (0, 12),      # vlen x {name_off, type, offset}
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),         # vlen x {name_off, s32/u32 val}
    KIND_FWD: (0, 0),
    KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0),
    KIND_CONST: (0, 0),
    KIND_RESTRICT: (0, 0),
    KIND_FUNC: (0, 0),         # vlen is the linkage here, not a count
    KIND_FUNC_PROTO: (0, 8),   # vlen x {name_off, type}
    KIND_VAR: (4, 0),          # u32 linkage
    KIND_DATASEC: (0, 12),     # vlen x {type, offset, size}
    KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0),     # s32 component_idx
    KIND_TYPE_TAG: (0, 0),
    KIND_ENUM64: (0, 12),      # vlen x {name_off, val_lo32, val_hi32}
}
# Tuples indexed by kind, for the hot loop (index 0, BTF_KIND_UNKN, is never valid).
_FIXED = tuple(_KIND_SIZES.get(k, (0, 0))[0] for k in range(KIND_ENUM64 + 1))
_ELEM = tuple(_KIND_SIZES.get(k, (0, 0))[1] for k in range(KIND_ENUM64 + 1))
_NKINDS = KIND_ENUM64 + 1

# info: vlen in bits 0-15 (0-23 from kernel 7.1, whose bits 16-23 were required to be
# zero before), kind in bits 24-28 (24-30 from 7.1, bits 29-30 were zero before).
_VLEN_MASK = 0xFFFFFF
_KIND_MASK = 0x7F


class BTFError(ValueError):
    """The blob is not valid BTF (bad magic or version, truncated, inconsistent)."""


def _header(blob: bytes) -> tuple[str, int, int, int, int, list[tuple[int, int]] | None]:
    """Validate the header; return (byte order, type start, type end, str start, str end, layout)."""
    n = len(blob)
    if n < _BASE_HDR_LEN:
        raise BTFError(f"BTF blob too short for a header: {n} bytes, need {_BASE_HDR_LEN}")
    if blob[0] == 0x9F and blob[1] == 0xEB:
        order = "<"
    elif blob[0] == 0xEB and blob[1] == 0x9F:
        order = ">"
    else:
        raise BTFError(f"bad BTF magic 0x{blob[0]:02x}{blob[1]:02x} (want 0xeb9f in either byte order)")
    version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        order + "BBIIIII", blob, 2)
    if version != BTF_VERSION:
        raise BTFError(f"unsupported BTF version {version} (want {BTF_VERSION})")
    if hdr_len < _BASE_HDR_LEN:
        raise BTFError(f"BTF hdr_len {hdr_len} is smaller than the {_BASE_HDR_LEN}-byte base header")
    if hdr_len > n:
        raise BTFError(f"BTF hdr_len {hdr_len} runs past the end of the {n}-byte blob")
    body = n - hdr_len

    def section(what: str, off: int, length: int) -> tuple[int, int]:
        if off + length > body:
            raise BTFError(f"BTF {what} section (offset {off}, length {length}) runs past the end "
                           f"of the blob ({body} bytes after the header): truncated?")
        return hdr_len + off, hdr_len + off + length

    t_start, t_end = section("type", type_off, type_len)
    s_start, s_end = section("string", str_off, str_len)
    if str_len == 0 or blob[s_start] != 0:
        raise BTFError("BTF string section must start with an empty string (a NUL byte)")

    layout = None
    if hdr_len >= _LAYOUT_HDR_LEN:
        layout_off, layout_len = struct.unpack_from(order + "II", blob, _BASE_HDR_LEN)
        if layout_len:
            l_start, l_end = section("layout", layout_off, layout_len)
            if layout_len % 4:
                raise BTFError(f"BTF layout section length {layout_len} is not a multiple of 4")
            # Entry i describes kind i: (info_sz, elem_sz); the u16 flags are unused.
            layout = [(blob[i], blob[i + 1]) for i in range(l_start, l_end, 4)]
    return order, t_start, t_end, s_start, s_end, layout


def _string(blob: bytes, s_start: int, s_end: int, off: int, what: str) -> str:
    pos = s_start + off
    if off >= s_end - s_start:
        raise BTFError(f"{what}: name offset {off} is outside the string section "
                       f"({s_end - s_start} bytes; split/module BTF needs its base)")
    nul = blob.find(b"\0", pos, s_end)
    if nul < 0:
        raise BTFError(f"{what}: string at offset {off} is not NUL-terminated")
    try:
        return blob[pos:nul].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BTFError(f"{what}: string at offset {off} is not valid UTF-8") from exc


def _members(blob: bytes, order: str, kind: int, kflag: int, body: int, vlen: int,
             s_start: int, s_end: int, type_id: int) -> list[tuple[str, int]]:
    what = f"BTF type [{type_id}] enum member"
    out: list[tuple[str, int]] = []
    if kind == KIND_ENUM:
        # kind_flag set: signed values; clear: unsigned.
        fmt = struct.Struct(order + ("Ii" if kflag else "II"))
        for i in range(vlen):
            name_off, val = fmt.unpack_from(blob, body + 8 * i)
            out.append((_string(blob, s_start, s_end, name_off, what), val))
    else:
        fmt = struct.Struct(order + "III")
        for i in range(vlen):
            name_off, lo, hi = fmt.unpack_from(blob, body + 12 * i)
            val = (hi << 32) | lo
            if kflag and val >= 1 << 63:
                val -= 1 << 64
            out.append((_string(blob, s_start, s_end, name_off, what), val))
    return out


def _records(blob: bytes):
    """Walk the type section: yield (type_id, kind, info, name_off, pos, strings) per record,
    where strings is (s_start, s_end). Raises BTFError for a malformed blob."""
    order, t_start, t_end, s_start, s_end, layout = _header(blob)
    unpack = struct.Struct(order + "II").unpack_from
    fixed, elem = _FIXED, _ELEM
    pos = t_start
    type_id = 1
    while pos < t_end:
        if t_end - pos < _TYPE_HDR_LEN:
            raise BTFError(f"BTF type [{type_id}] at byte {pos} is truncated: "
                           f"{t_end - pos} bytes left in the type section")
        name_off, info = unpack(blob, pos)
        kind = (info >> 24) & _KIND_MASK
        vlen = info & _VLEN_MASK
        if 0 < kind < _NKINDS:
            nxt = pos + _TYPE_HDR_LEN + fixed[kind] + elem[kind] * vlen
        elif layout is not None and 0 < kind < len(layout):
            info_sz, elem_sz = layout[kind]
            nxt = pos + _TYPE_HDR_LEN + info_sz + elem_sz * vlen
        else:
            raise BTFError(f"BTF type [{type_id}] at byte {pos} has unknown kind {kind}")
        if nxt > t_end:
            raise BTFError(f"BTF type [{type_id}] (kind {kind}, vlen {vlen}) runs past the end "
                           f"of the type section")
        yield type_id, kind, info, name_off, pos, order, s_start, s_end
        pos = nxt
        type_id += 1


def _name_is(blob: bytes, want: bytes, name_off: int, s_start: int, s_end: int, type_id: int) -> bool:
    if name_off >= s_end - s_start:
        raise BTFError(f"BTF type [{type_id}]: name offset {name_off} is outside the "
                       f"string section ({s_end - s_start} bytes)")
    return blob.startswith(want, s_start + name_off, s_end)


def enum_members(blob: bytes, name: str) -> list[tuple[str, int]] | None:
    """The members of enum ``name`` in ``blob`` as (name, value) pairs, in declaration order.

    Both BTF_KIND_ENUM (32-bit; signed when kind_flag is set) and BTF_KIND_ENUM64 are read.
    An empty enum record (a forward declaration) is passed over for one with members; if
    only empty ones exist the result is ``[]``. Returns None if no enum has that name.
    Raises BTFError for a malformed blob.
    """
    blob = bytes(blob) if not isinstance(blob, bytes) else blob
    try:
        want = name.encode("utf-8") + b"\0"
    except UnicodeEncodeError:
        return None
    found_empty = False
    for type_id, kind, info, name_off, pos, order, s_start, s_end in _records(blob):
        if kind == KIND_ENUM or kind == KIND_ENUM64:
            if _name_is(blob, want, name_off, s_start, s_end, type_id):
                vlen = info & _VLEN_MASK
                if vlen:
                    return _members(blob, order, kind, info >> 31, pos + _TYPE_HDR_LEN, vlen,
                                    s_start, s_end, type_id)
                found_empty = True
    return [] if found_empty else None


_KIND_BY_NAME = {"INT": KIND_INT, "STRUCT": KIND_STRUCT, "UNION": KIND_UNION, "ENUM": KIND_ENUM,
                 "TYPEDEF": KIND_TYPEDEF, "FUNC": KIND_FUNC, "FUNC_PROTO": KIND_FUNC_PROTO,
                 "VAR": KIND_VAR, "ENUM64": KIND_ENUM64}


def find_type_id(name: str, kind: str, path: str | None = None) -> int | None:
    """The BTF type id of the first type of ``kind`` ("FUNC", "STRUCT", ...) named ``name``."""
    want_kind = _KIND_BY_NAME[kind]
    with open(path or vmlinux_path(), "rb") as fh:
        blob = fh.read()
    want = name.encode("utf-8") + b"\0"
    for type_id, k, _info, name_off, _pos, _order, s_start, s_end in _records(blob):
        if k == want_kind and _name_is(blob, want, name_off, s_start, s_end, type_id):
            return type_id
    return None


def parse_enum(blob: bytes, name: str) -> dict[int, str] | None:
    """``{value: member name}`` of enum ``name`` in ``blob``, or None if there is no such enum.

    When several members share a value, the first declared keeps it (use
    :func:`enum_members` to see aliases). Raises BTFError for a malformed blob.
    """
    members = enum_members(blob, name)
    if members is None:
        return None
    out: dict[int, str] = {}
    for member, value in members:
        out.setdefault(value, member)
    return out


def read_enum(name: str, path: str | None = None) -> dict[int, str] | None:
    """Read the raw BTF file at ``path`` once and return ``{value: name}`` of enum ``name``.

    None when the enum is not there. OSError (e.g. FileNotFoundError when the kernel
    has no BTF) propagates; a malformed file raises BTFError. ``path`` defaults to
    :func:`vmlinux_path`.
    """
    with open(path or vmlinux_path(), "rb") as fh:
        blob = fh.read()
    return parse_enum(blob, name)


def strip_prefix(members: dict[int, str], *prefixes: str) -> dict[int, str]:
    """Return a copy of ``members`` with the first matching prefix removed from each name.

    ``strip_prefix(m, "SKB_DROP_REASON_", "SKB_")`` turns SKB_DROP_REASON_NO_SOCKET into
    NO_SOCKET and SKB_CONSUMED into CONSUMED. Names matching no prefix, and names that
    are nothing but a prefix, are kept whole.
    """
    out: dict[int, str] = {}
    for value, member in members.items():
        for prefix in prefixes:
            if prefix and member.startswith(prefix) and len(member) > len(prefix):
                member = member[len(prefix):]
                break
        out[value] = member
    return out


def drop_reason_names(path: str | None = None) -> dict[int, str] | None:
    """The kernel's drop reasons as the kfree_skb tracepoint names them, read from BTF.

    ``{0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET", ...}``;
    the enum's bookkeeping members (e.g. MAX, SUBSYS_MASK) are included as they are.
    None if the kernel has no ``enum skb_drop_reason``.
    """
    members = read_enum(DROP_REASON_ENUM, path)
    if members is None:
        return None
    return strip_prefix(members, *DROP_REASON_PREFIXES)
