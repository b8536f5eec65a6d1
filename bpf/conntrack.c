/* conntrack: table-full drops and early drops, seen where they happen (kprobe mode only).
 *
 * The counters (entries, max, drop, early_drop, insert_failed, ...) come from netlink in
 * user space in every mode. This file adds what the counters cannot say: which netns and
 * which 5-tuple a table-full drop hit. It is compiled only in kprobe mode, which the probe
 * selects only when kprobes exist AND the kernel headers match the running kernel exactly,
 * because it reads struct net and struct nf_conntrack_tuple through them.
 *
 *   kprobe/kretprobe __nf_conntrack_alloc: an ERR_PTR return is a table-full drop
 *   kretprobe early_drop (called inside __nf_conntrack_alloc): true = an entry was evicted
 *
 * Parameters (-D, set by probes/conntrack/probe.py):
 *   CT_RECENT_MAX   LRU entries of recent drops by (netns, 5-tuple)
 *   CT_ERR_RECENT, CT_ERR_INFLIGHT   error slots in dpw_errors
 * Constants shared with Python (CT_EV_* event indexes, CT_INFLIGHT_MAX): bpf/conntrack.h.
 */
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack_tuple.h>

#ifndef CT_RECENT_MAX
#define CT_RECENT_MAX 256
#endif

struct ct_inflight {
    u64 net;
    struct nf_conntrack_tuple orig;
};
BPF_HASH(ct_inflight, u64, struct ct_inflight, CT_INFLIGHT_MAX);

/* Per-CPU event counts, indexed by CT_EV_*. */
BPF_PERCPU_ARRAY(ct_events, u64, CT_EVENTS);

struct ct_recent_key {
    u32 netns;
    u16 l3;        /* AF_INET / AF_INET6 */
    u8 proto;      /* IPPROTO_* */
    u8 kind;       /* CT_EV_* */
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;     /* network byte order */
    u16 dport;
};
struct ct_recent_val {
    u64 count;
    u64 last_ns;
};
BPF_TABLE("lru_hash", struct ct_recent_key, struct ct_recent_val, ct_recent, CT_RECENT_MAX);

static __always_inline void ct_count(u32 ev)
{
    u64 *v = ct_events.lookup(&ev);
    if (v)
        (*v)++;
}

int kprobe____nf_conntrack_alloc(struct pt_regs *ctx, struct net *net, const void *zone,
                                 const struct nf_conntrack_tuple *orig)
{
    u64 id = bpf_get_current_pid_tgid();
    struct ct_inflight in = {};
    in.net = (u64)net;
    bpf_probe_read_kernel(&in.orig, sizeof(in.orig), orig);
    if (ct_inflight.update(&id, &in) != 0)
        dpw_count_error(CT_ERR_INFLIGHT);
    return 0;
}

static __always_inline void ct_record(struct ct_inflight *in, u8 kind)
{
    struct ct_recent_key k = {};
    struct net *net = (struct net *)in->net;
    bpf_probe_read_kernel(&k.netns, sizeof(k.netns), &net->ns.inum);
    k.kind = kind;
    k.l3 = in->orig.src.l3num;
    k.proto = in->orig.dst.protonum;
    __builtin_memcpy(k.saddr, &in->orig.src.u3, 16);
    __builtin_memcpy(k.daddr, &in->orig.dst.u3, 16);
    k.sport = in->orig.src.u.all;
    k.dport = in->orig.dst.u.all;
    u64 now = bpf_ktime_get_ns();
    struct ct_recent_val *v = ct_recent.lookup(&k);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        v->last_ns = now;
    } else {
        struct ct_recent_val nv = {.count = 1, .last_ns = now};
        if (ct_recent.update(&k, &nv) != 0)
            dpw_count_error(CT_ERR_RECENT);
    }
}

int kretprobe____nf_conntrack_alloc(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct ct_inflight *in = ct_inflight.lookup(&id);
    if (!in)
        return 0;
    unsigned long ret = PT_REGS_RC(ctx);
    if (ret >= (unsigned long)-4095) {   /* IS_ERR: the table is full and nothing was evictable */
        ct_count(CT_EV_TABLE_FULL);
        ct_record(in, CT_EV_TABLE_FULL);
    }
    ct_inflight.delete(&id);
    return 0;
}

int kretprobe__early_drop(struct pt_regs *ctx)
{
    if (!(PT_REGS_RC(ctx) & 0xff))
        return 0;
    ct_count(CT_EV_EARLY_DROP);
    /* The victim is not known here; record the new flow that forced the eviction. */
    u64 id = bpf_get_current_pid_tgid();
    struct ct_inflight *in = ct_inflight.lookup(&id);
    if (in)
        ct_record(in, CT_EV_EARLY_DROP);
    return 0;
}
