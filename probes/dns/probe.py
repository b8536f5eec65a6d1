"""dns: DNS over UDP on every interface of the daemon's netns: queries by qtype, responses by
rcode, latency histograms per rcode, timeouts, unmatched and malformed packets, per-server
counters, recent names (under a privacy mode) and search-path amplification.

Kernel side: bpf/dns.c, one body loaded as
- ``tcx`` (default on kernels 6.6+): the classifier attached to ingress and egress of every
  interface through tcx bpf links (BPF_LINK_CREATE). A link lives only as long as its file
  descriptor, so a kill -9 leaves nothing attached: the kernel detaches it with the process.
  New interfaces are picked up on the sampler thread;
- ``socket`` (default before 6.6): one AF_PACKET ETH_P_ALL socket (not bound to an interface)
  with the program as its socket filter; also gone with the process;
- ``tc`` (only with --dns-hook tc): legacy clsact filters attached with pyroute2. Cheaper than
  the socket on old kernels, but the kernel keeps a filter (and its program) after a kill -9
  until the next dpwatch start removes it.
BENCHMARKS.md ("DNS") has the figures behind that order.

User space (here): a sweep at every reading (the sampler's, and a report's fresh one)
counts queries unanswered after --dns-timeout as timeouts and deletes them; per-server counters are folded into at most
--dns-top-servers labels plus "other"; names only leave the daemon through the privacy mode
(probes/dns/names.py).
"""

from __future__ import annotations

import collections
import ctypes
import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from dpwatch.probes.dns import names as dn
from dpwatch.probes.dns import params as params_mod
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window
from dpwatch.probes.sample import p_value, share_exceeds

log = logging.getLogger("dpwatch.dns")

STATS = ("queries", "responses", "unmatched", "malformed", "duplicate_queries",
         "duplicate_responses", "retransmits", "packets", "unreadable", "duplicate_malformed")   # index = DNS_ST_* in bpf/dns.c
TC_PRIO = 0xD5            # the priority of dpwatch's clsact filters (ingress and egress)
TC_NAME_PREFIX = "dpwatch_dns_"  # + the owning pid: a stale filter names a dead process
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
DEDUP_NS = 100_000_000    # bpf DNS_DEDUP_NS: sightings of one packet within 100 ms are one
ANSWERED_KEEP_NS = 1_000_000_000  # answered entries are swept after this (well past DEDUP_NS)
NAME_HISTORY_MAX = 20_000  # (interval, name) counts kept for windows (~500 B each, ~10 MiB); oldest dropped first


TCX_ATTACH_TYPES = ("BPF_TCX_INGRESS", "BPF_TCX_EGRESS")
BPF_LINK_CREATE = "BPF_LINK_CREATE"


