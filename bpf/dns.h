/* dns: the constants bpf/dns.c and probes/dns/ share. The manager puts this header in front
 * of bpf/dns.c; Python reads the same #define lines (probes/cdefs.py), so neither side keeps
 * a copy of its own. */

#ifndef DNS_DEDUP_NS
#define DNS_DEDUP_NS 100000000ULL  /* sightings of one packet within 100 ms are one (-D by the probe) */
#endif

#define DNS_HDR 12                 /* the DNS header: id, flags, four counts */
#define DNS_NAME_LEN 128           /* wire bytes of a name kept in the names LRU */
#define DNS_NAME_WIRE_MAX 255      /* RFC 1035: a name is at most 255 bytes on the wire */
#define DNS_MAX_LABELS 128         /* 127 one-byte labels fill 255 bytes: the loop bound */
#define DNS_RCODES 16              /* the 4-bit header rcode */
#define DNS_BUCKETS 17             /* le 0.25 ms * 2^b for b = 0..15 (8.192 s), then overflow */
#define DNS_BUCKET_NS 250000ULL    /* the first bucket's bound */
#define DNS_QTYPES 260             /* qtype values 0..258 by value, 259 = any larger qtype */

/* stats slots (dns_stats); Python names them after the suffix, lower-cased */
#define DNS_ST_QUERIES 0
#define DNS_ST_RESPONSES 1
#define DNS_ST_UNMATCHED 2
#define DNS_ST_MALFORMED 3
#define DNS_ST_DUPLICATE_QUERIES 4
#define DNS_ST_DUPLICATE_RESPONSES 5
#define DNS_ST_RETRANSMITS 6
#define DNS_ST_PACKETS 7
#define DNS_ST_UNREADABLE 8
#define DNS_ST_DUPLICATE_MALFORMED 9
#define DNS_STATS 16               /* slots in dns_stats (room to grow) */
