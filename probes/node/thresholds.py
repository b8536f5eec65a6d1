"""The node findings' thresholds (documented in docs/findings.md) and the arithmetic of advice."""

from __future__ import annotations

CONNTRACK_ENTRY_BYTES = 320        # kernel memory per conntrack entry (struct nf_conn + hash)
CONNTRACK_PER_CPU = 32768          # kube-proxy conntrack.maxPerCore default
CONNTRACK_MIN = 131072             # kube-proxy conntrack.min default
CONNTRACK_PEAK_WARN = 0.75         # peak use above this share of nf_conntrack_max: warning
CONNTRACK_MEMORY_SHARE = 0.05      # never advise a table whose full size exceeds 5% of memory
SOMAXCONN_RECOMMENDED = 4096       # the kernel default since 5.4
# Refused connection attempts (ListenDrops) that make node.listen_queue_overflow critical: at
# least this many a second, and at least as many as the handshakes completed meanwhile (Tcp
# PassiveOpens): new connections then fail more often than they succeed, each failure a SYN
# retried after 1, 3, 7... s, so the service is down for new clients, not merely slow.
LISTEN_CRITICAL_RATE = 1.0
PORT_RANGE_DEFAULT = 60999 - 32768 + 1  # 28232 ports: the kernel's default range
PORT_USE_WARN = 0.5                # ephemeral ports toward one destination: share of the range
TIME_WAIT_INFO, TIME_WAIT_WARN = 0.05, 0.25  # TIME_WAIT sockets as a share of the range
INOTIFY_WATCHES_RECOMMENDED = 524288
INOTIFY_INSTANCES_RECOMMENDED = 8192
INOTIFY_USE_WARN = 0.8
BUFFER_MIN, BUFFER_MAX = 4 << 20, 64 << 20
BUFFER_RTT_SECONDS = 0.010         # socket buffers sized for the fastest link at 10 ms RTT
BACKLOG_DEFAULT = 1000
BACKLOG_MIN = 128                  # the smallest listen() backlog dpwatch recommends
BACKLOG_FACTOR = 4                 # ... else 4x what overflowed, to the next power of two
NAMED_MAX = 5                      # listeners named in a finding


def pow2_at_least(n: float) -> int:
    n = max(1, int(n))
    return 1 << (n - 1).bit_length()


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def recommended_backlog(backlog: int, somaxconn: int | None) -> int:
    """The listen() backlog to advise for a listener that overflowed with ``backlog`` and is
    not capped by somaxconn: 4x the connections it held (backlog + 1), to the next power of
    two, at least 128, and no more than somaxconn allows (past that the kernel caps it)."""
    want = max(BACKLOG_MIN, pow2_at_least(BACKLOG_FACTOR * (backlog + 1)))
    return min(want, somaxconn) if somaxconn else want


def recommended_somaxconn(somaxconn: int) -> int:
    """For a listener capped by somaxconn: twice the cap, and at least the kernel default."""
    return max(2 * somaxconn, SOMAXCONN_RECOMMENDED)
