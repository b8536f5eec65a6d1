/* drops: packet drops by the kernel's own drop reason, from tracepoint skb:kfree_skb.
 *
 * Counts per CPU, keyed by (reason, protocol class). No per-packet event reaches user space.
 * Parameters (-D, set by probes/drops/probe.py):
 *   DROPS_MAX_REASON    reasons below this index go to the dense per-CPU array
 *   DROPS_OTHER_MAX     entries of the hash for larger reason values (subsystem reasons)
 *   DROPS_LOC_MAX       entries of the LRU of drop locations (0 turns it off)
 *   DROPS_HAVE_REASON   the tracepoint has the `reason` field (kernel 5.17+)
 *   DROPS_CONSUMED      the value of reason CONSUMED on this kernel, when it has one
 *   DROPS_LOC_SAMPLE    after the first DROPS_LOC_EXACT drops of a (reason, protocol) on a CPU
 *                       (bpf/drops.h), one drop in DROPS_LOC_SAMPLE (a power of two) has its
 *                       location recorded with that weight: floods cost a hash update 1/SAMPLE
 *                       of the time
 *   DROPS_ERR_OTHER, DROPS_ERR_LOC  error slots in dpw_errors
 * Constants shared with Python (protocol classes, DROPS_LOC_EXACT): bpf/drops.h.
 */
#ifndef DROPS_MAX_REASON
#define DROPS_MAX_REASON 256
#endif
#ifndef DROPS_OTHER_MAX
#define DROPS_OTHER_MAX 256
#endif
#ifndef DROPS_LOC_MAX
#define DROPS_LOC_MAX 1024
#endif
#ifndef DROPS_LOC_SAMPLE
#define DROPS_LOC_SAMPLE 16
#endif

BPF_PERCPU_ARRAY(drops_counts, u64, DROPS_MAX_REASON * DROPS_PCLASSES);

struct drops_other_key {
    u32 reason;
    u32 pclass;
};
BPF_PERCPU_HASH(drops_other, struct drops_other_key, u64, DROPS_OTHER_MAX);

#if DROPS_LOC_MAX > 0
struct drops_loc_key {
    u64 location;
    u32 reason;
    u32 pad;
};
BPF_TABLE("lru_hash", struct drops_loc_key, u64, drops_locs, DROPS_LOC_MAX);
#endif

static __always_inline u32 drops_pclass(u16 proto)
{
    /* The tracepoint stores the protocol in host byte order (ntohs at record time). */
    switch (proto) {
    case 0x0800: return DROPS_PCLASS_IPV4;
    case 0x86DD: return DROPS_PCLASS_IPV6;
    case 0x0806: return DROPS_PCLASS_ARP;
    default: return DROPS_PCLASS_OTHER;
    }
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
#ifdef DROPS_HAVE_REASON
    u32 reason = (u32)args->reason;
#else
    u32 reason = 0;
#endif
    u32 pclass = drops_pclass(args->protocol);
    u64 seen = 0;  /* this CPU's count for (reason, protocol), after this drop */

    if (reason < DROPS_MAX_REASON) {
        u32 idx = pclass * DROPS_MAX_REASON + reason;
        u64 *n = drops_counts.lookup(&idx);
        if (n)
            seen = ++(*n);
    } else {
        struct drops_other_key ok = {.reason = reason, .pclass = pclass};
        u64 zero = 0;
        u64 *v = drops_other.lookup_or_try_init(&ok, &zero);
        if (v)
            seen = ++(*v);
        else
            dpw_count_error(DROPS_ERR_OTHER);
    }

#if DROPS_LOC_MAX > 0
#ifdef DROPS_HAVE_REASON
    /* Frees that are not drops (NOT_DROPPED_YET is 0; CONSUMED where the kernel traces it
     * here) must not crowd real drop sites out of the location LRU. */
    if (reason == 0)
        return 0;
#ifdef DROPS_CONSUMED
    if (reason == DROPS_CONSUMED)
        return 0;
#endif
#endif
    u64 weight = 1;
    if (seen > DROPS_LOC_EXACT) {
        if (seen & (DROPS_LOC_SAMPLE - 1))
            return 0;
        weight = DROPS_LOC_SAMPLE;
    }
    struct drops_loc_key lk = {};
    lk.location = (u64)args->location;
    lk.reason = reason;
    u64 *c = drops_locs.lookup(&lk);
    if (c) {
        __sync_fetch_and_add(c, weight);
    } else {
        if (drops_locs.update(&lk, &weight) != 0)
            dpw_count_error(DROPS_ERR_LOC);
    }
#endif
    return 0;
}
