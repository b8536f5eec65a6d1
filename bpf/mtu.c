/* mtu: ICMP "fragmentation needed" (type 3, code 4), sent and received, IPv4.
 *
 * Sent: tracepoint icmp:icmp_send (its arguments: type, code, and the offending packet's
 * addresses). The MTU it announced is the route MTU toward that packet's destination, which
 * user space looks up; the kernel side keeps a bounded LRU of recent destinations.
 * Received (kprobe mode only, exact kernel headers): kprobe on icmp_unreach reads the ICMP
 * header and the embedded original IP header, so it knows the announced MTU and the
 * destination the MTU applies to.
 * IPv6 "packet too big" has no tracepoint; user space reads it from /proc/net/snmp6.
 *
 * Parameters (-D, set by probes/mtu/probe.py):
 *   MTU_RECENT_MAX       LRU entries of recent frag-needed by (direction, destination, MTU);
 *                        its default is in bpf/mtu.h
 *   MTU_KPROBE           compile the icmp_unreach kprobe
 *   MTU_ERR_RECENT       error slot in dpw_errors
 */
/* MTU_EV_*, MTU_EVENTS and MTU_RECENT_MAX's default: bpf/mtu.h */

BPF_PERCPU_ARRAY(mtu_events, u64, MTU_EVENTS);

struct mtu_recent_key {
    u8 daddr[4];   /* destination of the packet that did not fit */
    u8 dir;        /* MTU_EV_* */
    u8 pad[3];
    u32 mtu;       /* announced MTU (received only; 0 when sent: user space looks it up) */
};
struct mtu_recent_val {
    u64 count;
    u64 last_ns;
};
BPF_TABLE("lru_hash", struct mtu_recent_key, struct mtu_recent_val, mtu_recent, MTU_RECENT_MAX);

static __always_inline void mtu_record(struct mtu_recent_key *k, u32 ev)
{
    u64 *n = mtu_events.lookup(&ev);
    if (n)
        (*n)++;
    u64 now = bpf_ktime_get_ns();
    struct mtu_recent_val *v = mtu_recent.lookup(k);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        v->last_ns = now;
    } else {
        struct mtu_recent_val nv = {.count = 1, .last_ns = now};
        if (mtu_recent.update(k, &nv) != 0)
            dpw_count_error(MTU_ERR_RECENT);
    }
}

TRACEPOINT_PROBE(icmp, icmp_send)
{
    if (args->type != 3 || args->code != 4)
        return 0;
    struct mtu_recent_key k = {};
    __builtin_memcpy(k.daddr, args->daddr, 4);
    k.dir = MTU_EV_SENT;
    mtu_record(&k, MTU_EV_SENT);
    return 0;
}

#ifdef MTU_KPROBE
#include <linux/icmp.h>
#include <linux/ip.h>

int kprobe__icmp_unreach(struct pt_regs *ctx, struct sk_buff *skb)
{
    unsigned char *head = NULL;
    u16 th = 0;
    bpf_probe_read_kernel(&head, sizeof(head), &skb->head);
    bpf_probe_read_kernel(&th, sizeof(th), &skb->transport_header);
    struct icmphdr ih = {};
    if (bpf_probe_read_kernel(&ih, sizeof(ih), head + th) != 0)
        return 0;
    if (ih.type != 3 || ih.code != 4)
        return 0;
    struct iphdr inner = {};
    bpf_probe_read_kernel(&inner, sizeof(inner), head + th + sizeof(struct icmphdr));
    struct mtu_recent_key k = {};
    __builtin_memcpy(k.daddr, &inner.daddr, 4);
    k.dir = MTU_EV_RECEIVED;
    k.mtu = bpf_ntohs(ih.un.frag.mtu);
    mtu_record(&k, MTU_EV_RECEIVED);
    return 0;
}
#endif
