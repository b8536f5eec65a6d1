/* softirq: where each CPU's softirq time goes, how long a raised softirq waits to run, and
 * which devices' NAPI polls use their whole budget.
 *
 * Hooks (irq:softirq_entry/exit/raise as tracepoints, or as raw tracepoints with
 * SOFTIRQ_RAW=1: both hand over the vector number only; napi:napi_poll as a tracepoint in
 * both cases, because only the tracepoint carries the device name).
 *
 * Maps (all bounded, nothing per packet reaches user space):
 *   softirq_cur    per-CPU, 1 slot: the vector running on this CPU and when it started
 *                  (softirqs never nest on one CPU)
 *   softirq_vec    per-CPU array indexed by vector: time, entries, and the raise-to-run
 *                  latency (first raise of a pending vector -> its entry) as a log2 histogram
 *   softirq_napi   hash by device name: polls with work == budget (bounded; when it is full
 *                  the poll is counted in softirq_napi_over and in dpw_errors)
 *
 * Constants shared with Python (SOFTIRQ_HIST_SLOTS, the vector and device-name sizes, the
 * parameter defaults) are in bpf/softirq.h, which the manager puts in front of this file.
 *
 * Parameters (-D, set by probes/softirq/probe.py):
 *   SOFTIRQ_RAW          1: raw tracepoints for the irq events, 0: tracepoints
 *   SOFTIRQ_NVEC         vectors the running kernel names (softirq_entry's format)
 *   SOFTIRQ_NAPI_MAX     devices in softirq_napi
 *   SOFTIRQ_SAMPLE       a power of two N: every run is counted, but only every Nth run of a
 *                        vector on a CPU is timed (and its raise-to-run latency taken), with
 *                        weight N. Clock reads are most of this probe's cost, and a softirq can
 *                        run once per packet (veth, loopback); N = 1 times every run.
 *   SOFTIRQ_ERR_VEC, SOFTIRQ_ERR_NAPI   error slots in dpw_errors
 */
#ifndef SOFTIRQ_RAW
#define SOFTIRQ_RAW 0
#endif
#ifndef SOFTIRQ_NVEC
#define SOFTIRQ_NVEC SOFTIRQ_NVEC_DEFAULT
#endif
#if SOFTIRQ_NVEC > SOFTIRQ_NVEC_MAX
#error "SOFTIRQ_NVEC is above SOFTIRQ_NVEC_MAX"
#endif
#if SOFTIRQ_HIST_SLOTS & (SOFTIRQ_HIST_SLOTS - 1)
#error "SOFTIRQ_HIST_SLOTS must be a power of two (the index is masked with it)"
#endif
#ifndef SOFTIRQ_NAPI_MAX
#define SOFTIRQ_NAPI_MAX SOFTIRQ_NAPI_MAX_DEFAULT
#endif
#ifndef SOFTIRQ_SAMPLE
#define SOFTIRQ_SAMPLE SOFTIRQ_SAMPLE_DEFAULT
#endif
#if SOFTIRQ_SAMPLE & (SOFTIRQ_SAMPLE - 1)
#error "SOFTIRQ_SAMPLE must be a power of two (run numbers are masked with it)"
#endif

struct softirq_cur {
    u64 ts;
    u32 vec;
    u32 pad;
};
BPF_PERCPU_ARRAY(softirq_cur, struct softirq_cur, 1);

struct softirq_vec_stat {
    u64 ns;          /* time spent in the handler (sampled runs, weighted) */
    u64 entries;     /* handler runs (what /proc/softirqs counts), every one */
    u64 raised;      /* when the vector was first raised for a sampled run (0: not armed) */
    u64 lat_ns;      /* sum of raise-to-run latencies (weighted) */
    u64 lat_count;   /* weighted */
    u64 hist[SOFTIRQ_HIST_SLOTS];  /* weighted */
};
BPF_PERCPU_ARRAY(softirq_vec, struct softirq_vec_stat, SOFTIRQ_NVEC);

struct softirq_dev {
    char name[SOFTIRQ_DEV_NAME_LEN];   /* IFNAMSIZ */
};
BPF_HASH(softirq_napi, struct softirq_dev, u64, SOFTIRQ_NAPI_MAX);
BPF_PERCPU_ARRAY(softirq_napi_over, u64, 1);

static __always_inline u32 softirq_slot(u64 v)
{
    u32 s = bpf_log2l(v);  /* floor(log2 v) + 1 for v >= 1: v < 2^s */
    return s < SOFTIRQ_HIST_SLOTS ? s : SOFTIRQ_HIST_SLOTS - 1;
}

