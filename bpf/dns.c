/* dns: DNS over UDP seen by a packet tap on every interface of the daemon's netns, both
 * directions, IPv4 and IPv6. The same body runs as a tc classifier (dns_tc, the default: one
 * clsact filter per interface and direction) or as an AF_PACKET socket filter (dns_sock, one
 * ETH_P_ALL socket): both read the packet relative to its network header, so the link-layer
 * header (Ethernet, none on tun/wireguard) does not matter.
 *
 * In kernel: the DNS header (id, QR, opcode, rcode, qdcount) and the question (name walked
 * label by label with a bounded loop, then qtype); queries go into an LRU keyed by
 * (client addr/port, server addr/port, id) holding their timestamp; a response finds its
 * query there and adds its latency to a log2 histogram per rcode. Counters per qtype and per
 * rcode in per-CPU arrays; per-server counters in a per-CPU LRU; recent names per rcode in an
 * LRU (only when the privacy mode is not "off"). Nothing per packet reaches user space.
 *
 * A packet forwarded through the netns (pod veth in, bridge, uplink out) or sent over lo is
 * seen more than once: a query whose key is already pending and younger than DNS_DEDUP_NS is
 * the same query (counted once); a response whose query was answered less than DNS_DEDUP_NS
 * ago is the same response (matched once, never "unmatched"). Sightings of one packet follow
 * each other on one CPU (same softirq), so the check-then-set below does not race for them.
 *
 * Malformed (counted, never parsed further): UDP length below 8+12, qdcount != 1 on a query
 * (or > 1 on a response), a compression pointer or reserved label type in the question, a
 * label > 63, a name > 255 bytes, a name or question running past the datagram. Sightings of
 * the same malformed datagram are deduplicated by a small LRU keyed by addresses, ports,
 * UDP length, IPv4 id and the first 32 payload bytes (two different malformed datagrams that
 * agree on all of these within DNS_DEDUP_NS count once).
 *
 * Parameters (-D, set by probes/dns/probe.py):
 *   DNS_PORT0..DNS_PORT7   UDP server ports (0 = unused)
 *   DNS_PENDING_MAX        LRU entries of outstanding queries
 *   DNS_SERVERS_MAX        LRU entries of per-server counters
 *   DNS_NAMES_MAX          LRU entries of recent names (0: no names kept, privacy mode off)
 *   DNS_DEDUP_NS           window in which a second sighting is the same packet (its
 *                          default, the sizes and the stats slots: bpf/dns.h)
 *   DNS_ERR_PENDING, DNS_ERR_SERVERS, DNS_ERR_NAMES, DNS_ERR_SEEN  error slots in dpw_errors
 */
#include <uapi/linux/if_ether.h>

#define DNS_IPPROTO_UDP 17

#ifndef DNS_PORT0
#define DNS_PORT0 53
#endif
#ifndef DNS_PORT1
#define DNS_PORT1 0
#endif
#ifndef DNS_PORT2
#define DNS_PORT2 0
#endif
#ifndef DNS_PORT3
#define DNS_PORT3 0
#endif
#ifndef DNS_PORT4
#define DNS_PORT4 0
#endif
#ifndef DNS_PORT5
#define DNS_PORT5 0
#endif
#ifndef DNS_PORT6
#define DNS_PORT6 0
#endif
#ifndef DNS_PORT7
#define DNS_PORT7 0
#endif
#ifndef DNS_PENDING_MAX
#define DNS_PENDING_MAX 16384
#endif
#ifndef DNS_SERVERS_MAX
#define DNS_SERVERS_MAX 256
#endif
#ifndef DNS_NAMES_MAX
#define DNS_NAMES_MAX 1024
#endif

#define DNS_SEEN_HEAD 32       /* payload bytes that tell two malformed datagrams apart */
/* DNS_DEDUP_NS, the sizes and the DNS_ST_* stats slots are in bpf/dns.h */

struct dns_key {
    u8 client[16];
    u8 server[16];
    u16 cport;
    u16 sport;
    u16 id;
    u8 family;
    u8 pad;
};

struct dns_pending {
    u64 ts;
    u64 answered_ns;
    u16 qtype;
    u16 pad0;
    u32 pad1;
};

struct dns_server_key {
    u8 addr[16];
    u16 port;
    u8 family;
    u8 pad[5];
};

struct dns_server_val {
    u64 queries;
    u64 latency_ns;
    u64 rcodes[DNS_RCODES];
};

struct dns_name_key {
    u16 qtype;
    u8 rcode;
    u8 len;                    /* wire length of the full name (<= 255) */
    u32 pad;
    u8 name[DNS_NAME_LEN];     /* its first DNS_NAME_LEN bytes, zero padded */
};

