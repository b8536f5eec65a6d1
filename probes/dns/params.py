"""The dns probe's settings (flags, DPWATCH_* twins and Config attributes are generated)."""

from dpwatch.probes.params import Param

GROUP = "dns probe"

_DOMAIN = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"

PARAMS = (
    Param("dns-ports", "ports", [53], "UDP server ports parsed as DNS, comma-separated, up to 8"),
    Param("dns-timeout", "duration", 5.0, "a query unanswered this long counts as a timeout",
          min=0.1, max=300),
    Param("dns-names", "choice", "suffix",
          "how names appear in /diagnose: full, suffix (last two labels), hashed (keyed hash) or "
          "off (no names kept at all)", choices=("full", "suffix", "hashed", "off")),
    Param("dns-top-servers", "int", 10,
          "DNS servers that get their own `server` label; the rest are \"other\"", min=0, max=1000),
    Param("dns-hook", "choice", "auto",
          "auto (tcx links on kernels 6.6+, else the AF_PACKET socket filter), tcx, socket, or tc "
          "(legacy clsact filters: cheaper than socket before 6.6, but a kill -9 leaves them "
          "attached until the next start)", choices=("auto", "tcx", "socket", "tc")),
    Param("dns-pending-entries", "int", 16384, "in-kernel LRU of outstanding queries",
          min=64, max=1 << 20),
    Param("dns-names-entries", "int", 1024, "in-kernel LRU of recent names", min=16, max=65536),
    Param("dns-servers-entries", "int", 256, "in-kernel LRU of per-server counters",
          min=4, max=65536, cli=False),
    Param("dns-latency-p99", "duration", 0.2, "p99 latency that raises dns.latency_high",
          min=0.0001, max=60),
    Param("dns-timeout-percent", "float", 1.0, "timeouts, in % of queries, that raise dns.timeouts",
          min=0, max=100, min_exclusive=True),
    Param("dns-error-percent", "float", 1.0,
          "SERVFAIL and REFUSED, in % of responses, that raise dns.errors",
          min=0, max=100, min_exclusive=True),
    Param("dns-nxdomain-percent", "float", 20.0,
          "NXDOMAIN, in % of responses, that raise dns.nxdomain_rate",
          min=0, max=100, min_exclusive=True),
    Param("dns-search-nxdomain-min", "int", 10,
          "NXDOMAIN answers of search-list walks (all names together) in a window that raise "
          "dns.search_path_amplification", min=2, max=1 << 30),
    Param("dns-cluster-domain", "str", "cluster.local",
          "the cluster's DNS domain, for search-path detection", pattern=_DOMAIN, what="a domain name"),
    Param("dns-resolv-conf", "str", "/etc/resolv.conf",
          "resolv.conf whose search list is also a search suffix"),
)
