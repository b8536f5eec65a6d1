"""Kernel feature detection, done once at start-up.

Detection only reads files under /proc and /sys (``paths.proc()`` and ``paths.sys()``: a
test points them at fixture trees). The one active check is the fentry
probe: it loads a two-instruction BPF program and closes it at once, which is the only
way to learn whether the kernel permits fentry (the file system does not say); nothing
stays in the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from dataclasses import asdict, dataclass, field

from dpwatch.daemon.host import btf as btfmod
from dpwatch.daemon.host import paths
from dpwatch.daemon.host import tracefs

# features.BTF_VMLINUX: the kernel's BTF file under the sys root at the time it is read.
__getattr__ = paths.lazy_paths(__name__, BTF_VMLINUX=btfmod.vmlinux_path)


@dataclass
class Features:
    kernel_release: str
    machine: str
    tracefs: str | None
    kprobes: bool
    kprobes_reason: str
    btf: bool
    fentry: bool
    fentry_reason: str
    raw_tracepoints: bool
    kfree_skb_reason: bool
    bcc: bool
    bcc_reason: str
    headers: str | None
    headers_note: str
    headers_exact: bool
    tracepoints: frozenset[str] = field(default_factory=frozenset)
    _kprobe_funcs: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def kprobe_target(self, function: str) -> bool:
        """Whether ``function`` can be kprobed: listed in available_filter_functions (loaded
        modules included). Read once, on first use, and only where kprobes exist."""
        if self._kprobe_funcs is None:
            funcs: set[str] = set()
            if self.tracefs:
                try:
                    with open(os.path.join(self.tracefs, "available_filter_functions"), "rb") as fh:
                        for line in fh:
                            funcs.add(line.split(None, 1)[0].decode(errors="replace"))
                except OSError:
                    funcs = set()
            object.__setattr__(self, "_kprobe_funcs", frozenset(funcs))
        return function in self._kprobe_funcs if self._kprobe_funcs else self.kprobes

    def has_tracepoint(self, name: str) -> bool:
        """``name`` is "system:event", e.g. "skb:kfree_skb"."""
        return name in self.tracepoints

    def summary(self) -> dict:
        out = asdict(self)
        out["tracepoints"] = len(self.tracepoints)
        out.pop("_kprobe_funcs", None)
        return out


def _list_tracepoints(base: str | None) -> frozenset[str]:
    if not base:
        return frozenset()
    events = os.path.join(base, "events")
    found = set()
    try:
        for system in os.listdir(events):
            sdir = os.path.join(events, system)
            if not os.path.isdir(sdir):
                continue
            for event in os.listdir(sdir):
                if os.path.isdir(os.path.join(sdir, event)):
                    found.add(f"{system}:{event}")
    except OSError:
        pass
    return frozenset(found)


def _detect_kprobes(base: str | None) -> tuple[bool, str]:
    if os.path.isdir(paths.sys("bus", "event_source", "devices", "kprobe")):
        return True, "kprobe PMU present"
    if base and os.path.exists(os.path.join(base, "kprobe_events")):
        return True, "kprobe_events present in tracefs"
    return False, "no kprobe PMU and no kprobe_events (kernel built without CONFIG_KPROBES?)"


def _detect_bcc() -> tuple[bool, str]:
    try:
        import importlib.util
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return False, "python module bcc not found (install Debian's python3-bpfcc; the venv needs --system-site-packages)"
    return True, f"bcc at {os.path.dirname(spec.origin or '')}"


def _detect_headers(release: str) -> tuple[str | None, str]:
    """Where the kernel headers are, and whether they are the running kernel's exactly
    (UTS_RELEASE of include/generated/utsrelease.h; Debian's kernel.release file holds the
    upstream version, not the package's release string)."""
    build = f"/lib/modules/{release}/build"
    if not os.path.isdir(build):
        return None, f"no kernel headers at {build}"
    real = os.path.realpath(build)
    found = None
    try:
        with open(os.path.join(real, "include/generated/utsrelease.h")) as fh:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', fh.read())
            found = m.group(1) if m else None
    except OSError:
        pass
    if found is None:
        base = os.path.basename(real)
        found = base[len("linux-headers-"):] if base.startswith("linux-headers-") else None
    if found != release:
        return real, (f"headers at {real} are for {found or 'an unknown kernel'}, not the running "
                      f"{release}: probes read tracepoint args and packet bytes only, never struct layouts")
    return real, f"headers at {real} (exact)"


# --- fentry: a raw bpf(2) load of "r0 = 0; exit" as BPF_PROG_TYPE_TRACING/BPF_TRACE_FENTRY.

_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_FENTRY = 24


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
    ]


def _detect_fentry(btf: bool, machine: str) -> tuple[bool, str]:
    if not btf:
        return False, "no kernel BTF"
    from dpwatch.daemon.host.bpfstats import bpf_syscall
    try:
        func_id = btfmod.find_type_id("udp_rcv", "FUNC")
    except Exception as exc:  # malformed BTF or a missing function: report, do not crash
        return False, f"cannot find a BTF function id: {exc}"
    if not func_id:
        return False, "udp_rcv not in BTF"
    insns = (ctypes.c_uint64 * 2)(0x00000000000000b7, 0x0000000000000095)  # mov r0,0 ; exit
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=_BPF_PROG_TYPE_TRACING, insn_cnt=2,
                         insns=ctypes.addressof(insns), license=ctypes.addressof(lic),
                         expected_attach_type=_BPF_TRACE_FENTRY, attach_btf_id=func_id,
                         prog_name=b"dpw_fentry_chk")
    try:
        fd = bpf_syscall(_BPF_PROG_LOAD, attr, machine)
    except OSError as exc:
        return False, f"fentry load failed: {errno.errorcode.get(exc.errno, exc.errno)}"
    os.close(fd)
    return True, "fentry program loaded"


def detect() -> Features:
    release = platform.release()
    machine = platform.machine()
    base = tracefs.find_tracefs()
    tps = _list_tracepoints(base)
    kprobes, kp_reason = _detect_kprobes(base)
    have_btf = os.path.exists(btfmod.vmlinux_path())
    fentry, fe_reason = _detect_fentry(have_btf, machine)
    fmt = tracefs.read_format("skb", "kfree_skb", base) if "skb:kfree_skb" in tps else None
    bcc_ok, bcc_reason = _detect_bcc()
    headers, headers_note = _detect_headers(release)
    return Features(
        kernel_release=release,
        machine=machine,
        tracefs=base,
        kprobes=kprobes,
        kprobes_reason=kp_reason,
        btf=have_btf,
        fentry=fentry,
        fentry_reason=fe_reason,
        # raw_tracepoint_open is in every kernel BCC 0.26 supports (4.17+); treat the
        # BTF-era kernels we target as having it and let attach failures report otherwise.
        raw_tracepoints=bool(tps),
        kfree_skb_reason=bool(fmt and "reason" in fmt.fields),
        bcc=bcc_ok,
        bcc_reason=bcc_reason,
        headers=headers,
        headers_note=headers_note,
        headers_exact=bool(headers) and headers_note.endswith("(exact)"),
        tracepoints=tps,
    )
