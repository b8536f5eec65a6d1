/* dpwatch common header: included once, before every probe's source, in the single
 * BPF module the daemon compiles at start-up.
 *
 * Rules every probe follows:
 *  - aggregate in kernel (per-CPU arrays first, hashes only when the key space is open);
 *  - bound every map (sizes come in as -D cflags from the probe's Python side);
 *  - count every failed map update in dpw_errors, at the slot the manager assigned.
 */
#include <uapi/linux/ptrace.h>
#include <linux/skbuff.h>

#ifndef DPW_ERR_SLOTS
#define DPW_ERR_SLOTS 64
#endif

/* Failed map updates and lost events, one slot per (probe, map or stage). */
BPF_PERCPU_ARRAY(dpw_errors, u64, DPW_ERR_SLOTS);

static __always_inline void dpw_count_error(u32 slot)
{
    u64 *v = dpw_errors.lookup(&slot);
    if (v)
        (*v)++;
}

/* Note: BCC rewrites map.lookup() calls itself, so map calls cannot live inside macros. */
