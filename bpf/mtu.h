/* mtu: constants shared by bpf/mtu.c and probes/mtu/ (Python reads them with probes/cdefs.py).
 *
 * The manager puts this header in front of bpf/mtu.c in the compiled module.
 */

/* Directions of a frag-needed: the mtu_events index and mtu_recent_key.dir. Python names them
 * "sent" and "received" (probes/mtu/probe.py DIRS) from these defines. */
#define MTU_EV_SENT 0
#define MTU_EV_RECEIVED 1
#define MTU_EVENTS 2

/* LRU entries of recent frag-needed by (direction, destination, MTU); the build sets it from
 * --mtu-recent-entries (a unit test checks that the two defaults agree). */
#ifndef MTU_RECENT_MAX
#define MTU_RECENT_MAX 256
#endif
