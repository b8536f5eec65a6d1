"""The three ways the DNS probe hooks bpf/dns.c into the netns it was loaded in.

- ``SocketTap``: one AF_PACKET ETH_P_ALL socket with the program as its socket filter
  (every interface, both directions); gone with the process.
- ``TcxLinks``: tcx links (BPF_LINK_CREATE, probes/dns/bpfsys.py) on ingress and egress of
  every interface; a link lives as long as its fd, so a kill -9 leaves nothing attached. A
  link watch (daemon/host/linkwatch.py) links new interfaces as the kernel announces them.
- ``TcFilters``: legacy clsact filters through pyroute2; the kernel keeps a filter after a
  kill -9, so start-up removes those whose owner is gone.

Each has ``attach(module)``, ``rescan()`` (the sampler's pass: follow new and vanished
interfaces), ``close()`` (idempotent, also after a failed attach) and ``info()``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from dpwatch.daemon.host import paths
from dpwatch.probes.dns.bpfsys import TCX_ATTACH_TYPES, tcx_link

log = logging.getLogger("dpwatch.dns")

TC_PRIO = 0xD5            # the priority of dpwatch's clsact filters (ingress and egress)
TC_NAME_PREFIX = "dpwatch_dns_"  # + the owning pid: a stale filter names a dead process
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
SO_ATTACH_BPF = 50
ETH_P_ALL = 0x0003


def _all_failed(kind: str, errors: dict[str, str]) -> RuntimeError:
    errs = "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3])
    return RuntimeError(f"{kind} attach failed on every interface ({errs or 'no interfaces'})")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SocketTap:
    """The socket filter: one socket, bound to no interface, sees them all."""
    program = "dns_sock"

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def attach(self, module) -> None:
        from bcc import BPF
        fn = module.load_func(b"dns_sock", BPF.SOCKET_FILTER)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fn.fd)
            # The filter keeps 0 bytes of every packet, so nothing is ever queued; a tiny
            # buffer bounds what could be, should the filter ever be detached.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def rescan(self) -> None:
        """No per-interface state: the one socket sees new interfaces by itself."""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def info(self) -> dict[str, Any]:
        return {}


class TcxLinks:
    """tcx links on ingress and egress of every interface of the attaching thread's netns."""
    program = "dns_tc"

    def __init__(self) -> None:
        self.interfaces: dict[int, str] = {}   # ifindex -> name of the linked interfaces
        self.links: dict[int, list[int]] = {}  # ifindex -> link fds (ingress, egress)
        self.errors: dict[str, str] = {}
        self._prog_fd: int | None = None
        self._netns: int | None = None          # fd of the netns linked in
        self._lock = threading.Lock()           # scans from the link watch and the sampler
        self._watch = None                      # daemon.host.linkwatch.LinkWatch

    def attach(self, module) -> None:
        from bcc import BPF
        self._prog_fd = module.load_func(b"dns_tc", BPF.SCHED_CLS).fd
        # ifindexes are per netns: remember the attaching thread's, for the rescans.
        self._netns = os.open(paths.proc("thread-self", "ns", "net"), os.O_RDONLY | os.O_CLOEXEC)
        self.scan()
        if not self.interfaces:
            raise _all_failed("tcx", self.errors)
        self._start_watch()
        self.scan()  # links that came between the first scan and the watch

    def _start_watch(self) -> None:
        """Link a new interface as soon as the kernel announces it, not at the next sampler
        pass: a new pod's first DNS queries come in its first second. The link watch (made in
        this attaching thread, so in the linked netns) rescans on any link message; the scan
        is of the whole list, so a lost message (ENOBUFS) costs nothing but the wait for the
        sampler's own rescan, which stays as the backstop."""
        from dpwatch.daemon.host.linkwatch import LinkWatch
        self._watch = LinkWatch(lambda _at: self.scan(), name="dpwatch-dns-links",
                                fallback="new interfaces are linked at the sampler's rescan")

    def scan(self) -> None:
        """Link new interfaces (ingress and egress); close the links of vanished ones. Runs
        in the linked netns (start-up, the link watch, rescan()): ifindexes are per netns."""
        with self._lock:
            if self._prog_fd is None:
                return  # closed while a rescan was on its way
            present = dict(socket.if_nameindex())
            for index in [i for i in self.links if i not in present]:
                for fd in self.links.pop(index):
                    os.close(fd)
                self.interfaces.pop(index, None)
            for index, ifname in present.items():
                if index not in self.links:
                    self._link_one(index, ifname)

    def _link_one(self, index: int, ifname: str) -> None:
        fds: list[int] = []
        try:
            for attach_type in TCX_ATTACH_TYPES:
                fds.append(tcx_link(self._prog_fd, index, attach_type))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.errors[ifname] = f"{type(exc).__name__}: {exc}"
            return
        self.links[index] = fds
        self.interfaces[index] = ifname
        self.errors.pop(ifname, None)

    def rescan(self) -> None:
        """The sampler's pass, from whatever netns its thread is in."""
        if self._netns is None:
            return
        from dpwatch.daemon.host import netns
        try:
            if netns._same_netns(self._netns):
                self.scan()
            else:
                netns.run_in(paths.proc("self", "fd", str(self._netns)), self.scan)
        except Exception as exc:
            log.debug("dns tcx rescan: %s", exc)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        with self._lock:
            for fds in self.links.values():
                for fd in fds:
                    _close_quietly(fd)
            self.links.clear()
            self.interfaces.clear()
            self._prog_fd = None  # a rescan still on its way finds nothing to link
        if self._netns is not None:
            os.close(self._netns)
            self._netns = None

    def info(self) -> dict[str, Any]:
        return {"interfaces": sorted(self.interfaces.values()),
                "interface_errors": dict(list(self.errors.items())[:16]),
                "link_watch": self._watch.state if self._watch else "",
                "link_events": self._watch.events if self._watch else 0}


