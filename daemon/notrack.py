"""Keep the daemon's own HTTP port out of conntrack, so it answers while the table is full.

A full conntrack table drops every new flow it would have to track, the daemon's included:
the one moment /diagnose matters is when it cannot be reached. Like NodeLocal DNSCache for
its own address, dpwatch adds an nftables table to its netns at start::

    table inet dpwatch {
        flags owner
        chain prerouting {
            type filter hook prerouting priority raw; policy accept;
            tcp dport 9400 fib daddr type local notrack
        }
        chain output {
            type filter hook output priority raw; policy accept;
            tcp sport 9400 notrack
            oif "lo" tcp dport 9400 notrack
        }
    }

- prerouting: clients' packets to the port on an address of this host. ``fib daddr type
  local`` leaves traffic the node only forwards (a pod talking to another node's :9400)
  tracked, so its NAT still works.
- output: the daemon's answers, and the packets of clients on the host itself (curl
  127.0.0.1:9400, or the node's own address: local traffic leaves through lo, and it passes
  the output hook before prerouting, so the prerouting rule alone never sees it untracked).
- ``inet`` covers IPv4 and IPv6; the port is matched whatever address --listen binds.
- ``flags owner`` (kernel 5.12+): the table belongs to the daemon's netlink socket. The kernel
  removes it when the process ends, even on kill -9; ``nft flush ruleset`` (a firewall
  reload) leaves it alone, and no other process can change it. On older kernels the table is
  made without the flag; a stale one from a killed daemon is replaced at the next start.

Everything goes through libnftables (Debian's python3-nftables, the library the ``nft``
command is built on, over netlink) in one transaction: no ``nft`` process, no output parsed.
The commands are nft syntax built from the port number, not libnftables JSON: the JSON input
of libnftables 1.0.6 (Debian 12) drops table flags, so it cannot make an owner table. It
needs CAP_NET_ADMIN only. Any failure is logged and reported in /probes; the daemon carries on.
"""

from __future__ import annotations

import logging
from typing import Any

from dpwatch.daemon.host import paths

log = logging.getLogger("dpwatch.notrack")

FAMILY = "inet"
TABLE = "dpwatch"
PRIORITY_RAW = -300  # NF_IP_PRI_RAW: before conntrack (-200) looks the packet up
CAP_NET_ADMIN = 12


def rules(port: int) -> list[tuple[str, str, str]]:
    """(chain, rule in nft syntax, comment) for TCP port ``port``."""
    port = int(port)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return [("prerouting", f"tcp dport {port} fib daddr type local notrack", "clients of dpwatch"),
            ("output", f"tcp sport {port} notrack", "dpwatch's answers"),
            ("output", f'oif "lo" tcp dport {port} notrack', "clients of dpwatch on this host")]


def script(port: int, owner: bool = True) -> str:
    """One nft transaction: replace any table of that name (a stale one from a daemon killed
    on a kernel without owner tables), then the table, its two chains and the rules."""
    name = f"{FAMILY} {TABLE}"
    flags = "flags owner; " if owner else ""
    lines = [f"add table {name}", f"delete table {name}",
             f'add table {name} {{ {flags}comment "dpwatch --notrack: its HTTP port is kept out of '
             f'conntrack (dpwatch README)"; }}']
    for chain in ("prerouting", "output"):
        lines.append(f"add chain {name} {chain} {{ type filter hook {chain} priority {PRIORITY_RAW}; "
                     "policy accept; }")
    for chain, rule, comment in rules(port):
        lines.append(f'add rule {name} {chain} {rule} comment "{comment}"')
    return "\n".join(lines) + "\n"


def has_cap(bit: int, status_path: str | None = None) -> bool:
    """Whether capability ``bit`` is in this process's effective set (CapEff of
    /proc/self/status under the proc root, unless ``status_path`` says otherwise)."""
    try:
        with open(status_path or paths.proc("self", "status")) as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _libnftables():
    import nftables  # Debian python3-nftables (ctypes over libnftables.so.1)
    return nftables.Nftables()


class NotrackTable:
    """The table for one port. start() never raises; status() is what /probes shows."""

    def __init__(self, port: int, enabled: bool = True, factory=_libnftables):
        self.port = port
        self.enabled = enabled
        self.factory = factory
        self.state = "not started" if enabled else "off"
        self.reason = "" if enabled else "turned off (--no-notrack)"
        self.owner = False
        self._nft = None  # the libnftables context: its netlink socket owns the table

    def start(self) -> "NotrackTable":
        if not self.enabled:
            return self
        try:
            nft = self.factory()
        except (ImportError, OSError) as exc:
            return self._failed(f"libnftables is not available ({exc}); install Debian's "
                                "python3-nftables (deploy/setup.sh does)")
        rc, _, err = nft.cmd(script(self.port, owner=True))
        owner = True
        if rc != 0 and any(e in (err or "") for e in ("Operation not supported", "Invalid argument")):
            # A kernel before 5.12 knows no owner flag (EOPNOTSUPP, EINVAL before 5.11): the
            # same table without it.
            rc, _, err = nft.cmd(script(self.port, owner=False))
            owner = False
        if rc != 0:
            return self._failed(self._why(err))
        self._nft, self.owner, self.state = nft, owner, "active"
        self.reason = ("owned by this process: the kernel removes it when dpwatch exits" if owner else
                       "this kernel has no owner tables: removed at exit, replaced at the next start")
        log.info("notrack: table %s %s keeps TCP port %d out of conntrack (%s)", FAMILY, TABLE,
                 self.port, self.reason)
        return self

    def _why(self, err: str) -> str:
        err = " ".join((err or "").split())[:300]
        if "Operation not permitted" in err:
            if not has_cap(CAP_NET_ADMIN):
                return f"needs CAP_NET_ADMIN ({err})"
            return (f"table {FAMILY} {TABLE} belongs to another running process (another dpwatch "
                    f"in this network namespace?) ({err})")
        return err or "libnftables refused the table"

    def _failed(self, reason: str) -> "NotrackTable":
        self.state, self.reason = "failed", reason
        log.error("notrack: cannot keep TCP port %d out of conntrack: %s; while the conntrack table "
                  "is full, new connections to it are dropped", self.port, reason)
        return self

    def stop(self) -> None:
        """Delete the table (best effort; an owned table goes with the socket anyway)."""
        nft, self._nft = self._nft, None
        if nft is None:
            return
        try:
            rc, _, err = nft.cmd(f"delete table {FAMILY} {TABLE}")
            if rc != 0:
                log.warning("notrack: deleting table %s %s: %s", FAMILY, TABLE, " ".join(err.split()))
        except Exception as exc:  # exit path: never raise
            log.warning("notrack: deleting table %s %s: %s", FAMILY, TABLE, exc)
        self.state, self.reason = "off", "removed at exit"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "table": f"{FAMILY} {TABLE}", "port": self.port,
                "owner": self.owner, "rules": [f"{c}: {r}" for c, r, _ in rules(self.port)] if self.port else [],
                "reason": self.reason}
