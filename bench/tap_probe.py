"""The packet tap for the informative "tap" stage: what an AF_PACKET (ETH_P_ALL) socket with an
eBPF socket filter costs per interface of the node netns, i.e. the design "count IP fragments
per interface with a packet tap" (and, later, parse DNS the same way).

The filter parses the IPv4 header, counts packets with MF set or a non-zero fragment offset in
a per-CPU array indexed by ifindex, and returns 0: the socket keeps nothing. It is attached with
BPF.attach_raw_socket (one ETH_P_ALL socket bound to each interface) to EVERY interface of the
netns this process runs in (bench/run.py starts it with `ip netns exec NODE`).

Run by bench/run.py as a separate process (so the benchmark itself never loads libbcc): prints
"ready <program name> <if1,if2,...>" once attached, and on SIGTERM or SIGINT prints
"fragments <n>", closes its sockets and exits 0.
"""

import signal
import socket
import sys

from bcc import BPF  # Debian's python3-bpfcc, through the venv's system site packages

SOURCE = """
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>

BPF_PERCPU_ARRAY(frags, u64, 256);

int tap_frag(struct __sk_buff *skb)
{
    /* AF_PACKET SOCK_RAW: the filter sees the packet from its MAC header, rx and tx alike. */
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return 0;
    u16 frag_off = load_half(skb, ETH_HLEN + offsetof(struct iphdr, frag_off));
    if (frag_off & 0x3fff) {            /* IP_MF | IP_OFFSET */
        u32 key = skb->ifindex & 255;
        u64 *n = frags.lookup(&key);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    return 0;                           /* keep nothing */
}
"""


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    b = BPF(text=SOURCE)
    fn = b.load_func("tap_frag", BPF.SOCKET_FILTER)
    names = [name for _, name in socket.if_nameindex()]
    socks = []
    for name in names:
        BPF.attach_raw_socket(fn, name)
        socks.append(fn.sock)           # attach_raw_socket keeps only the last one on fn
    print(f"ready tap_frag {','.join(names)}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    total = sum(sum(v) for v in b["frags"].values())
    print(f"fragments {total}", flush=True)
    for fd in socks:
        socket.close(fd)
    b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
