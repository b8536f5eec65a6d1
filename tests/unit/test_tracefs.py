"""Unit tests for dpwatch.daemon.tracefs: event format parsing and tracefs discovery.

The format texts are small samples written here, laid out like the kernel's
events/<system>/<event>/format files (tab-separated field lines, a blank line between the
common fields and the event's own, and one long "print fmt:" line).
"""

from __future__ import annotations

from pathlib import Path

from dpwatch.daemon.host import paths, tracefs
from dpwatch.daemon.host.tracefs import EventField, find_tracefs, parse_format, parse_print_symbolic, read_format

SYS = str(Path(__file__).parent / "fixtures" / "sys")  # a 6.18 kernel's tracefs, a few events

# A made-up event: scalar fields, a pointer, a fixed array, a __data_loc string, a signed
# enum; its print fmt has several helper calls, so the parser has to pick the right one.
SAMPLE_FORMAT = (
    "name: sample_drop\n"
    "ID: 4242\n"
    "format:\n"
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
    "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
    "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
    "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
    "\n"
    "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n"
    "\tfield:char name[16];\toffset:16;\tsize:16;\tsigned:0;\n"
    "\tfield:__data_loc char[] dev;\toffset:32;\tsize:4;\tsigned:0;\n"
    "\tfield:unsigned int flags;\toffset:36;\tsize:4;\tsigned:0;\n"
    "\tfield:int state;\toffset:40;\tsize:4;\tsigned:1;\n"
    "\tfield:enum skb_drop_reason reason;\toffset:44;\tsize:4;\tsigned:1;\n"
    "\n"
    'print fmt: "skbaddr=%p name=%s dev=%s (state %s) flags=%s {reason: %s}", '
    "REC->skbaddr, REC->name, __get_str(dev), "
    '__print_symbolic(REC->state, { 1, "ESTABLISHED" }, { 7, "CLOSE" }), '
    '__print_flags(REC->flags, "|", { 0x1, "SYN" }, { 0x2, "ACK" }, { 0x4, "RST)x{" }), '
    "__print_symbolic(REC->reason, "
    '{ 2, "NOT_SPECIFIED" }, { 0x6, "SOCKET_RCVBUFF" }, { 0x0000000c, "NETFILTER_DROP" }, '
    '{ -1, "NEGATIVE_ONE" }, { -0x10, "NEGATIVE_HEX" }, '
    '{ 99, "ODD)NAME{WITH (PARENS" }, { 100, "AFTER_ODD" }), '
    "((REC->flags & (1 << 3)) ? \"yes\" : \"no\"), "
    '__print_symbolic(REC->reason_code, { 5, "WRONG_FIELD" })\n'
)


def test_parse_format_fields():
    fmt = parse_format(SAMPLE_FORMAT, "sample", "sample_drop")
    assert fmt.system == "sample"
    assert fmt.event == "sample_drop"
    assert list(fmt.fields) == [
        "common_type", "common_flags", "common_preempt_count", "common_pid",
        "skbaddr", "name", "dev", "flags", "state", "reason",
    ]
    assert fmt.fields["common_type"] == EventField("unsigned short", "common_type", 0, 2, False)
    assert fmt.fields["common_pid"] == EventField("int", "common_pid", 4, 4, True)
    assert fmt.fields["skbaddr"] == EventField("void *", "skbaddr", 8, 8, False)
    # An array: the name loses its [16]; the size is the whole array.
    assert fmt.fields["name"] == EventField("char", "name", 16, 16, False)
    # A dynamic string: a 4-byte (offset, length) locator.
    assert fmt.fields["dev"] == EventField("__data_loc char[]", "dev", 32, 4, False)
    assert fmt.fields["reason"] == EventField("enum skb_drop_reason", "reason", 44, 4, True)


def test_parse_format_print_fmt():
    fmt = parse_format(SAMPLE_FORMAT)
    assert fmt.print_fmt.startswith('"skbaddr=%p name=%s dev=%s (state %s)')
    assert fmt.print_fmt.endswith('__print_symbolic(REC->reason_code, { 5, "WRONG_FIELD" })')
    assert fmt.system == "" and fmt.event == ""


def test_print_symbolic_picks_the_reason_call():
    fmt = parse_format(SAMPLE_FORMAT)
    expected = {
        2: "NOT_SPECIFIED",
        6: "SOCKET_RCVBUFF",
        12: "NETFILTER_DROP",
        -1: "NEGATIVE_ONE",
        -16: "NEGATIVE_HEX",
        99: "ODD)NAME{WITH (PARENS",
        100: "AFTER_ODD",
    }
    assert fmt.symbolic("reason") == expected
    assert parse_print_symbolic(fmt.print_fmt, "reason") == expected