static __always_inline int softirq_on_raise(u32 vec)
{
    if (vec >= SOFTIRQ_NVEC) {
        dpw_count_error(SOFTIRQ_ERR_VEC);
        return 0;
    }
    struct softirq_vec_stat *st = softirq_vec.lookup(&vec);
    /* Only the raise that precedes a sampled run (the next entry's number is a multiple of
     * SOFTIRQ_SAMPLE) reads the clock. */
    if (st && !st->raised && ((st->entries + 1) & (SOFTIRQ_SAMPLE - 1)) == 0)
        st->raised = bpf_ktime_get_ns();
    return 0;
}

static __always_inline int softirq_on_entry(u32 vec)
{
    if (vec >= SOFTIRQ_NVEC) {
        dpw_count_error(SOFTIRQ_ERR_VEC);
        return 0;
    }
    u32 zero = 0;
    struct softirq_cur *cur = softirq_cur.lookup(&zero);
    struct softirq_vec_stat *st = softirq_vec.lookup(&vec);
    if (!cur || !st)
        return 0;
    st->entries++;
    if (st->entries & (SOFTIRQ_SAMPLE - 1)) {
        cur->ts = 0;  /* not timed */
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    cur->ts = now;
    cur->vec = vec;
    if (st->raised) {
        u64 d = now > st->raised ? now - st->raised : 0;
        st->raised = 0;
        st->lat_ns += d * SOFTIRQ_SAMPLE;
        st->lat_count += SOFTIRQ_SAMPLE;
        /* The mask (SOFTIRQ_HIST_SLOTS is a power of two) is what bounds the index for older
         * verifiers: 6.1's loses the clamp inside softirq_slot() once the compiler copies the
         * value. The empty asm hides the clamp from clang, which would drop the mask as a
         * no-op otherwise. */
        u64 slot = softirq_slot(d);
        asm volatile("" : "+r"(slot));
        slot &= SOFTIRQ_HIST_SLOTS - 1;
        st->hist[slot] += SOFTIRQ_SAMPLE;
    }
    return 0;
}

static __always_inline int softirq_on_exit(u32 vec)
{
    u32 zero = 0;
    struct softirq_cur *cur = softirq_cur.lookup(&zero);
    if (!cur || !cur->ts || cur->vec != vec || vec >= SOFTIRQ_NVEC)
        return 0;
    u64 d = bpf_ktime_get_ns() - cur->ts;
    cur->ts = 0;
    struct softirq_vec_stat *st = softirq_vec.lookup(&vec);
    if (st)
        st->ns += d * SOFTIRQ_SAMPLE;
    return 0;
}

#if SOFTIRQ_RAW
RAW_TRACEPOINT_PROBE(softirq_entry)
{
    return softirq_on_entry((u32)ctx->args[0]);
}

RAW_TRACEPOINT_PROBE(softirq_exit)
{
    return softirq_on_exit((u32)ctx->args[0]);
}

RAW_TRACEPOINT_PROBE(softirq_raise)
{
    return softirq_on_raise((u32)ctx->args[0]);
}
#else
TRACEPOINT_PROBE(irq, softirq_entry)
{
    return softirq_on_entry(args->vec);
}

TRACEPOINT_PROBE(irq, softirq_exit)
{
    return softirq_on_exit(args->vec);
}

TRACEPOINT_PROBE(irq, softirq_raise)
{
    return softirq_on_raise(args->vec);
}
#endif

TRACEPOINT_PROBE(napi, napi_poll)
{
    if (args->budget <= 0 || args->work < args->budget)
        return 0;
    struct softirq_dev key = {};
    TP_DATA_LOC_READ_STR(key.name, dev_name, sizeof(key.name));
    u64 *n = softirq_napi.lookup(&key);
    if (n) {
        __sync_fetch_and_add(n, 1);
        return 0;
    }
    u64 one = 1;
    if (softirq_napi.insert(&key, &one) != 0) {
        /* A racing CPU may have added this device since the lookup: count there. */
        n = softirq_napi.lookup(&key);
        if (n) {
            __sync_fetch_and_add(n, 1);
            return 0;
        }
        u32 zero = 0;
        u64 *over = softirq_napi_over.lookup(&zero);
        if (over)
            (*over)++;
        dpw_count_error(SOFTIRQ_ERR_NAPI);
    }
    return 0;
}