struct dns_name_val {
    u64 count;
    u64 last_ns;
};

struct dns_seen_key {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u16 ulen;
    u16 ipid;
    u8 head[DNS_SEEN_HEAD];    /* the payload's first bytes (zero padded) */
};

BPF_PERCPU_ARRAY(dns_stats, u64, DNS_STATS);
BPF_PERCPU_ARRAY(dns_qtypes, u64, DNS_QTYPES);
BPF_PERCPU_ARRAY(dns_rcodes, u64, DNS_RCODES);
BPF_PERCPU_ARRAY(dns_hist, u64, DNS_RCODES * DNS_BUCKETS);
BPF_PERCPU_ARRAY(dns_latsum, u64, DNS_RCODES);
BPF_TABLE("lru_hash", struct dns_key, struct dns_pending, dns_pending, DNS_PENDING_MAX);
BPF_TABLE("lru_percpu_hash", struct dns_server_key, struct dns_server_val, dns_servers, DNS_SERVERS_MAX);
BPF_TABLE("lru_hash", struct dns_seen_key, u64, dns_seen, 1024);
#if DNS_NAMES_MAX > 0
BPF_TABLE("lru_hash", struct dns_name_key, struct dns_name_val, dns_names, DNS_NAMES_MAX);
#endif

static __always_inline void dns_stat(u32 slot)
{
    u64 *v = dns_stats.lookup(&slot);
    if (v)
        (*v)++;
}

static __always_inline int dns_port(u16 p)
{
    if (p == 0)
        return 0;
    return p == DNS_PORT0 || p == DNS_PORT1 || p == DNS_PORT2 || p == DNS_PORT3 ||
           p == DNS_PORT4 || p == DNS_PORT5 || p == DNS_PORT6 || p == DNS_PORT7;
}

/* bit length of (lat - 1) / 0.25 ms: the first bucket b with lat <= 0.25 ms * 2^b */
static __always_inline u32 dns_bucket(u64 lat)
{
    if (lat <= DNS_BUCKET_NS)
        return 0;
    u64 q = (lat - 1) / DNS_BUCKET_NS;
    u32 b = 0;
#pragma unroll
    for (int i = 0; i < DNS_BUCKETS; i++) {
        if (q == 0)
            break;
        q >>= 1;
        b++;
    }
    return b < DNS_BUCKETS ? b : DNS_BUCKETS - 1;
}

/* A datagram that cannot be parsed: counted once, however many interfaces it crosses. */
static __always_inline void dns_malformed(struct __sk_buff *skb, struct dns_seen_key *sk, u32 dnsoff)
{
    u64 now = bpf_ktime_get_ns();
    u32 avail = sk->ulen > 8 ? sk->ulen - 8 : 0;
    if (avail > 0) {
        u32 n = avail < DNS_SEEN_HEAD ? avail : DNS_SEEN_HEAD;
        n = ((n - 1) & (DNS_SEEN_HEAD - 1)) + 1;
        if (bpf_skb_load_bytes_relative(skb, dnsoff, sk->head, n, BPF_HDR_START_NET))
            __builtin_memset(sk->head, 0, DNS_SEEN_HEAD);
    }
    u64 *seen = dns_seen.lookup(sk);
    if (seen && now - *seen < DNS_DEDUP_NS) {
        dns_stat(DNS_ST_DUPLICATE_MALFORMED);
        return;
    }
    if (dns_seen.update(sk, &now) != 0)
        dpw_count_error(DNS_ERR_SEEN);
    dns_stat(DNS_ST_MALFORMED);
}

