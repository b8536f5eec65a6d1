/* conntrack: the constants bpf/conntrack.c and probes/conntrack/ share. The manager puts this
 * header in front of conntrack.c; Python reads the same integer #defines with probes/cdefs.py.
 * Only integer #defines here.
 */

/* Kernel events: the index of ct_events and the kind of a ct_recent key. Python names them by
 * these defines, lower-cased ("table_full", "early_drop"). */
#define CT_EV_TABLE_FULL 0
#define CT_EV_EARLY_DROP 1
#define CT_EVENTS 2

/* Concurrent __nf_conntrack_alloc calls tracked between entry and return. */
#define CT_INFLIGHT_MAX 4096
