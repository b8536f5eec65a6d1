"""Per-program BPF run time, for `--bpf-stats`.

The kernel counts run time and run count per program only while stats are enabled. We
enable them with the BPF_ENABLE_STATS command, which returns a file descriptor: stats stay
on while it is open and go off by themselves when the daemon exits, so nothing is left
behind (unlike writing the kernel.bpf_stats_enabled sysctl). Figures are read with
BPF_OBJ_GET_INFO_BY_FD on each program's fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from dpwatch.daemon.host import paths

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (UAPI) up to recursion_misses; the kernel copies what fits."""
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def bpf_syscall(cmd: int, attr: ctypes.Structure, machine: str | None = None) -> int:
    """bpf(2) with ``attr``; returns its result or raises OSError with the kernel's errno."""
    machine = machine or platform.machine()
    nr = _SYS_BPF.get(machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf syscall number unknown for {machine}")
    ret = paths.libc().syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def enable_run_time_stats() -> int:
    """Turn per-program stats on; returns the fd that keeps them on (close it to undo)."""
    return bpf_syscall(BPF_ENABLE_STATS, _StatsAttr(type=BPF_STATS_RUN_TIME))


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


class StatsSession:
    """Holds stats on for the daemon's lifetime."""

    def __init__(self):
        self.fd: int | None = None
        self.error = ""

    def start(self) -> bool:
        try:
            self.fd = enable_run_time_stats()
            return True
        except OSError as exc:
            self.error = f"BPF_ENABLE_STATS failed: {exc.strerror}"
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
