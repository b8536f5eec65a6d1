/* drops: the constants bpf/drops.c and probes/drops/ share. The manager puts this header in
 * front of drops.c; Python reads the same integer #defines with probes/cdefs.py, so the two
 * sides cannot drift apart. Only integer #defines here.
 */

/* Protocol classes (the second part of a drops_counts index, the pclass of drops_other):
 * Python names them by these defines, lower-cased ("ipv4", ...). */
#define DROPS_PCLASS_IPV4 0
#define DROPS_PCLASS_IPV6 1
#define DROPS_PCLASS_ARP 2
#define DROPS_PCLASS_OTHER 3
#define DROPS_PCLASSES 4

/* Per CPU and (reason, protocol class), the first drops whose location is always recorded;
 * after that one drop in DROPS_LOC_SAMPLE is, with that weight. */
#define DROPS_LOC_EXACT 64