class _LinkCreateAttr(ctypes.Structure):
    """union bpf_attr, the link_create member, with its tcx part (no relative position)."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


_bpf_enums: dict[str, dict[str, int] | None] = {}


def _kernel_enum(name: str) -> dict[str, int] | None:
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
    types = _kernel_enum("bpf_attach_type")
    if types is None:
        return False, "tcx: no kernel BTF to check for tcx links"
    if not all(t in types for t in TCX_ATTACH_TYPES):
        return False, "tcx: this kernel has no tcx links (6.6+)"
    cmds = _kernel_enum("bpf_cmd") or {}
    if BPF_LINK_CREATE not in cmds:
        return False, "tcx: this kernel has no BPF_LINK_CREATE"
    return True, "tcx links available"


def tcx_link(prog_fd: int, ifindex: int, attach_type: str) -> int:
    """Attach prog_fd to one interface hook through a tcx link; returns the link's fd (the
    attachment lives exactly as long as this fd)."""
    from dpwatch.daemon.host.bpfstats import bpf_syscall
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex,
                           attach_type=_kernel_enum("bpf_attach_type")[attach_type])
    return bpf_syscall(_kernel_enum("bpf_cmd")[BPF_LINK_CREATE], attr)


def decode_stats(table) -> dict[str, int]:
    """dns_stats (per-CPU array) -> {name: total}. Reusable by tests and fuzzers."""
    out = {}
    for i, name in enumerate(STATS):
        out[name] = int(sum(table[table.Key(i)]))
    return out


def decode_array(table, size: int) -> list[int]:
    """A per-CPU array of u64 -> totals per index (one syscall per index is slow for 272
    entries; items() reads them all)."""
    out = [0] * size
    for key, per_cpu in table.items():
        if key.value < size:
            out[key.value] = int(sum(per_cpu))
    return out


def decode_counters(module) -> dict[str, Any]:
    """Everything the kernel counted, as plain Python: stats, qtype and rcode counts, the
    latency histogram per rcode and the latency sums (seconds)."""
    qt = decode_array(module[b"dns_qtypes"], dn.QTYPE_SLOTS)
    rc = decode_array(module[b"dns_rcodes"], dn.RCODES)
    hist = decode_array(module[b"dns_hist"], dn.RCODES * dn.BUCKETS)
    ls = decode_array(module[b"dns_latsum"], dn.RCODES)
    return {
        "stats": decode_stats(module[b"dns_stats"]),
        "qtypes": {i: n for i, n in enumerate(qt) if n},
        "rcodes": {i: n for i, n in enumerate(rc) if n},
        "hist": {r: hist[r * dn.BUCKETS:(r + 1) * dn.BUCKETS] for r in range(dn.RCODES)
                 if any(hist[r * dn.BUCKETS:(r + 1) * dn.BUCKETS])},
        "latency_sum": {r: ls[r] / 1e9 for r in range(dn.RCODES) if ls[r]},
    }


def addr_text(raw: bytes, family: int) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(bytes(raw[12:16])))
    return str(ipaddress.IPv6Address(bytes(raw)))


def server_label(raw: bytes, port: int, family: int) -> str:
    a = addr_text(raw, family)
    if port == 53:
        return a
    return f"{a}:{port}" if family == 4 else f"[{a}]:{port}"


class DnsProbe(Probe):
    name = "dns"
    bpf_source = "dns.c"
    description = ("DNS over UDP: queries by qtype, responses by rcode, latency, timeouts, "
                   "malformed packets, per-server counters and search-path storms")
    finding_ids = ("dns.latency_high", "dns.timeouts", "dns.errors", "dns.nxdomain_rate",
                   "dns.search_path_amplification")
    params, param_group = params_mod.PARAMS, params_mod.GROUP
    modes = (
        Mode("tcx", (Hook("bpf_link", "tcx ingress+egress on every interface (kernel 6.6+)"),),
             "classifier on tcx links on every interface of the netns, both directions "
             "(detached by the kernel when dpwatch exits, however it exits)"),
        Mode("socket", (Hook("socket_filter", "AF_PACKET ETH_P_ALL"),),
             "AF_PACKET socket filter on one ETH_P_ALL socket (every interface, both "
             "directions; costs more per packet than tc, see BENCHMARKS.md)"),
        Mode("tc", (Hook("netlink", "tc clsact ingress+egress on every interface"),),
             "legacy tc clsact classifier on every interface of the netns, both directions "
             "(a kill -9 leaves its filters until the next start)"),
    )
    error_slots = {"DNS_ERR_PENDING": "dns_pending", "DNS_ERR_SERVERS": "dns_servers",
                   "DNS_ERR_NAMES": "dns_names", "DNS_ERR_SEEN": "dns_seen"}

    def __init__(self, config: Any):
        super().__init__(config)
        self.privacy = dn.Privacy(getattr(config, "dns_names", "suffix"))
        self._lock = threading.Lock()
        self._sock = None            # socket mode: the AF_PACKET socket
        self._tc: dict[int, str] = {}  # tc/tcx mode: ifindex -> name of interfaces with our hook
        self._tcx_links: dict[int, list[int]] = {}  # tcx mode: ifindex -> link fds
        self._tcx_netns: int | None = None           # tcx mode: fd of the netns linked in
        self._tc_fd: int | None = None                # the dns_tc program (tc and tcx modes)
        self._tcx_lock = threading.Lock()             # scans from the link watch and the sampler
        self._link_watch = None                       # tcx mode: daemon.linkwatch.LinkWatch
        self._tc_created: set[int] = set()  # ifindexes where dpwatch added the clsact qdisc
        self._tc_errors: dict[str, str] = {}
        self._worker = None
        self._ipr = None
        # One filter per dpwatch process at TC_PRIO: its handle and name carry the pid, so two
        # instances in one netns (tests, a rolling restart) never collide.
        self._handle = os.getpid() & 0xFFFFFFFF or 1
        self.stale_filters_removed = 0
        # per-server folding into top-N labels
        self._srv_last: dict[bytes, tuple] = {}
        self._srv_label: dict[bytes, str] = {}
        self._srv_acc: dict[str, dict] = {}
        self._timeouts: dict[str, int] = {}
        self.timeouts_total = 0
        self.swept_answered = 0
        # names: cumulative counts per name key, and per-interval deltas for windows
        self._names_last: dict[tuple, int] = {}
        self._names_hist: collections.deque = collections.deque()
        self._names_hist_size = 0
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()  # the sampler's pass and a report's fresh reading
        self.search_list: list[str] = []

    # -- selection and compile ------------------------------------------------------
    def choose_mode(self, features) -> tuple[Mode | None, str]:
        hook = getattr(self.config, "dns_hook", "auto")
        tcx, sock, tc = self.modes
        have_tcx, why = tcx_supported()
        if hook == "socket":
            return sock, "--dns-hook socket: " + sock.description
        if hook == "tc":
            return tc, "--dns-hook tc: " + tc.description
        if hook == "tcx":
            return (tcx, tcx.description) if have_tcx else (None, f"--dns-hook tcx: {why}")
        if have_tcx:
            return tcx, tcx.description
        return sock, f"{why}; {sock.description}"

    def fallback_modes(self, features) -> list[Mode]:
        # Every mode runs the same compiled code: socket is a fallback without a recompile.
        if self.mode is self.modes[0] and getattr(self.config, "dns_hook", "auto") == "auto":
            return [self.modes[1]]
        return []

    def cflags(self, features) -> list[str]:
        cfg = self.config
        ports = list(dict.fromkeys(int(p) for p in cfg.dns_ports))[:8]
        flags = [f"-DDNS_PORT{i}={p}" for i, p in enumerate(ports)]
        flags += [f"-DDNS_PORT{i}=0" for i in range(len(ports), 8)]
        names = 0 if self.privacy.mode == "off" else int(cfg.dns_names_entries)
        flags += [f"-DDNS_PENDING_MAX={int(cfg.dns_pending_entries)}",
                  f"-DDNS_SERVERS_MAX={int(cfg.dns_servers_entries)}",
                  f"-DDNS_NAMES_MAX={names}",
                  f"-DDNS_DEDUP_NS={DEDUP_NS}ULL"]
        return flags

    # -- attach / detach ------------------------------------------------------------
    def attach(self, module) -> None:
        self.module = module
        self._attached = []
        self.search_list = dn.read_search_list(self.config.dns_resolv_conf)
        if self.mode.name == "tcx":
            self._attach_tcx()
        elif self.mode.name == "tc":
            self._attach_tc()
        else:
            self._attach_socket()
        self._attached = list(self.mode.hooks)

    def _attach_socket(self) -> None:
        from bcc import BPF
        fn = self.module.load_func(b"dns_sock", BPF.SOCKET_FILTER)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.htons(0x0003))  # ETH_P_ALL, bound to no interface
        try:
            SO_ATTACH_BPF = 50
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fn.fd)
            # The filter keeps 0 bytes of every packet, so nothing is ever queued; a tiny
            # buffer bounds what could be, should the filter ever be detached.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def _attach_tcx(self) -> None:
        from bcc import BPF
        fn = self.module.load_func(b"dns_tc", BPF.SCHED_CLS)
        self._tc_fd = fn.fd
        # ifindexes are per netns: remember the attaching thread's, for the rescans.
        self._tcx_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._scan_tcx()
        if not self._tc:
            errs = "; ".join(f"{k}: {v}" for k, v in list(self._tc_errors.items())[:3])
            self._close_tcx()
            raise RuntimeError(f"tcx attach failed on every interface ({errs or 'no interfaces'})")
        self._start_link_watch()
        self._scan_tcx()  # links that came between the first scan and the watch

    def _start_link_watch(self) -> None:
        """Link a new interface as soon as the kernel announces it, not at the next sampler
        pass: a new pod's first DNS queries come in its first second. The link watch
        (daemon/host/linkwatch.py, made in this attaching thread, so in the linked netns) rescans
        on any link message; the scan is of the whole list, so a lost message (ENOBUFS) costs
        nothing but the wait for the sampler's own rescan, which stays as the backstop."""
        from dpwatch.daemon.host.linkwatch import LinkWatch
        self._link_watch = LinkWatch(lambda _at: self._scan_tcx(), name="dpwatch-dns-links",
                                fallback="new interfaces are linked at the sampler's rescan")

    def _stop_link_watch(self) -> None:
        if self._link_watch is not None:
            self._link_watch.stop()

    def _scan_tcx(self) -> None:
        """Link new interfaces (ingress and egress); close the links of vanished ones. Runs
        in the daemon's netns (start-up, the link watch and the sampler thread): ifindexes
        are per netns."""
        with self._tcx_lock:
            self._scan_tcx_locked()

    def _scan_tcx_locked(self) -> None:
        if self._tc_fd is None:
            return  # closed while a rescan was on its way
        links = dict(socket.if_nameindex())
        for index in [i for i in self._tcx_links if i not in links]:
            for fd in self._tcx_links.pop(index):
                os.close(fd)
            self._tc.pop(index, None)
        for index, ifname in links.items():
            if index in self._tcx_links:
                continue
            fds: list[int] = []
            try:
                for attach_type in TCX_ATTACH_TYPES:
                    fds.append(tcx_link(self._tc_fd, index, attach_type))
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                self._tc_errors[ifname] = f"{type(exc).__name__}: {exc}"
                continue
            self._tcx_links[index] = fds
            self._tc[index] = ifname
            self._tc_errors.pop(ifname, None)

    def _close_tcx(self) -> None:
        self._stop_link_watch()
        with self._tcx_lock:
            for index, fds in self._tcx_links.items():
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._tc.pop(index, None)
            self._tcx_links.clear()
            if self.mode is not None and self.mode.name == "tcx":
                self._tc_fd = None  # a rescan still on its way finds nothing to link
        if self._tcx_netns is not None:
            os.close(self._tcx_netns)
            self._tcx_netns = None

    def _attach_tc(self) -> None:
        from bcc import BPF
        from dpwatch.daemon.host.netns import NetnsWorker
        fn = self.module.load_func(b"dns_tc", BPF.SCHED_CLS)
        self._tc_fd = fn.fd
        self._worker = NetnsWorker("/proc/thread-self/ns/net", name="dpwatch-dns-tc")

        def _open():
            from pyroute2 import IPRoute
            self._ipr = IPRoute()
        try:
            self._worker.call(_open)
            self.stale_filters_removed = self._worker.call(self._remove_stale, timeout=60)
            self._worker.call(self._scan_tc, timeout=60)
        except Exception:
            self._close_tc()
            raise
        if not self._tc:
            errs = "; ".join(f"{k}: {v}" for k, v in list(self._tc_errors.items())[:3])
            self._close_tc()
            raise RuntimeError(f"tc attach failed on every interface ({errs or 'no interfaces'})")

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

    def _remove_stale(self) -> int:
        """Filters of a dpwatch that died without detaching (kill -9): the kernel keeps a tc
        filter, and its program, for as long as the interface lives. Remove those whose
        owner pid is gone (another running dpwatch in this netns keeps its own)."""
        removed = 0
        for index in self._links():
            for parent in (TC_INGRESS, TC_EGRESS):
                for handle, name in self._our_filters(index, parent):
                    if not name.startswith(TC_NAME_PREFIX):
                        continue
                    try:
                        pid = int(name[len(TC_NAME_PREFIX):])
                    except ValueError:
                        continue
                    if pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
                        continue
                    try:
                        self._ipr.tc("del-filter", "bpf", index=index, handle=handle,
                                     parent=parent, prio=TC_PRIO)
                        removed += 1
                    except Exception as exc:
                        log.debug("stale dns filter on %s: %s", index, exc)
        return removed

    def _scan_tc(self) -> None:
        """Attach to interfaces that have no filter of ours yet; forget vanished ones."""
        links = self._links()
        for index in [i for i in self._tc if i not in links]:
            del self._tc[index]
            self._tc_created.discard(index)
        name = f"{TC_NAME_PREFIX}{os.getpid()}"
        for index, ifname in links.items():
            if index in self._tc:
                continue
            try:
                try:
                    self._ipr.tc("add", "clsact", index=index)
                    self._tc_created.add(index)
                except Exception as exc:
                    if "exists" not in str(exc).lower() and getattr(exc, "code", 0) != 17:
                        raise
                for parent in (TC_INGRESS, TC_EGRESS):
                    self._ipr.tc("add-filter", "bpf", index=index, handle=self._handle, fd=self._tc_fd,
                                 name=name, parent=parent, classid=1, direct_action=True,
                                 prio=TC_PRIO)
                self._tc[index] = ifname
                self._tc_errors.pop(ifname, None)
            except Exception as exc:
                self._tc_errors[ifname] = f"{type(exc).__name__}: {exc}"
                self._detach_tc_one(index)

    def _detach_tc_one(self, index: int) -> None:
        for parent in (TC_INGRESS, TC_EGRESS):
            try:
                self._ipr.tc("del-filter", "bpf", index=index, handle=self._handle, parent=parent,
                             prio=TC_PRIO)
            except Exception:
                pass
        if index in self._tc_created:
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
            self._tc_created.discard(index)

    def _close_tc(self) -> None:
        if self._worker is None:
            return

        def _shut():
            if self._ipr is not None:
                for index in list(self._tc):
                    self._detach_tc_one(index)
                self._tc.clear()
                self._ipr.close()
        try:
            self._worker.call(_shut, timeout=60)
        except Exception as exc:
            log.warning("dns: removing tc filters failed: %s", exc)
        finally:
            self._worker.close()
            self._worker, self._ipr = None, None

    @property
    def programs(self) -> list[str]:
        if self.mode is None or not getattr(self, "_attached", None):
            return []
        return ["dns_tc" if self.mode.name in ("tc", "tcx") else "dns_sock"]

    def detach(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._close_tcx()
        self._close_tc()
        self._attached = []

    def close(self) -> None:
        if (self.module is not None or self._worker is not None or self._sock is not None
                or self._tcx_netns is not None):
            self.detach()
        self.module = None

    # -- background: timeouts sweep, names history, new interfaces --------------------------
    def background(self) -> None:
        self.sweep()
        self._record_names()
        if self.mode is not None and self.mode.name == "tcx" and self._tcx_netns is not None:
            from dpwatch.daemon.host import netns
            try:
                if netns._same_netns(self._tcx_netns):
                    self._scan_tcx()
                else:
                    netns.run_in(f"/proc/self/fd/{self._tcx_netns}", self._scan_tcx)
            except Exception as exc:
                log.debug("dns tcx rescan: %s", exc)
        if self.mode is not None and self.mode.name == "tc" and self._worker is not None:
            try:
                self._worker.call(self._scan_tc, timeout=30)
            except Exception as exc:
                log.debug("dns tc rescan: %s", exc)

    def sweep(self, now_ns: int | None = None) -> int:
        """Count queries unanswered after --dns-timeout as timeouts and delete them; delete
        answered entries once no second sighting of their response can come. Returns the
        number of timeouts found."""
        if self.module is None:
            return 0
        with self._sweep_lock:  # two sweeps at once would count one query twice
            return self._sweep(now_ns)

    def _sweep(self, now_ns: int | None) -> int:
        now = time.monotonic_ns() if now_ns is None else now_ns
        limit = int(self.config.dns_timeout * 1e9)
        table = self.table("dns_pending")
        found = 0
        dead = []
        for key, val in table.items():
            if val.answered_ns:
                if now - int(val.answered_ns) > ANSWERED_KEEP_NS:
                    dead.append(key)
                continue
            if now - int(val.ts) >= limit:
                dead.append(key)
                label = self._label_for(bytes(key.server), int(key.sport), int(key.family))
                with self._lock:
                    self._timeouts[label] = self._timeouts.get(label, 0) + 1
                    self.timeouts_total += 1
                found += 1
        for key in dead:
            try:
                del table[key]
            except KeyError:
                pass
        self.swept_answered += len(dead) - found
        self._last_sweep = time.monotonic()
        return found

    # -- per-server folding ---------------------------------------------------------------
    def _label_for(self, raw: bytes, port: int, family: int) -> str:
        k = raw + port.to_bytes(2, "big") + bytes([family])
        with self._lock:
            label = self._srv_label.get(k)
            if label is None and len(set(self._srv_label.values())) < int(self.config.dns_top_servers):
                label = self._srv_label[k] = server_label(raw, port, family)
            return label or "other"

    def _fold_servers(self) -> None:
        table = self.table("dns_servers")
        rows = []
        for key, per_cpu in table.items():
            q = sum(int(v.queries) for v in per_cpu)
            lat = sum(int(v.latency_ns) for v in per_cpu)
            rc = tuple(sum(int(v.rcodes[i]) for v in per_cpu) for i in range(dn.RCODES))
            rows.append((bytes(key.addr), int(key.port), int(key.family), q, lat, rc))
        rows.sort(key=lambda r: -r[3])  # busiest first: they get the free labels
        for raw, port, family, q, lat, rc in rows:
            k = raw + port.to_bytes(2, "big") + bytes([family])
            label = self._label_for(raw, port, family)
            with self._lock:
                last = self._srv_last.get(k)
                if last is None or q < last[0] or lat < last[1]:
                    last = (0, 0, (0,) * dn.RCODES)  # new, or evicted from the LRU and re-added
                acc = self._srv_acc.setdefault(label, {"queries": 0, "latency": 0,
                                                       "rcodes": [0] * dn.RCODES})
                acc["queries"] += q - last[0]
                acc["latency"] += lat - last[1]
                for i in range(dn.RCODES):
                    acc["rcodes"][i] += max(0, rc[i] - last[2][i])
                self._srv_last[k] = (q, lat, rc)
        if len(self._srv_last) > 4 * int(self.config.dns_servers_entries):
            with self._lock:  # keys long gone from the LRU: forget their last values
                present = {r[0] + r[1].to_bytes(2, "big") + bytes([r[2]]) for r in rows}
                self._srv_last = {k: v for k, v in self._srv_last.items() if k in present}

    # -- names ------------------------------------------------------------------------------
    def read_names(self) -> dict[tuple[str, str, str], int]:
        """{(rcode, qtype, full name text): cumulative count} from the names LRU."""
        if self.privacy.mode == "off" or self.module is None:
            return {}
        out: dict[tuple[str, str, str], int] = {}
        for key, val in self.table("dns_names").items():
            keep = min(int(key.len), dn.NAME_KEEP)
            text = dn.wire_to_text(bytes(key.name)[:keep], int(key.len))
            k = (dn.rcode_name(int(key.rcode)), dn.qtype_name(int(key.qtype)), text)
            out[k] = out.get(k, 0) + int(val.count)
        return out

    def _record_names(self) -> None:
        now = time.monotonic()
        cur = self.read_names()
        with self._lock:
            d = {k: v for k, v in _delta(self._names_last, cur).items() if v}
            self._names_last = cur
            if d:
                self._names_hist.append((now, d))
                self._names_hist_size += len(d)
            horizon = now - float(getattr(self.config, "max_window", 3600)) - 10
            while self._names_hist and (self._names_hist[0][0] < horizon
                                        or self._names_hist_size > NAME_HISTORY_MAX):
                _, old = self._names_hist.popleft()
                self._names_hist_size -= len(old)

    def names_in_window(self, seconds: float) -> dict[tuple[str, str, str], int]:
        """Answers per (rcode, qtype, name) over the last ``seconds``: the recorded intervals
        plus what came since the last one."""
        since = time.monotonic() - seconds
        out: dict[tuple[str, str, str], int] = {}
        cur = self.read_names()
        with self._lock:
            for at, d in self._names_hist:
                if at >= since:
                    for k, v in d.items():
                        out[k] = out.get(k, 0) + v
            for k, v in _delta(self._names_last, cur).items():
                if v:
                    out[k] = out.get(k, 0) + v
        return out

    # -- collection ---------------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        # Queries already past --dns-timeout are timeouts now, also for a report's fresh
        # reading: without this they waited for the sampler's next pass (up to one interval).
        self.sweep()
        c = decode_counters(self.module)
        self._fold_servers()
        hist = {}
        for r, b in c["hist"].items():
            for i, n in enumerate(b):
                if n:
                    hist[(dn.rcode_name(r), i)] = n
        with self._lock:
            srv_q = {lab: a["queries"] for lab, a in self._srv_acc.items()}
            srv_lat = {lab: a["latency"] / 1e9 for lab, a in self._srv_acc.items()}
            srv_r = {(lab, dn.rcode_name(i)): n for lab, a in self._srv_acc.items()
                     for i, n in enumerate(a["rcodes"]) if n}
            timeouts = dict(self._timeouts)
        st = c["stats"]
        return {"counters": {
            "queries": {dn.qtype_name(q): n for q, n in c["qtypes"].items()},
            "responses": {dn.rcode_name(r): n for r, n in c["rcodes"].items()},
            "hist": hist,
            "latency_sum": {dn.rcode_name(r): s for r, s in c["latency_sum"].items()},
            "stats": st,
            "timeouts": timeouts,
            "server_queries": srv_q,
            "server_responses": srv_r,
            "server_latency": srv_lat,
        }, "gauges": {}}

    def metrics(self, reading: Reading) -> Iterable:
        cnt = reading["counters"]
        q = CounterMetricFamily("dpwatch_dns_queries", "DNS queries seen (each once, however "
                                "many interfaces it crossed), by qtype.", labels=["qtype"])
        for name in ("A", "AAAA"):
            cnt["queries"].setdefault(name, 0)
        for name, n in sorted(cnt["queries"].items()):
            q.add_metric([name], n)
        yield q
        r = CounterMetricFamily("dpwatch_dns_responses", "DNS responses matched to a query, by "
                                "rcode.", labels=["rcode"])
        resp = dict(cnt["responses"])
        for name in ("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED"):
            resp.setdefault(name, 0)
        for name, n in sorted(resp.items()):
            r.add_metric([name], n)
        yield r
        h = HistogramMetricFamily("dpwatch_dns_request_duration_seconds", "Time from a DNS "
                                  "query to its response, by rcode (log2 buckets from 0.25 ms "
                                  "to 8.192 s).", labels=["rcode"])
        by_rcode: dict[str, list[int]] = {}
        for (rc, b), n in cnt["hist"].items():
            by_rcode.setdefault(rc, [0] * dn.BUCKETS)[b] += n
        by_rcode.setdefault("NOERROR", [0] * dn.BUCKETS)
        for rc, buckets in sorted(by_rcode.items()):
            cum, rows = 0, []
            for i, bound in enumerate(dn.BUCKET_BOUNDS):
                cum += buckets[i]
                rows.append((_le(bound), cum))
            rows.append(("+Inf", cum + buckets[-1]))
            h.add_metric([rc], rows, cnt["latency_sum"].get(rc, 0.0))
        yield h
        t = CounterMetricFamily("dpwatch_dns_timeouts", "DNS queries with no response within "
                                "--dns-timeout, by server (top --dns-top-servers, the rest "
                                "\"other\").", labels=["server"])
        touts = dict(cnt["timeouts"])
        touts.setdefault("other", 0)
        for lab, n in sorted(touts.items()):
            t.add_metric([lab], n)
        yield t
        st = cnt["stats"]
        yield CounterMetricFamily("dpwatch_dns_unmatched_responses", "DNS responses with no "
                                  "query seen (the query was before start-up, evicted, timed "
                                  "out, or answered already).", value=st.get("unmatched", 0))
        yield CounterMetricFamily("dpwatch_dns_malformed_packets", "UDP packets to or from a "
                                  "DNS port that are not a parseable DNS message (counted "
                                  "once per datagram).", value=st.get("malformed", 0))
        sq = CounterMetricFamily("dpwatch_dns_server_queries", "DNS queries by server (top "
                                 "--dns-top-servers, the rest \"other\").", labels=["server"])
        for lab, n in sorted(cnt["server_queries"].items()):
            sq.add_metric([lab], n)
        yield sq
        sr = CounterMetricFamily("dpwatch_dns_server_responses", "DNS responses by server and "
                                 "rcode (top --dns-top-servers, the rest \"other\").",
                                 labels=["server", "rcode"])
        for (lab, rc), n in sorted(cnt["server_responses"].items()):
            sr.add_metric([lab, rc], n)
        yield sr

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hook": self.mode.name if self.mode else None,
            "ports": list(self.config.dns_ports), "timeout_seconds": self.config.dns_timeout,
            "privacy": self.privacy.mode, "search_list": self.search_list,
            "timeouts": self.timeouts_total,
        }
        if self.module is not None:
            out["stats"] = decode_stats(self.table("dns_stats"))
        if self.mode is not None and self.mode.name in ("tc", "tcx"):
            out["interfaces"] = sorted(self._tc.values())
            out["interface_errors"] = dict(list(self._tc_errors.items())[:16])
        if self.mode is not None and self.mode.name == "tcx":
            out["link_watch"] = self._link_watch.state if self._link_watch else ""
            out["link_events"] = self._link_watch.events if self._link_watch else 0
        if self.mode is not None and self.mode.name == "tc":
            out["stale_filters_removed"] = self.stale_filters_removed
        return out

    # -- findings -------------------------------------------------------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        cfg = self.config
        findings: list[Finding] = []
        queries = sum(window.delta("queries").values())
        responses_by = window.delta("responses")
        responses = sum(responses_by.values())
        timeouts_by = window.delta("timeouts")
        timeouts = sum(timeouts_by.values())
        hist: dict[str, list[float]] = {}
        for (rc, b), n in window.delta("hist").items():
            hist.setdefault(rc, [0.0] * dn.BUCKETS)[b] += n
        all_buckets = [sum(v[i] for v in hist.values()) for i in range(dn.BUCKETS)]
        names = self.names_in_window(window.seconds) if self.privacy.mode != "off" else {}
        per_server = self._server_evidence(window)

        def pct(n: float, d: float) -> float:
            return round(100.0 * n / d, 2) if d else 0.0

        def q_ms(buckets, q):
            v = dn.quantile(buckets, q)
            return None if v is None else round(v * 1000, 2)

        base_ev = {"window_seconds": round(window.seconds, 1), "queries": int(queries),
                   "queries_per_second": round(window.rate(queries), 3),
                   "responses": int(responses),
                   "latency_p50_ms": q_ms(all_buckets, 0.5), "latency_p90_ms": q_ms(all_buckets, 0.9),
                   "latency_p99_ms": q_ms(all_buckets, 0.99)}

        # latency: enough answers over the threshold that the true p99 cannot be below it
        n_lat = sum(all_buckets)
        slow = dn.count_above(all_buckets, cfg.dns_latency_p99)
        if share_exceeds(slow, n_lat, 0.01):
            ev = dict(base_ev)
            ev["answers"] = int(n_lat)
            ev["answers_over_threshold"] = int(slow)
            ev["threshold_p99_ms"] = round(cfg.dns_latency_p99 * 1000, 2)
            ev["p_value_if_p99_were_below"] = p_value(slow, n_lat, 0.01)
            ev["by_rcode_p99_ms"] = {rc: q_ms(b, 0.99) for rc, b in sorted(hist.items())}
            ev["by_server"] = per_server
            ev["slowest_names"] = self._top_names(names, None, 5)
            # Critical when the same rule holds at 5x the threshold (a log2 bucket's top would
            # make 800 ms answers look like a 1 s p99).
            very = share_exceeds(dn.count_above(all_buckets, 5 * cfg.dns_latency_p99), n_lat, 0.01)
            findings.append(Finding(
                id="dns.latency_high", probe=self.name,
                severity="critical" if very else "warning",
                title="DNS answers are slow",
                summary=(f"{int(slow)} of {int(n_lat)} DNS answers took longer than "
                         f"{ev['threshold_p99_ms']:g} ms (p50 {ev['latency_p50_ms']} ms, p99 "
                         f"{ev['latency_p99_ms']} ms): too many for the p99 to be under the threshold. "
                         "Every connection that starts with a lookup waits this long."),
                evidence=ev, claims=("answers_over_threshold",),
                remediation=[
                    "find the slow server in by_server and check its CPU and upstream latency: "
                    "kubectl -n kube-system top pod -l k8s-app=kube-dns",
                    "deploy NodeLocal DNSCache so pods get answers from a cache on their own node "
                    "(https://kubernetes.io/docs/tasks/administer-cluster/nodelocaldns/)",
                    "raise the CoreDNS cache (cache 300 in the Corefile) and the replica count if "
                    f"its p99 stays above {ev['threshold_p99_ms']} ms",
                ],
                impact=window.rate(slow)))

        if timeouts:
            tp = pct(timeouts, max(queries, timeouts))
            if share_exceeds(timeouts, max(queries, timeouts), cfg.dns_timeout_percent / 100):
                ev = dict(base_ev)
                ev.update({"timeouts": int(timeouts), "timeouts_per_second": round(window.rate(timeouts), 3),
                           "timeout_percent": tp, "timeout_seconds": cfg.dns_timeout,
                           "by_server": {k: int(v) for k, v in sorted(timeouts_by.items(), key=lambda kv: -kv[1])},
                           "unmatched_responses": int(window.delta("stats").get("unmatched", 0))})
                worst = max(timeouts_by, key=timeouts_by.get)
                findings.append(Finding(
                    id="dns.timeouts", probe=self.name,
                    severity="critical" if tp >= min(100.0, 10 * cfg.dns_timeout_percent) else "warning",
                    title="DNS queries get no answer", claims=("timeouts",),
                    summary=(f"{int(timeouts)} DNS queries ({tp}% of {int(queries)}) had no answer "
                             f"within {cfg.dns_timeout:g}s; server {worst} has the most. Clients "
                             "wait a full resolver timeout (glibc: 5 s) before retrying."),
                    evidence=ev,
                    remediation=[
                        f"check the server answers at all: dig @{_server_host(worst)} kubernetes.default.svc."
                        f"{cfg.dns_cluster_domain} +tries=1 +time=2",
                        "conntrack -S   # insert_failed growing: the UDP conntrack race that drops "
                        "parallel A/AAAA queries; use 'options single-request-reopen' or NodeLocal DNSCache",
                        "kubectl -n kube-system get endpoints kube-dns   # no ready endpoints = timeouts",
                        "look for dropped DNS packets in the drops probe's findings (NETFILTER_DROP, "
                        "SOCKET_RCVBUFF on the server)",
                    ],
                    impact=window.rate(timeouts)))

        errors = {rc: responses_by.get(rc, 0) for rc in ("SERVFAIL", "REFUSED")}
        n_err = sum(errors.values())
        if n_err:
            ep = pct(n_err, responses)
            if share_exceeds(n_err, responses, cfg.dns_error_percent / 100):
                ev = dict(base_ev)
                ev.update({"errors": int(n_err), "servfail": int(errors["SERVFAIL"]),
                           "refused": int(errors["REFUSED"]),
                           "error_percent": ep, "errors_per_second": round(window.rate(n_err), 3),
                           "by_server": per_server,
                           "top_names": (self._top_names(names, "SERVFAIL", 5)
                                         + self._top_names(names, "REFUSED", 5))})
                findings.append(Finding(
                    id="dns.errors", probe=self.name,
                    severity="critical" if ep >= min(100.0, 10 * cfg.dns_error_percent) else "warning",
                    title="DNS servers answer with errors", claims=("errors",),
                    summary=(f"{int(n_err)} of {int(responses)} DNS answers ({ep}%) were errors: "
                             f"SERVFAIL {int(errors['SERVFAIL'])}, REFUSED {int(errors['REFUSED'])}."),
                    evidence=ev,
                    remediation=[
                        "SERVFAIL: the server could not reach its upstream or DNSSEC failed; check the "
                        "forward plugin's upstreams: kubectl -n kube-system logs -l k8s-app=kube-dns | grep -i error",
                        "REFUSED: the server is not configured for these names or clients (ACL, "
                        "zone not served); the names are in top_names",
                        "per server in by_server: one bad server behind a Service gives a share of "
                        "errors equal to its share of endpoints",
                    ],
                    impact=window.rate(n_err)))

        nx = responses_by.get("NXDOMAIN", 0)
        if share_exceeds(nx, responses, cfg.dns_nxdomain_percent / 100):
            ev = dict(base_ev)
            ev.update({"nxdomain": int(nx), "nxdomain_percent": pct(nx, responses),
                       "nxdomain_per_second": round(window.rate(nx), 3),
                       "threshold_percent": cfg.dns_nxdomain_percent,
                       "p_value_if_share_were_below": p_value(nx, responses, cfg.dns_nxdomain_percent / 100),
                       "top_names": self._top_names(names, "NXDOMAIN", 8)})
            findings.append(Finding(
                id="dns.nxdomain_rate", probe=self.name, severity="warning",
                title="Many DNS answers are NXDOMAIN", claims=("nxdomain",),
                summary=(f"{ev['nxdomain_percent']}% of DNS answers ({int(nx)} of {int(responses)}) said "
                         "the name does not exist. Usually search-list expansion (ndots) or a typo'd service name."),
                evidence=ev,
                remediation=[
                    "look at top_names: names under the cluster search suffixes are search-list "
                    "expansion (see dns.search_path_amplification); others are wrong names in a config",
                    "write external names as FQDNs with a trailing dot (api.example.com.)",
                ],
                impact=window.rate(nx)))

        if self.privacy.mode != "off":
            nx_names: dict[str, int] = {}
            for (rc, _qt, name), n in names.items():
                if rc == "NXDOMAIN":
                    nx_names[name] = nx_names.get(name, 0) + n
            amp = dn.find_amplification(nx_names, cfg.dns_cluster_domain, self.search_list,
                                        int(cfg.dns_search_nxdomain_min))
            wasted = sum(a.nxdomain for a in amp)
            # The walks must also be a real share of the answers (more than the NXDOMAIN rule's
            # share): a few walks among many answers is ndots:5 as usual. A walk is no random
            # event whose rate needs testing (the count floor above is the sample): a magnitude.
            if amp and responses and wasted > responses * cfg.dns_nxdomain_percent / 100:
                shown = [{"name": self.privacy(a.base), "suffixes": self._suffix_counts(a.suffixes),
                          "nxdomain": a.nxdomain} for a in amp[:8]]
                ev = dict(base_ev)
                ev.update({"wasted_queries": int(wasted), "wasted_per_second": round(window.rate(wasted), 3),
                           "names": shown, "search_list": [self._suffix_text(s) for s in self.search_list],
                           "wasted_percent": pct(wasted, responses), "threshold_percent": cfg.dns_nxdomain_percent,
                           "cluster_domain": cfg.dns_cluster_domain, "threshold_nxdomain": cfg.dns_search_nxdomain_min})
                top = shown[0]["name"]
                findings.append(Finding(
                    id="dns.search_path_amplification", probe=self.name, severity="warning",
                    title="DNS search-path amplification (ndots)", claims=("wasted_queries",),
                    summary=(f"{int(wasted)} NXDOMAIN answers in {window.seconds:.0f}s ({ev['wasted_percent']}% "
                             f"of {int(responses)}) came from "
                             f"resolvers walking their search list for {len(amp)} name(s) (top: {top}, "
                             f"{amp[0].nxdomain} NXDOMAIN over {len(amp[0].suffixes)} suffixes). With "
                             "Kubernetes' ndots:5 every name with fewer than 5 dots is tried under each "
                             "search domain before it is tried as is."),
                    evidence=ev,
                    remediation=[
                        f"write the name as a fully qualified name with a trailing dot: {top}. "
                        "(the resolver then skips the search list)",
                        "lower ndots for the pod through its dnsConfig:\n"
                        "  spec:\n    dnsConfig:\n      options:\n        - name: ndots\n"
                        "          value: \"2\"",
                        "deploy NodeLocal DNSCache so the extra lookups are answered on the node "
                        "(https://kubernetes.io/docs/tasks/administer-cluster/nodelocaldns/)",
                        "enable CoreDNS autopath (with 'pods verified') so the server answers the "
                        f"first search-list query for the final name: autopath @kubernetes in the "
                        f"{cfg.dns_cluster_domain} server block of the Corefile",
                    ],
                    impact=window.rate(wasted)))
        return findings

    def _suffix_text(self, suffix: str) -> str:
        """svc.<domain> and <domain> are cluster configuration, shown as they are (under suffix
        mode both used to read "*.<domain>", so a walk's counts no longer added up);
        <ns>.svc.<domain> names a namespace: "*.svc.<domain>" under suffix mode. Other
        suffixes (the node's search list) go through the privacy mode like names."""
        if self.privacy.mode == "full":
            return suffix
        cd = self.config.dns_cluster_domain.strip(".").lower()
        s = suffix.strip(".").lower()
        if s in (cd, f"svc.{cd}"):
            return s
        if s.endswith(f".svc.{cd}") and self.privacy.mode == "suffix":
            return f"*.svc.{cd}"
        return self.privacy(suffix) or ""

    def _suffix_counts(self, suffixes: dict[str, int]) -> dict[str, int]:
        """NXDOMAINs per shown suffix: two namespaces' suffixes hidden alike add up."""
        out: dict[str, int] = {}
        for s, c in suffixes.items():
            key = self._suffix_text(s)
            out[key] = out.get(key, 0) + c
        return out

    def _top_names(self, names: dict, rcode: str | None, n: int) -> list[dict]:
        if self.privacy.mode == "off":
            return []
        agg: dict[tuple[str, str], int] = {}
        for (rc, qt, name), c in names.items():
            if rcode is not None and rc != rcode:
                continue
            shown = self.privacy(name)
            agg[(shown, rc)] = agg.get((shown, rc), 0) + c
        rows = sorted(agg.items(), key=lambda kv: -kv[1])[:n]
        return [{"name": k[0], "rcode": k[1], "count": int(c)} for k, c in rows]

    def _server_evidence(self, window: Window) -> list[dict]:
        q = window.delta("server_queries")
        r = window.delta("server_responses")
        lat = window.delta("server_latency")
        t = window.delta("timeouts")
        rows = []
        for lab in set(q) | {k[0] for k in r} | set(t):
            resp = sum(n for (l2, _rc), n in r.items() if l2 == lab)
            rows.append({"server": lab, "queries": int(q.get(lab, 0)), "responses": int(resp),
                         "timeouts": int(t.get(lab, 0)),
                         "servfail": int(r.get((lab, "SERVFAIL"), 0)),
                         "refused": int(r.get((lab, "REFUSED"), 0)),
                         "nxdomain": int(r.get((lab, "NXDOMAIN"), 0)),
                         "mean_latency_ms": round(1000 * lat.get(lab, 0) / resp, 2) if resp else None})
        rows.sort(key=lambda x: -x["queries"])
        return rows[:10]


def _delta(old: dict, new: dict) -> dict:
    from dpwatch.probes.base import counter_delta
    return counter_delta(old, new)


def _le(bound: float) -> str:
    return f"{bound:.6g}"


def _server_host(label: str) -> str:
    if label.startswith("["):
        return label[1:label.index("]")]
    if label.count(":") == 1:
        return label.split(":")[0]
    return label
