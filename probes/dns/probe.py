"""dns: DNS over UDP on every interface of the daemon's netns: queries by qtype, responses by
rcode, latency histograms per rcode, timeouts, unmatched and malformed packets, per-server
counters, recent names (under a privacy mode) and search-path amplification.

Kernel side: bpf/dns.c (its constants shared with Python in bpf/dns.h), one body loaded as
- ``tcx`` (default on kernels 6.6+): the classifier attached to ingress and egress of every
  interface through tcx bpf links (BPF_LINK_CREATE). A link lives only as long as its file
  descriptor, so a kill -9 leaves nothing attached: the kernel detaches it with the process.
  New interfaces are linked as the kernel announces them, and at the sampler's rescan;
- ``socket`` (default before 6.6): one AF_PACKET ETH_P_ALL socket (not bound to an interface)
  with the program as its socket filter; also gone with the process;
- ``tc`` (only with --dns-hook tc): legacy clsact filters attached with pyroute2. Cheaper than
  the socket on old kernels, but the kernel keeps a filter (and its program) after a kill -9
  until the next dpwatch start removes it.
BENCHMARKS.md ("DNS") has the figures behind that order; the three are in probes/dns/attach.py
(the raw bpf(2) link call in probes/dns/bpfsys.py).

User space: a sweep at every reading (the sampler's, and a report's fresh one) counts queries
unanswered after --dns-timeout as timeouts and deletes them; per-server counters are folded into
at most --dns-top-servers labels plus "other"; a history of name counts serves /diagnose windows
(all three in probes/dns/tracking.py). Names only leave the daemon through the privacy mode
(probes/dns/names.py). The findings are probes/dns/findings.py, one function each.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from dpwatch.probes.dns import charts
from dpwatch.probes.base import Finding, Hook, Mode, Probe, Reading, Window
from dpwatch.probes.cdefs import defines, names_by_value
from dpwatch.probes.dns import findings as F
from dpwatch.probes.dns import names as dn
from dpwatch.probes.dns import params as params_mod
from dpwatch.probes.dns.attach import BACKENDS
from dpwatch.probes.dns.bpfsys import tcx_supported
from dpwatch.probes.dns.tracking import NameHistory, ServerFolding, TimeoutSweep

log = logging.getLogger("dpwatch.dns")

STATS = names_by_value("dns.h", "DNS_ST_")   # dns_stats slot i (bpf/dns.h DNS_ST_*) -> name
DEDUP_NS = defines("dns.h")["DNS_DEDUP_NS"]  # sightings of one packet within 100 ms are one


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


class DnsProbe(Probe):
    name = "dns"
    bpf_source = "dns.c"
    description = ("DNS over UDP: queries by qtype, responses by rcode, latency, timeouts, "
                   "malformed packets, per-server counters and search-path storms")
    finding_ids = ("dns.latency_high", "dns.timeouts", "dns.errors", "dns.nxdomain_rate",
                   "dns.search_path_amplification")
    chart_series = charts.SERIES
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
        self._backend = None  # the mode's attach.SocketTap, TcxLinks or TcFilters (kept after close for info)
        self.servers = ServerFolding(self.config.dns_top_servers, self.config.dns_servers_entries)
        self.sweeper = TimeoutSweep(self.config.dns_timeout, self.servers)
        self.name_history = NameHistory(getattr(self.config, "max_window", 3600))
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

    # -- attach / detach (the backends are in probes/dns/attach.py) ---------------------
    def attach(self, module) -> None:
        self.module = module
        self._attached = []
        self.search_list = dn.read_search_list(self.config.dns_resolv_conf)
        self._backend = BACKENDS[self.mode.name]()
        try:
            self._backend.attach(module)
        except BaseException:
            self._backend.close()
            raise
        self._attached = list(self.mode.hooks)

    @property
    def programs(self) -> list[str]:
        if self.mode is None or not getattr(self, "_attached", None):
            return []
        return ["dns_tc" if self.mode.name in ("tc", "tcx") else "dns_sock"]

    def detach(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._attached = []

    def close(self) -> None:
        if self.module is not None or self._backend is not None:
            self.detach()
        self.module = None

    # The attached hook's state, as info() shows it and the kernel tests look at it.
    @property
    def _sock(self):
        return getattr(self._backend, "sock", None)

    @property
    def _tc(self) -> dict[int, str]:
        return getattr(self._backend, "interfaces", {})

    @property
    def _tcx_links(self) -> dict[int, list[int]]:
        return getattr(self._backend, "links", {})

    # -- background: timeouts sweep, names history, new interfaces --------------------------
    def background(self) -> None:
        self.sweep()
        self._record_names()
        if self._backend is not None:
            self._backend.rescan()

    def sweep(self, now_ns: int | None = None) -> int:
        """Count queries unanswered after --dns-timeout as timeouts and delete them; delete
        answered entries once no second sighting of their response can come. Returns the
        number of timeouts found."""
        if self.module is None:
            return 0
        return self.sweeper.sweep(self.table("dns_pending"), now_ns)

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
        self.name_history.record(self.read_names())

    def names_in_window(self, seconds: float) -> dict[tuple[str, str, str], int]:
        """Answers per (rcode, qtype, name) over the last ``seconds``: the recorded intervals
        plus what came since the last one."""
        return self.name_history.in_window(self.read_names(), seconds)

    # -- collection ---------------------------------------------------------------------
    def collect(self, inputs=None) -> Reading:
        # Queries already past --dns-timeout are timeouts now, also for a report's fresh
        # reading: without this they waited for the sampler's next pass (up to one interval).
        self.sweep()
        c = decode_counters(self.module)
        self.servers.fold(self.table("dns_servers"))
        hist = {(dn.rcode_name(r), i): n for r, b in c["hist"].items() for i, n in enumerate(b) if n}
        srv_q, srv_lat, srv_r = self.servers.counters()
        return {"counters": {
            "queries": {dn.qtype_name(q): n for q, n in c["qtypes"].items()},
            "responses": {dn.rcode_name(r): n for r, n in c["rcodes"].items()},
            "hist": hist,
            "latency_sum": {dn.rcode_name(r): s for r, s in c["latency_sum"].items()},
            "stats": c["stats"],
            "timeouts": self.sweeper.by_server(),
            "server_queries": srv_q,
            "server_responses": srv_r,
            "server_latency": srv_lat,
        }, "gauges": {}}

    def metrics(self, reading: Reading) -> Iterable:
        cnt = reading["counters"]
        yield _labelled("dpwatch_dns_queries", "DNS queries seen (each once, however many "
                        "interfaces it crossed), by qtype.", "qtype", cnt["queries"], ("A", "AAAA"))
        yield _labelled("dpwatch_dns_responses", "DNS responses matched to a query, by rcode.",
                        "rcode", cnt["responses"], ("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED"))
        yield _latency_histogram(cnt)
        yield _labelled("dpwatch_dns_timeouts", "DNS queries with no response within "
                        "--dns-timeout, by server (top --dns-top-servers, the rest \"other\").",
                        "server", cnt["timeouts"], ("other",))
        st = cnt["stats"]
        yield CounterMetricFamily("dpwatch_dns_unmatched_responses", "DNS responses with no "
                                  "query seen (the query was before start-up, evicted, timed "
                                  "out, or answered already).", value=st.get("unmatched", 0))
        yield CounterMetricFamily("dpwatch_dns_malformed_packets", "UDP packets to or from a "
                                  "DNS port that are not a parseable DNS message (counted "
                                  "once per datagram).", value=st.get("malformed", 0))
        yield _labelled("dpwatch_dns_server_queries", "DNS queries by server (top "
                        "--dns-top-servers, the rest \"other\").", "server", cnt["server_queries"])
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
            "timeouts": self.sweeper.total,
        }
        if self.module is not None:
            out["stats"] = decode_stats(self.table("dns_stats"))
        if self._backend is not None:
            out.update(self._backend.info())
        return out

    # -- findings (one function each in probes/dns/findings.py) -----------------------------
    def diagnose(self, window: Window) -> list[Finding]:
        cfg = self.config
        w = F.summarize(window)
        names = F.Names(self.privacy,
                        self.names_in_window(window.seconds) if self.privacy.mode != "off" else {},
                        tuple(self.search_list))
        found = [
            F.latency_high(w, names, cfg.dns_latency_p99),
            F.timeouts(w, cfg.dns_timeout_percent, cfg.dns_timeout, cfg.dns_cluster_domain),
            F.errors(w, names, cfg.dns_error_percent),
            F.nxdomain_rate(w, names, cfg.dns_nxdomain_percent),
            F.search_path_amplification(w, names, cfg.dns_nxdomain_percent,
                                        int(cfg.dns_search_nxdomain_min), cfg.dns_cluster_domain),
        ]
        return [f for f in found if f is not None]


def _labelled(name: str, doc: str, label: str, values: dict, always: tuple[str, ...] = ()):
    """A counter family with one label, its ``always`` values present even at 0."""
    fam = CounterMetricFamily(name, doc, labels=[label])
    values = dict(values)
    for v in always:
        values.setdefault(v, 0)
    for v, n in sorted(values.items()):
        fam.add_metric([v], n)
    return fam


def _latency_histogram(cnt: dict) -> HistogramMetricFamily:
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
            rows.append((f"{bound:.6g}", cum))
        rows.append(("+Inf", cum + buckets[-1]))
        h.add_metric([rc], rows, cnt["latency_sum"].get(rc, 0.0))
    return h
