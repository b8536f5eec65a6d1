"""daemon/host/paths.py: where /proc and /sys are, and that nothing else hard-codes them.

Every procfs and sysfs path in daemon/ and probes/ is built with ``paths.proc(...)`` or
``paths.sys(...)`` at call time, so a test can point the readers at the fixture trees under
tests/unit/fixtures/proc and tests/unit/fixtures/sys with ``paths.roots(...)``.

What the literal scan below allows, and why:

- ``/proc/self/...`` and ``/proc/thread-self/...`` are built with ``paths.proc("self", ...)``
  too, not exempt: they are the process's own view, but a host /proc mounted elsewhere
  resolves them the same way (the daemon's pid is visible in the host's pid namespace), and a
  fixture tree can then hold the calling thread's status, ns/net and net/ files.
- ``/sys/fs/bpf`` (bpffs) is exempt: pins are made there, it is not a kernel file to read.
- A line carrying the comment ``# host-path: ok <why>`` keeps its literal (e.g. a text that
  names a file for a human, not a path that is opened).
- Docstrings are not scanned.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from dpwatch.daemon.host import paths

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
PROC, SYS = str(FIXTURES / "proc"), str(FIXTURES / "sys")

PATHS_MODULE = "daemon/host/paths.py"
EXEMPT_PREFIXES = ("/sys/fs/bpf",)
MARK = "host-path: ok"
# The files of the host-readers change (issue 17): held to the rule now, not only at the end.
HOST_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "daemon" / "host").glob("*.py")) + [
    "daemon/features.py", "daemon/notrack.py", "daemon/manager.py"]


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _is_node_path(text: str) -> bool:
    if text in ("/proc", "/sys") or text.startswith(("/proc/", "/sys/")):
        return not text.startswith(EXEMPT_PREFIXES)
    return False


def literal_paths(rel: str, repo: Path = REPO) -> list[str]:
    """"file:line: '/proc/...'" for each string literal (f-string parts too) in ``rel`` that
    is a /proc or /sys path, in line order."""
    source = (repo / rel).read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source, rel)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if _is_node_path(node.value) and MARK not in lines[node.lineno - 1]:
                found.append((node.lineno, f"{rel}:{node.lineno}: {node.value!r}"))
    return [text for _, text in sorted(found)]


def cdll_calls(rel: str, repo: Path = REPO) -> list[str]:
    """"file:line" of each ``ctypes.CDLL(...)`` / ``CDLL(...)`` call in ``rel``."""
    tree = ast.parse((repo / rel).read_text(encoding="utf-8"), rel)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name == "CDLL":
                out.append(f"{rel}:{node.lineno}")
    return out


def python_files(*tops: str) -> list[str]:
    out = []
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            if rel != PATHS_MODULE and "__pycache__" not in rel:
                out.append(rel)
    return out


def _report(found: list[str], what: str) -> str:
    return (f"{len(found)} {what} (build them with paths.proc()/paths.sys() at call time, or mark "
            f"the line '# {MARK} <why>'):\n" + "\n".join(found))


def test_the_host_readers_build_every_proc_and_sys_path_through_paths():
    found = [hit for rel in HOST_FILES for hit in literal_paths(rel)]
    assert not found, _report(found, "hard-coded /proc or /sys paths")
    calls = [hit for rel in HOST_FILES if rel != PATHS_MODULE for hit in cdll_calls(rel)]
    assert not calls, f"load libc with paths.libc(): {calls}"


def test_no_hard_coded_proc_or_sys_path_in_daemon_or_probes():
    found = [hit for rel in python_files("daemon", "probes") for hit in literal_paths(rel)]
    assert not found, _report(found, "hard-coded /proc or /sys paths")


def test_libc_is_loaded_only_by_paths():
    calls = [hit for rel in python_files("daemon", "probes") for hit in cdll_calls(rel)]
    assert not calls, f"load libc with paths.libc(): {calls}"


def test_the_scan_sees_literals_and_f_strings_but_not_docstrings_or_marked_lines(tmp_path):
    mod = tmp_path / "daemon" / "sample.py"
    mod.parent.mkdir()
    mod.write_text('"""/proc/net/snmp is read here."""\n'
                   'A = "/proc/net/snmp"\n'
                   'B = f"/proc/{1}/ns/net"\n'
                   'C = "/sys/fs/bpf/dpwatch"\n'
                   'D = "/proc/softirqs row order"  # host-path: ok a label for humans\n'
                   'E = "/sys"\n'
                   'import ctypes\nL = ctypes.CDLL("libc.so.6")\n')
    assert literal_paths("daemon/sample.py", tmp_path) == ["daemon/sample.py:2: '/proc/net/snmp'",
                                                 "daemon/sample.py:3: '/proc/'",
                                                 "daemon/sample.py:6: '/sys'"]
    assert cdll_calls("daemon/sample.py", tmp_path) == ["daemon/sample.py:8"]


# ---- the roots ----------------------------------------------------------------------------------

def test_default_roots_and_a_fixture_block():
    assert paths.proc("net", "snmp") == "/proc/net/snmp" and paths.sys("class", "net") == "/sys/class/net"
    with paths.roots(proc_root=PROC + "/"):
        assert paths.proc("net", "snmp") == f"{PROC}/net/snmp"
        assert paths.sys("class", "net") == "/sys/class/net"  # the other root is left alone
        with paths.roots(sys_root=SYS):
            assert (paths.proc(), paths.sys()) == (PROC, SYS)
        assert paths.sys() == "/sys"
    assert (paths.proc(), paths.sys()) == ("/proc", "/sys")


def test_roots_are_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with paths.roots(proc_root=PROC, sys_root=SYS):
            raise RuntimeError
    assert (paths.proc(), paths.sys()) == ("/proc", "/sys")


def test_environment_roots_are_read_at_first_use(monkeypatch):
    monkeypatch.setattr(paths, "_roots", {"proc": None, "sys": None})
    monkeypatch.setenv("DPWATCH_PROC_ROOT", "/host/proc/")
    monkeypatch.setenv("DPWATCH_SYS_ROOT", "/host/sys")
    assert paths.proc("stat") == "/host/proc/stat" and paths.sys("kernel") == "/host/sys/kernel"
    monkeypatch.setenv("DPWATCH_PROC_ROOT", "/elsewhere")
    assert paths.proc() == "/host/proc"  # read once


def test_pids_of_the_fixture_tree(tmp_path):
    with paths.roots(proc_root=PROC):
        assert paths.pids() == [1, 14, 22, 4242]
    with paths.roots(proc_root=str(tmp_path / "missing")):
        assert paths.pids() == []


def test_path_constants_follow_the_root_in_force():
    from dpwatch.daemon import features
    from dpwatch.daemon.host import btf, kallsyms, procnet, sysctl, tracefs
    assert procnet.SOFTNET_STAT == "/proc/net/softnet_stat" and sysctl.PROC_SYS == "/proc/sys"
    with paths.roots(proc_root=PROC, sys_root=SYS):
        from dpwatch.daemon.host.procnet import PROC_SOFTIRQS
        assert PROC_SOFTIRQS == f"{PROC}/softirqs"
        assert (procnet.SOFTNET_STAT, procnet.PROC_STAT, procnet.PROC_NET_ROUTE) == (
            f"{PROC}/net/softnet_stat", f"{PROC}/stat", f"{PROC}/net/route")
        assert sysctl.PROC_SYS == f"{PROC}/sys" and kallsyms.KALLSYMS == f"{PROC}/kallsyms"
        assert btf.VMLINUX_BTF == features.BTF_VMLINUX == f"{SYS}/kernel/btf/vmlinux"
        assert tracefs.TRACEFS_CANDIDATES == (f"{SYS}/kernel/tracing", f"{SYS}/kernel/debug/tracing")
    with pytest.raises(AttributeError, match="NO_SUCH"):
        procnet.NO_SUCH  # noqa: B018


def test_libc_is_loaded_once():
    from dpwatch.daemon.host import bpfstats, netns
    assert paths.libc() is paths.libc()
    assert paths.libc().getpid() == os.getpid()
    assert not hasattr(netns, "_libc") and not hasattr(bpfstats, "_libc")
