"""The DNS probe's findings: one pure function per finding id over a window of readings.

Each takes the window's sums (``summarize``), the config values it needs and the injected
facts about names (``Names``: the privacy mode, the answers per name in the window and the
node's resolv.conf search list, all gathered by the probe), and returns a Finding or None.
Nothing here reads a map, a file or /proc.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpwatch.probes.base import Finding, Window
from dpwatch.probes.dns import names as dn
from dpwatch.probes.sample import p_value, share_exceeds

PROBE = "dns"
NODELOCAL = "https://kubernetes.io/docs/tasks/administer-cluster/nodelocaldns/"


@dataclass(frozen=True)
class Names:
    """What the probe knows of names besides the readings (none under privacy mode off)."""
    privacy: dn.Privacy
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (rcode, qtype, name)
    search_list: tuple[str, ...] = ()


@dataclass
class DnsWindow:
    """The sums of one window that several findings read."""
    window: Window
    queries: float
    responses_by: dict[str, float]
    responses: float
    timeouts_by: dict[str, float]
    timeouts: float
    hist: dict[str, list[float]]     # rcode -> counts per latency bucket
    all_buckets: list[float]
    per_server: list[dict]
    base_ev: dict[str, Any]


def pct(n: float, d: float) -> float:
    return round(100.0 * n / d, 2) if d else 0.0


def q_ms(buckets: list[float], q: float) -> float | None:
    v = dn.quantile(buckets, q)
    return None if v is None else round(v * 1000, 2)


def summarize(window: Window) -> DnsWindow:
    queries = sum(window.delta("queries").values())
    responses_by = window.delta("responses")
    responses = sum(responses_by.values())
    timeouts_by = window.delta("timeouts")
    hist: dict[str, list[float]] = {}
    for (rc, b), n in window.delta("hist").items():
        hist.setdefault(rc, [0.0] * dn.BUCKETS)[b] += n
    all_buckets = [sum(v[i] for v in hist.values()) for i in range(dn.BUCKETS)]
    base_ev = {"window_seconds": round(window.seconds, 1), "queries": int(queries),
               "queries_per_second": round(window.rate(queries), 3),
               "responses": int(responses),
               "latency_p50_ms": q_ms(all_buckets, 0.5), "latency_p90_ms": q_ms(all_buckets, 0.9),
               "latency_p99_ms": q_ms(all_buckets, 0.99)}
    return DnsWindow(window, queries, responses_by, responses, timeouts_by,
                     sum(timeouts_by.values()), hist, all_buckets, server_evidence(window), base_ev)


def server_evidence(window: Window) -> list[dict]:
    """The ten busiest servers of the window, with their answers by kind."""
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


def top_names(privacy: dn.Privacy, names: dict, rcode: str | None, n: int) -> list[dict]:
    """The ``n`` most answered names (of one rcode, or all), as the privacy mode shows them."""
    if privacy.mode == "off":
        return []
    agg: dict[tuple[str, str], int] = {}
    for (rc, _qt, name), c in names.items():
        if rcode is not None and rc != rcode:
            continue
        shown = privacy(name)
        agg[(shown, rc)] = agg.get((shown, rc), 0) + c
    rows = sorted(agg.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": k[0], "rcode": k[1], "count": int(c)} for k, c in rows]


def suffix_text(privacy: dn.Privacy, cluster_domain: str, suffix: str) -> str:
    """svc.<domain> and <domain> are cluster configuration, shown as they are (under suffix
    mode both used to read "*.<domain>", so a walk's counts no longer added up);
    <ns>.svc.<domain> names a namespace: "*.svc.<domain>" under suffix mode. Other
    suffixes (the node's search list) go through the privacy mode like names."""
    if privacy.mode == "full":
        return suffix
    cd = cluster_domain.strip(".").lower()
    s = suffix.strip(".").lower()
    if s in (cd, f"svc.{cd}"):
        return s
    if s.endswith(f".svc.{cd}") and privacy.mode == "suffix":
        return f"*.svc.{cd}"
    return privacy(suffix) or ""


def suffix_counts(privacy: dn.Privacy, cluster_domain: str, suffixes: dict[str, int]) -> dict[str, int]:
    """NXDOMAINs per shown suffix: two namespaces' suffixes hidden alike add up."""
    out: dict[str, int] = {}
    for s, c in suffixes.items():
        key = suffix_text(privacy, cluster_domain, s)
        out[key] = out.get(key, 0) + c
    return out


def server_host(label: str) -> str:
    if label.startswith("["):
        return label[1:label.index("]")]
    if label.count(":") == 1:
        return label.split(":")[0]
    return label


def latency_high(w: DnsWindow, names: Names, threshold_p99: float) -> Finding | None:
    """Enough answers over the threshold that the true p99 cannot be below it."""
    n_lat = sum(w.all_buckets)
    slow = dn.count_above(w.all_buckets, threshold_p99)
    if not share_exceeds(slow, n_lat, 0.01):
        return None
    ev = dict(w.base_ev)
    ev["answers"] = int(n_lat)
    ev["answers_over_threshold"] = int(slow)
    ev["threshold_p99_ms"] = round(threshold_p99 * 1000, 2)
    ev["p_value_if_p99_were_below"] = p_value(slow, n_lat, 0.01)
    ev["by_rcode_p99_ms"] = {rc: q_ms(b, 0.99) for rc, b in sorted(w.hist.items())}
    ev["by_server"] = w.per_server
    ev["slowest_names"] = top_names(names.privacy, names.counts, None, 5)
    # Critical when the same rule holds at 5x the threshold (a log2 bucket's top would make
    # 800 ms answers look like a 1 s p99).
    very = share_exceeds(dn.count_above(w.all_buckets, 5 * threshold_p99), n_lat, 0.01)
    return Finding(
        id="dns.latency_high", probe=PROBE,
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
            f"deploy NodeLocal DNSCache so pods get answers from a cache on their own node ({NODELOCAL})",
            "raise the CoreDNS cache (cache 300 in the Corefile) and the replica count if "
            f"its p99 stays above {ev['threshold_p99_ms']} ms",
        ],
        impact=w.window.rate(slow))


def timeouts(w: DnsWindow, timeout_percent: float, timeout_seconds: float,
             cluster_domain: str) -> Finding | None:
    """More queries without an answer than --dns-timeout-percent allows."""
    n = w.timeouts
    if not n or not share_exceeds(n, max(w.queries, n), timeout_percent / 100):
        return None
    tp = pct(n, max(w.queries, n))
    ev = dict(w.base_ev)
    ev.update({"timeouts": int(n), "timeouts_per_second": round(w.window.rate(n), 3),
               "timeout_percent": tp, "timeout_seconds": timeout_seconds,
               "by_server": {k: int(v) for k, v in sorted(w.timeouts_by.items(), key=lambda kv: -kv[1])},
               "unmatched_responses": int(w.window.delta("stats").get("unmatched", 0))})
    worst = max(w.timeouts_by, key=w.timeouts_by.get)
    return Finding(
        id="dns.timeouts", probe=PROBE,
        severity="critical" if tp >= min(100.0, 10 * timeout_percent) else "warning",
        title="DNS queries get no answer", claims=("timeouts",),
        summary=(f"{int(n)} DNS queries ({tp}% of {int(w.queries)}) had no answer "
                 f"within {timeout_seconds:g}s; server {worst} has the most. Clients "
                 "wait a full resolver timeout (glibc: 5 s) before retrying."),
        evidence=ev,
        remediation=[
            f"check the server answers at all: dig @{server_host(worst)} kubernetes.default.svc."
            f"{cluster_domain} +tries=1 +time=2",
            "conntrack -S   # insert_failed growing: the UDP conntrack race that drops "
            "parallel A/AAAA queries; use 'options single-request-reopen' or NodeLocal DNSCache",
            "kubectl -n kube-system get endpoints kube-dns   # no ready endpoints = timeouts",
            "look for dropped DNS packets in the drops probe's findings (NETFILTER_DROP, "
            "SOCKET_RCVBUFF on the server)",
        ],
        impact=w.window.rate(n))


def errors(w: DnsWindow, names: Names, error_percent: float) -> Finding | None:
    """More SERVFAIL and REFUSED answers than --dns-error-percent allows."""
    errs = {rc: w.responses_by.get(rc, 0) for rc in ("SERVFAIL", "REFUSED")}
    n_err = sum(errs.values())
    if not n_err or not share_exceeds(n_err, w.responses, error_percent / 100):
        return None
    ep = pct(n_err, w.responses)
    ev = dict(w.base_ev)
    ev.update({"errors": int(n_err), "servfail": int(errs["SERVFAIL"]),
               "refused": int(errs["REFUSED"]),
               "error_percent": ep, "errors_per_second": round(w.window.rate(n_err), 3),
               "by_server": w.per_server,
               "top_names": (top_names(names.privacy, names.counts, "SERVFAIL", 5)
                             + top_names(names.privacy, names.counts, "REFUSED", 5))})
    return Finding(
        id="dns.errors", probe=PROBE,
        severity="critical" if ep >= min(100.0, 10 * error_percent) else "warning",
        title="DNS servers answer with errors", claims=("errors",),
        summary=(f"{int(n_err)} of {int(w.responses)} DNS answers ({ep}%) were errors: "
                 f"SERVFAIL {int(errs['SERVFAIL'])}, REFUSED {int(errs['REFUSED'])}."),
        evidence=ev,
        remediation=[
            "SERVFAIL: the server could not reach its upstream or DNSSEC failed; check the "
            "forward plugin's upstreams: kubectl -n kube-system logs -l k8s-app=kube-dns | grep -i error",
            "REFUSED: the server is not configured for these names or clients (ACL, "
            "zone not served); the names are in top_names",
            "per server in by_server: one bad server behind a Service gives a share of "
            "errors equal to its share of endpoints",
        ],
        impact=w.window.rate(n_err))


def nxdomain_rate(w: DnsWindow, names: Names, nxdomain_percent: float) -> Finding | None:
    """More NXDOMAIN answers than --dns-nxdomain-percent, beyond the sample's chance."""
    nx = w.responses_by.get("NXDOMAIN", 0)
    if not share_exceeds(nx, w.responses, nxdomain_percent / 100):
        return None
    ev = dict(w.base_ev)
    ev.update({"nxdomain": int(nx), "nxdomain_percent": pct(nx, w.responses),
               "nxdomain_per_second": round(w.window.rate(nx), 3),
               "threshold_percent": nxdomain_percent,
               "p_value_if_share_were_below": p_value(nx, w.responses, nxdomain_percent / 100),
               "top_names": top_names(names.privacy, names.counts, "NXDOMAIN", 8)})
    return Finding(
        id="dns.nxdomain_rate", probe=PROBE, severity="warning",
        title="Many DNS answers are NXDOMAIN", claims=("nxdomain",),
        summary=(f"{ev['nxdomain_percent']}% of DNS answers ({int(nx)} of {int(w.responses)}) said "
                 "the name does not exist. Usually search-list expansion (ndots) or a typo'd service name."),
        evidence=ev,
        remediation=[
            "look at top_names: names under the cluster search suffixes are search-list "
            "expansion (see dns.search_path_amplification); others are wrong names in a config",
            "write external names as FQDNs with a trailing dot (api.example.com.)",
        ],
        impact=w.window.rate(nx))


def _walks(names: Names, cluster_domain: str, nxdomain_min: int) -> list[dn.Amplification]:
    nx_names: dict[str, int] = {}
    for (rc, _qt, name), n in names.counts.items():
        if rc == "NXDOMAIN":
            nx_names[name] = nx_names.get(name, 0) + n
    return dn.find_amplification(nx_names, cluster_domain, names.search_list, nxdomain_min)


def search_path_amplification(w: DnsWindow, names: Names, nxdomain_percent: float,
                              nxdomain_min: int, cluster_domain: str) -> Finding | None:
    """Resolvers walking their search list (ndots) for names, a real share of the answers."""
    if names.privacy.mode == "off":
        return None
    amp = _walks(names, cluster_domain, nxdomain_min)
    wasted = sum(a.nxdomain for a in amp)
    # The walks must also be a real share of the answers (more than the NXDOMAIN rule's share):
    # a few walks among many answers is ndots:5 as usual. A walk is no random event whose rate
    # needs testing (the count floor is the sample): a magnitude.
    if not (amp and w.responses and wasted > w.responses * nxdomain_percent / 100):
        return None
    shown = [{"name": names.privacy(a.base),
              "suffixes": suffix_counts(names.privacy, cluster_domain, a.suffixes),
              "nxdomain": a.nxdomain} for a in amp[:8]]
    ev = dict(w.base_ev)
    ev.update({"wasted_queries": int(wasted), "wasted_per_second": round(w.window.rate(wasted), 3),
               "names": shown,
               "search_list": [suffix_text(names.privacy, cluster_domain, s) for s in names.search_list],
               "wasted_percent": pct(wasted, w.responses), "threshold_percent": nxdomain_percent,
               "cluster_domain": cluster_domain, "threshold_nxdomain": nxdomain_min})
    top = shown[0]["name"]
    return Finding(
        id="dns.search_path_amplification", probe=PROBE, severity="warning",
        title="DNS search-path amplification (ndots)", claims=("wasted_queries",),
        summary=(f"{int(wasted)} NXDOMAIN answers in {w.window.seconds:.0f}s ({ev['wasted_percent']}% "
                 f"of {int(w.responses)}) came from resolvers walking their search list for "
                 f"{len(amp)} name(s) (top: {top}, {amp[0].nxdomain} NXDOMAIN over "
                 f"{len(amp[0].suffixes)} suffixes). With Kubernetes' ndots:5 every name with "
                 "fewer than 5 dots is tried under each search domain before it is tried as is."),
        evidence=ev,
        remediation=[
            f"write the name as a fully qualified name with a trailing dot: {top}. "
            "(the resolver then skips the search list)",
            "lower ndots for the pod through its dnsConfig:\n"
            "  spec:\n    dnsConfig:\n      options:\n        - name: ndots\n"
            "          value: \"2\"",
            f"deploy NodeLocal DNSCache so the extra lookups are answered on the node ({NODELOCAL})",
            "enable CoreDNS autopath (with 'pods verified') so the server answers the "
            f"first search-list query for the final name: autopath @kubernetes in the "
            f"{cluster_domain} server block of the Corefile",
        ],
        impact=w.window.rate(wasted))