def test_print_symbolic_other_fields():
    fmt = parse_format(SAMPLE_FORMAT)
    assert fmt.symbolic("state") == {1: "ESTABLISHED", 7: "CLOSE"}
    # A field name that is a prefix-extension of another is matched exactly.
    assert fmt.symbolic("reason_code") == {5: "WRONG_FIELD"}
    # __print_flags is not __print_symbolic.
    assert fmt.symbolic("flags") == {}


def test_print_symbolic_absent():
    fmt = parse_format(SAMPLE_FORMAT)
    assert fmt.symbolic("skbaddr") == {}
    assert fmt.symbolic("no_such_field") == {}
    assert parse_print_symbolic("", "reason") == {}
    assert parse_print_symbolic('"reason=%d", REC->reason', "reason") == {}


def test_print_symbolic_escaped_quote_inside_string():
    # A backslash-escaped quote inside a string must not end the string early, so the ')'
    # after it does not close the call.
    text = ('"%s", __print_symbolic(REC->reason, { 1, "ONE" }, { 2, "q\\") }" }, { 3, "THREE" }), '
            '__print_symbolic(REC->x, { 4, "FOUR" })')
    got = parse_print_symbolic(text, "reason")
    assert got[1] == "ONE"
    assert got[3] == "THREE"
    assert 4 not in got


def test_print_symbolic_whitespace_variants():
    text = '"%s", __print_symbolic( REC->reason ,{1,"A"},{ 0x1F ,  "B" })'
    assert parse_print_symbolic(text, "reason") == {1: "A", 31: "B"}


def test_find_tracefs(tmp_path):
    without = tmp_path / "plain"
    without.mkdir()
    with_events = tmp_path / "tracing"
    (with_events / "events").mkdir(parents=True)
    missing = tmp_path / "does-not-exist"
    assert find_tracefs((str(missing), str(without), str(with_events))) == str(with_events)
    assert find_tracefs((str(with_events), str(without))) == str(with_events)
    assert find_tracefs((str(without), str(missing))) is None
    assert find_tracefs(()) is None


def test_find_tracefs_events_must_be_a_directory(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "events").write_text("not a directory")
    assert find_tracefs((str(fake),)) is None


def test_read_format_from_a_tracefs_tree(tmp_path):
    event_dir = tmp_path / "events" / "sample" / "sample_drop"
    event_dir.mkdir(parents=True)
    (event_dir / "format").write_text(SAMPLE_FORMAT)
    fmt = read_format("sample", "sample_drop", str(tmp_path))
    assert fmt is not None
    assert (fmt.system, fmt.event) == ("sample", "sample_drop")
    assert fmt.symbolic("reason")[6] == "SOCKET_RCVBUFF"
    assert read_format("sample", "missing_event", str(tmp_path)) is None


def test_tracefs_is_found_under_the_sys_root(tmp_path):
    with paths.roots(sys_root=SYS):
        assert tracefs.default_candidates() == (f"{SYS}/kernel/tracing", f"{SYS}/kernel/debug/tracing")
        assert find_tracefs() == f"{SYS}/kernel/tracing"
        assert tracefs.ensure_mounted() == (f"{SYS}/kernel/tracing", f"tracefs at {SYS}/kernel/tracing")
    debugfs = tmp_path / "kernel" / "debug" / "tracing" / "events"
    debugfs.mkdir(parents=True)
    with paths.roots(sys_root=str(tmp_path)):  # an older kernel: tracefs inside debugfs only
        assert find_tracefs() == str(debugfs.parent)
    with paths.roots(sys_root=str(tmp_path / "empty")):
        assert find_tracefs() is None and not tracefs.event_exists("skb", "kfree_skb")


def test_kfree_skb_format_of_the_fixture_kernel():
    with paths.roots(sys_root=SYS):
        fmt = read_format("skb", "kfree_skb")
        assert tracefs.event_exists("skb", "kfree_skb") and tracefs.event_exists("irq", "softirq_entry")
        assert not tracefs.event_exists("skb", "no_such_event")
        assert read_format("skb", "no_such_event") is None
    assert fmt is not None and (fmt.system, fmt.event) == ("skb", "kfree_skb")
    assert fmt.fields["reason"] == EventField("enum skb_drop_reason", "reason", 36, 4, False)
    assert fmt.fields["rx_sk"].offset == 24 and fmt.fields["protocol"].size == 2  # 6.18's layout
    names = fmt.symbolic("reason")
    assert names[2] == "NOT_SPECIFIED" and names[12] == "NETFILTER_DROP" and names[96] == "FRAG_TOO_FAR"
    assert max(names) == 129 and names[129] == "MAX" and 0 not in names


def test_softirq_entry_format_of_the_fixture_kernel():
    with paths.roots(sys_root=SYS):
        fmt = read_format("irq", "softirq_entry")
    assert fmt.fields["vec"].size == 4
    assert fmt.symbolic("vec")[3] == "NET_RX" and fmt.symbolic("vec")[0] == "HI"
