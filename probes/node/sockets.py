"""The node audit's TCP sockets: by state and ephemeral port from /proc/thread-self/net/tcp{,6},
and the sockets in use from sockstat (the early re-audit's cheap check). Read in the calling
thread's netns."""

from __future__ import annotations

import socket

from dpwatch.daemon.host import paths
from dpwatch.probes.node.facts import Facts

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}


def parse_proc_tcp(text: str, rng: tuple[int, int] | None, states: dict[str, int],
                   ports: set[int], dests: dict[str, int]) -> None:
    """One /proc/net/tcp or tcp6 file: count sockets by state; for non-listening sockets whose
    local port lies in the ephemeral range, note the port and count per destination."""
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        try:
            st = int(parts[3], 16)
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
        except (ValueError, IndexError):
            continue
        name = TCP_STATES.get(st, f"STATE_{st}")
        states[name] = states.get(name, 0) + 1
        if rng and name != "LISTEN" and rng[0] <= local_port <= rng[1]:
            ports.add(local_port)
            dests[parts[2]] = dests.get(parts[2], 0) + 1


def hexaddr_text(hexaddr: str) -> str:
    """'0100007F:0050' (or the IPv6 form) -> '127.0.0.1:80'."""
    addr, port = hexaddr.rsplit(":", 1)
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
        return f"{ip}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def gather_tcp(facts: Facts) -> None:
    rng = facts.port_range()
    states: dict[str, int] = {}
    ports: set[int] = set()
    dests: dict[str, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(paths.proc("thread-self", "net", name)) as fh:
                parse_proc_tcp(fh.read(), rng, states, ports, dests)
        except OSError as exc:
            if name == "tcp":
                facts.errors["tcp"] = str(exc)
    facts.tcp_states = dict(sorted(states.items()))
    facts.ephemeral_ports_in_use = len(ports)
    if dests:
        key, n = max(dests.items(), key=lambda kv: kv[1])
        try:
            text = hexaddr_text(key)
        except (ValueError, OSError):
            text = key
        facts.busiest_destination = {"destination": text, "sockets": n}


def tcp_socket_count(text4: str, text6: str = "") -> int:
    """TCP sockets in use plus TIME_WAIT, from /proc/net/sockstat (and sockstat6's TCP6 inuse)."""
    n = 0
    for line in (text4 + "\n" + text6).splitlines():
        parts = line.split()
        if parts and parts[0] in ("TCP:", "TCP6:"):
            fields = dict(zip(parts[1::2], parts[2::2]))
            n += int(fields.get("inuse", 0)) + (int(fields.get("tw", 0)) if parts[0] == "TCP:" else 0)
    return n


def read_tcp_socket_count() -> int:
    """tcp_socket_count() of this netns' sockstat files (a missing one counts nothing)."""
    texts = []
    for name in ("sockstat", "sockstat6"):
        try:
            with open(paths.proc("thread-self", "net", name)) as fh:
                texts.append(fh.read())
        except OSError:
            texts.append("")
    return tcp_socket_count(*texts)
