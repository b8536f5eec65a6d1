"""tcx links through the raw bpf(2) call: BCC has no BPF_LINK_CREATE for tcx, so the DNS
probe builds the attribute itself. The command and attach-type numbers come from the running
kernel's BTF (enum bpf_cmd, enum bpf_attach_type), never from a copy of the uapi header.
"""

from __future__ import annotations

import ctypes

TCX_ATTACH_TYPES = ("BPF_TCX_INGRESS", "BPF_TCX_EGRESS")
BPF_LINK_CREATE = "BPF_LINK_CREATE"


class LinkCreateAttr(ctypes.Structure):
    """union bpf_attr, the link_create member, with its tcx part (no relative position)."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


_bpf_enums: dict[str, dict[str, int] | None] = {}


def kernel_enum(name: str) -> dict[str, int] | None:
    """name -> value of a BTF enum of the running kernel (cached); None without BTF."""
    if name not in _bpf_enums:
        try:
            from dpwatch.daemon.host import btf
            members = btf.read_enum(name)
        except Exception:
            members = None
        _bpf_enums[name] = {v: k for k, v in members.items()} if members else None
    return _bpf_enums[name]


def tcx_supported() -> tuple[bool, str]:
    """tcx links exist from kernel 6.6: the running kernel's BTF says whether its
    enum bpf_attach_type has BPF_TCX_INGRESS (numbers are taken from there too)."""
    types = kernel_enum("bpf_attach_type")
    if types is None:
        return False, "tcx: no kernel BTF to check for tcx links"
    if not all(t in types for t in TCX_ATTACH_TYPES):
        return False, "tcx: this kernel has no tcx links (6.6+)"
    cmds = kernel_enum("bpf_cmd") or {}
    if BPF_LINK_CREATE not in cmds:
        return False, "tcx: this kernel has no BPF_LINK_CREATE"
    return True, "tcx links available"


def tcx_link(prog_fd: int, ifindex: int, attach_type: str) -> int:
    """Attach prog_fd to one interface hook through a tcx link; returns the link's fd (the
    attachment lives exactly as long as this fd)."""
    from dpwatch.daemon.host.bpfstats import bpf_syscall
    attr = LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex,
                          attach_type=kernel_enum("bpf_attach_type")[attach_type])
    return bpf_syscall(kernel_enum("bpf_cmd")[BPF_LINK_CREATE], attr)