static __always_inline int dns_handle(struct __sk_buff *skb)
{
    struct dns_seen_key sk = {};
    u8 family;
    u32 l4off;
    u16 sport, dport;

    /* Fast path for everything that is not UDP to or from a DNS port: one load. */
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        u8 ip[24];
        if (bpf_skb_load_bytes_relative(skb, 0, ip, sizeof(ip), BPF_HDR_START_NET))
            return 0;
        if (ip[9] != DNS_IPPROTO_UDP || (ip[0] >> 4) != 4)
            return 0;
        if (((ip[6] & 0x1f) | ip[7]) != 0)      /* a non-first fragment: no UDP header */
            return 0;
        l4off = (ip[0] & 0x0f) * 4;
        if (l4off < 20)
            return 0;
        if (l4off == 20) {
            sport = (ip[20] << 8) | ip[21];
            dport = (ip[22] << 8) | ip[23];
        } else {
            u8 ports[4];
            if (bpf_skb_load_bytes_relative(skb, l4off, ports, 4, BPF_HDR_START_NET))
                return 0;
            sport = (ports[0] << 8) | ports[1];
            dport = (ports[2] << 8) | ports[3];
        }
        if (!dns_port(sport) && !dns_port(dport))
            return 0;
        family = 4;
        __builtin_memcpy(&sk.saddr[12], &ip[12], 4);
        __builtin_memcpy(&sk.daddr[12], &ip[16], 4);
        sk.ipid = (ip[4] << 8) | ip[5];
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        u8 ip6[44];
        if (bpf_skb_load_bytes_relative(skb, 0, ip6, sizeof(ip6), BPF_HDR_START_NET))
            return 0;
        if (ip6[6] != DNS_IPPROTO_UDP || (ip6[0] >> 4) != 6)   /* extension headers: not followed */
            return 0;
        sport = (ip6[40] << 8) | ip6[41];
        dport = (ip6[42] << 8) | ip6[43];
        if (!dns_port(sport) && !dns_port(dport))
            return 0;
        family = 6;
        l4off = 40;
        __builtin_memcpy(sk.saddr, &ip6[8], 16);
        __builtin_memcpy(sk.daddr, &ip6[24], 16);
    } else {
        return 0;
    }

    dns_stat(DNS_ST_PACKETS);
    sk.sport = sport;
    sk.dport = dport;
    u32 dnsoff = l4off + 8;

    u8 udp[8];
    if (bpf_skb_load_bytes_relative(skb, l4off, udp, 8, BPF_HDR_START_NET)) {
        dns_stat(DNS_ST_UNREADABLE);
        return 0;
    }
    u32 ulen = (udp[4] << 8) | udp[5];
    sk.ulen = ulen;
    if (ulen < 8 + DNS_HDR) {
        dns_malformed(skb, &sk, dnsoff);
        return 0;
    }
    u32 dlen = ulen - 8;

    u8 h[DNS_HDR];
    if (bpf_skb_load_bytes_relative(skb, dnsoff, h, DNS_HDR, BPF_HDR_START_NET)) {
        dns_stat(DNS_ST_UNREADABLE);   /* the header is not in the linear data, or cut short */
        return 0;
    }
    u16 id = (h[0] << 8) | h[1];
    u8 qr = h[2] >> 7;
    u8 rcode = h[3] & 0x0f;
    u16 qdcount = (h[4] << 8) | h[5];
    if (qdcount > 1 || (qr == 0 && qdcount == 0)) {
        dns_malformed(skb, &sk, dnsoff);
        return 0;
    }
    if (qr == 0 && !dns_port(dport)) {   /* a "query" from a server port to a client port */
        dns_malformed(skb, &sk, dnsoff);
        return 0;
    }
    if (qr == 1 && !dns_port(sport)) {
        dns_malformed(skb, &sk, dnsoff);
        return 0;
    }

    u16 qtype = 0;
    u32 namelen = 0;
    if (qdcount == 1) {
        u32 pos = DNS_HDR;
        int done = 0;
        for (int i = 0; i < DNS_MAX_LABELS; i++) {
            u8 len;
            if (pos >= dlen)
                break;
            if (bpf_skb_load_bytes_relative(skb, dnsoff + pos, &len, 1, BPF_HDR_START_NET))
                break;
            if (len == 0) {
                done = 1;
                break;
            }
            if (len & 0xc0)          /* compression pointer (0xc0) or reserved label type */
                break;
            pos += len + 1;
            if (pos - DNS_HDR + 1 > DNS_NAME_WIRE_MAX)
                break;
        }
        if (!done) {
            dns_malformed(skb, &sk, dnsoff);
            return 0;
        }
        namelen = pos - DNS_HDR + 1;
        if (pos + 1 + 4 > dlen) {    /* qtype and qclass must fit */
            dns_malformed(skb, &sk, dnsoff);
            return 0;
        }
        u8 qt[2];
        if (bpf_skb_load_bytes_relative(skb, dnsoff + pos + 1, qt, 2, BPF_HDR_START_NET)) {
            dns_stat(DNS_ST_UNREADABLE);
            return 0;
        }
        qtype = (qt[0] << 8) | qt[1];
    }

    u64 now = bpf_ktime_get_ns();
    struct dns_key key = {};
    key.id = id;
    key.family = family;
    if (qr == 0) {
        __builtin_memcpy(key.client, sk.saddr, 16);
        __builtin_memcpy(key.server, sk.daddr, 16);
        key.cport = sport;
        key.sport = dport;
    } else {
        __builtin_memcpy(key.client, sk.daddr, 16);
        __builtin_memcpy(key.server, sk.saddr, 16);
        key.cport = dport;
        key.sport = sport;
    }
    struct dns_server_key srv = {};
    __builtin_memcpy(srv.addr, key.server, 16);
    srv.port = key.sport;
    srv.family = family;

    if (qr == 0) {
        struct dns_pending *p = dns_pending.lookup(&key);
        if (p) {
            if (p->answered_ns == 0 && now - p->ts < DNS_DEDUP_NS) {
                dns_stat(DNS_ST_DUPLICATE_QUERIES);  /* the same query on another interface */
                return 0;
            }
            if (p->answered_ns == 0)
                dns_stat(DNS_ST_RETRANSMITS);        /* sent again before an answer: a new query */
        }
        struct dns_pending nv = {};
        nv.ts = now;
        nv.qtype = qtype;
        if (dns_pending.update(&key, &nv) != 0)
            dpw_count_error(DNS_ERR_PENDING);
        dns_stat(DNS_ST_QUERIES);
        u32 qi = qtype < DNS_QTYPES - 1 ? qtype : DNS_QTYPES - 1;
        u64 *qc = dns_qtypes.lookup(&qi);
        if (qc)
            (*qc)++;
        struct dns_server_val *sv = dns_servers.lookup(&srv);
        if (sv) {
            sv->queries++;
        } else {
            struct dns_server_val init = {};
            init.queries = 1;
            if (dns_servers.update(&srv, &init) != 0)
                dpw_count_error(DNS_ERR_SERVERS);
        }
        return 0;
    }

    /* a response */
    struct dns_pending *p = dns_pending.lookup(&key);
    if (!p) {
        dns_stat(DNS_ST_UNMATCHED);
        return 0;
    }
    if (p->answered_ns) {
        if (now - p->answered_ns < DNS_DEDUP_NS)
            dns_stat(DNS_ST_DUPLICATE_RESPONSES);  /* the same response on another interface */
        else
            dns_stat(DNS_ST_UNMATCHED);            /* a second answer, later: unmatched */
        return 0;
    }
    p->answered_ns = now;
    u64 lat = now - p->ts;
    if (qdcount == 0)
        qtype = p->qtype;
    dns_stat(DNS_ST_RESPONSES);
    u32 rc = rcode;
    u64 *rv = dns_rcodes.lookup(&rc);
    if (rv)
        (*rv)++;
    u32 hi = rc * DNS_BUCKETS + dns_bucket(lat);
    u64 *hv = dns_hist.lookup(&hi);
    if (hv)
        (*hv)++;
    u64 *ls = dns_latsum.lookup(&rc);
    if (ls)
        *ls += lat;
    struct dns_server_val *sv = dns_servers.lookup(&srv);
    if (sv) {
        sv->latency_ns += lat;
        if (rc < DNS_RCODES)
            sv->rcodes[rc]++;
    } else {
        struct dns_server_val init = {};
        init.latency_ns = lat;
        if (rc < DNS_RCODES)
            init.rcodes[rc] = 1;
        if (dns_servers.update(&srv, &init) != 0)
            dpw_count_error(DNS_ERR_SERVERS);
    }