class TcFilters:
    """Legacy clsact filters at TC_PRIO, made through pyroute2 on a thread in the netns."""
    program = "dns_tc"

    def __init__(self) -> None:
        self.interfaces: dict[int, str] = {}   # ifindex -> name of interfaces with our filter
        self.errors: dict[str, str] = {}
        self.created: set[int] = set()          # ifindexes where dpwatch added the clsact qdisc
        self.stale_filters_removed = 0
        self._prog_fd: int | None = None
        self._worker = None
        self._ipr = None
        # One filter per dpwatch process at TC_PRIO: its handle and name carry the pid, so two
        # instances in one netns (tests, a rolling restart) never collide.
        self._handle = os.getpid() & 0xFFFFFFFF or 1

    def attach(self, module) -> None:
        from bcc import BPF
        from dpwatch.daemon.host.netns import NetnsWorker
        self._prog_fd = module.load_func(b"dns_tc", BPF.SCHED_CLS).fd
        self._worker = NetnsWorker(paths.proc("thread-self", "ns", "net"), name="dpwatch-dns-tc")

        def _open():
            from pyroute2 import IPRoute
            self._ipr = IPRoute()
        self._worker.call(_open)
        self.stale_filters_removed = self._worker.call(self._remove_stale, timeout=60)
        self._worker.call(self.scan, timeout=60)
        if not self.interfaces:
            raise _all_failed("tc", self.errors)

    def _links(self) -> dict[int, str]:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}

    def _our_filters(self, index: int, parent: int) -> list[tuple[int, str]]:
        """(handle, name) of bpf filters at dpwatch's priority on one hook."""
        out = []
        try:
            for msg in self._ipr.get_filters(index=index, parent=parent):
                if msg.get_attr("TCA_KIND") != "bpf" or (msg["info"] >> 16) != TC_PRIO:
                    continue
                opts = msg.get_attr("TCA_OPTIONS")
                name = (opts.get_attr("TCA_BPF_NAME") if opts is not None else None) or ""
                out.append((msg["handle"], name))
        except Exception:
            pass
        return out

    @staticmethod
    def _owner_gone(name: str) -> bool:
        """A filter of ours whose owning dpwatch is this one (a restart) or no longer runs
        (another running dpwatch in this netns keeps its own)."""
        if not name.startswith(TC_NAME_PREFIX):
            return False
        try:
            pid = int(name[len(TC_NAME_PREFIX):])
        except ValueError:
            return False
        return pid == os.getpid() or not os.path.exists(paths.proc(str(pid)))

    def _remove_stale(self) -> int:
        """Filters of a dpwatch that died without detaching (kill -9): the kernel keeps a tc
        filter, and its program, for as long as the interface lives. Remove those whose
        owner pid is gone."""
        removed = 0
        for index in self._links():
            for parent in (TC_INGRESS, TC_EGRESS):
                for handle, name in self._our_filters(index, parent):
                    if not self._owner_gone(name):
                        continue
                    try:
                        self._ipr.tc("del-filter", "bpf", index=index, handle=handle,
                                     parent=parent, prio=TC_PRIO)
                        removed += 1
                    except Exception as exc:
                        log.debug("stale dns filter on %s: %s", index, exc)
        return removed

    def scan(self) -> None:
        """Attach to interfaces that have no filter of ours yet; forget vanished ones."""
        present = self._links()
        for index in [i for i in self.interfaces if i not in present]:
            del self.interfaces[index]
            self.created.discard(index)
        for index, ifname in present.items():
            if index in self.interfaces:
                continue
            try:
                self._add_one(index)
                self.interfaces[index] = ifname
                self.errors.pop(ifname, None)
            except Exception as exc:
                self.errors[ifname] = f"{type(exc).__name__}: {exc}"
                self._detach_one(index)

    def _add_one(self, index: int) -> None:
        try:
            self._ipr.tc("add", "clsact", index=index)
            self.created.add(index)
        except Exception as exc:
            if "exists" not in str(exc).lower() and getattr(exc, "code", 0) != 17:
                raise
        for parent in (TC_INGRESS, TC_EGRESS):
            self._ipr.tc("add-filter", "bpf", index=index, handle=self._handle, fd=self._prog_fd,
                         name=f"{TC_NAME_PREFIX}{os.getpid()}", parent=parent, classid=1,
                         direct_action=True, prio=TC_PRIO)

    def _detach_one(self, index: int) -> None:
        for parent in (TC_INGRESS, TC_EGRESS):
            try:
                self._ipr.tc("del-filter", "bpf", index=index, handle=self._handle, parent=parent,
                             prio=TC_PRIO)
            except Exception:
                pass
        if index in self.created:
            # Remove the clsact qdisc dpwatch added, unless someone else has filters on it now.
            others = 0
            for parent in (TC_INGRESS, TC_EGRESS):
                try:
                    others += len(self._ipr.get_filters(index=index, parent=parent))
                except Exception:
                    others += 1
            if not others:
                try:
                    self._ipr.tc("del", "clsact", index=index)
                except Exception:
                    pass
            self.created.discard(index)

    def rescan(self) -> None:
        if self._worker is None:
            return
        try:
            self._worker.call(self.scan, timeout=30)
        except Exception as exc:
            log.debug("dns tc rescan: %s", exc)

    def close(self) -> None:
        if self._worker is None:
            return

        def _shut():
            if self._ipr is not None:
                for index in list(self.interfaces):
                    self._detach_one(index)
                self.interfaces.clear()
                self._ipr.close()
        try:
            self._worker.call(_shut, timeout=60)
        except Exception as exc:
            log.warning("dns: removing tc filters failed: %s", exc)
        finally:
            self._worker.close()
            self._worker, self._ipr = None, None

    def info(self) -> dict[str, Any]:
        return {"interfaces": sorted(self.interfaces.values()),
                "interface_errors": dict(list(self.errors.items())[:16]),
                "stale_filters_removed": self.stale_filters_removed}


BACKENDS = {"socket": SocketTap, "tcx": TcxLinks, "tc": TcFilters}