#if DNS_NAMES_MAX > 0
    if (qdcount == 1 && namelen > 0) {
        struct dns_name_key nk = {};
        nk.qtype = qtype;
        nk.rcode = rcode;
        nk.len = namelen;
        u32 n = namelen < DNS_NAME_LEN ? namelen : DNS_NAME_LEN;
        /* 1..DNS_NAME_LEN in a form the verifier can bound (namelen >= 1 here) */
        n = ((n - 1) & (DNS_NAME_LEN - 1)) + 1;
        bpf_skb_load_bytes_relative(skb, dnsoff + DNS_HDR, nk.name, n, BPF_HDR_START_NET);
        struct dns_name_val *nv = dns_names.lookup(&nk);
        if (nv) {
            __sync_fetch_and_add(&nv->count, 1);
            nv->last_ns = now;
        } else {
            struct dns_name_val init = {1, now};
            if (dns_names.update(&nk, &init) != 0)
                dpw_count_error(DNS_ERR_NAMES);
        }
    }
#endif
    return 0;
}

/* tc classifier (clsact ingress and egress): TC_ACT_OK, the packet goes on untouched. */
int dns_tc(struct __sk_buff *skb)
{
    dns_handle(skb);
    return 0;
}

/* AF_PACKET socket filter: 0 bytes kept, the socket never receives anything. */
int dns_sock(struct __sk_buff *skb)
{
    dns_handle(skb);
    return 0;
}
