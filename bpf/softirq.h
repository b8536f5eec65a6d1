/* softirq: the constants bpf/softirq.c and probes/softirq/ share. The manager puts this header
 * in front of softirq.c; Python reads the integer defines with probes/cdefs.py, and
 * tests/unit/test_softirq_header.py holds the flag defaults to the ones here.
 */
#ifndef DPWATCH_SOFTIRQ_H
#define DPWATCH_SOFTIRQ_H

/* Raise-to-run latency histogram: slot s holds latencies below 2^s ns (2^(s-1) and up for
 * s > 0); the last slot takes everything longer. A power of two: the index is masked with it. */
#define SOFTIRQ_HIST_SLOTS 32

/* Vectors (softirq_vec rows): the probe sizes the map from the names the running kernel
 * gives (SOFTIRQ_NVEC), capped at SOFTIRQ_NVEC_MAX; with no names it uses the default. */
#define SOFTIRQ_NVEC_DEFAULT 10
#define SOFTIRQ_NVEC_MAX 64

/* softirq_dev.name: IFNAMSIZ, what napi:napi_poll's dev_name is cut to. */
#define SOFTIRQ_DEV_NAME_LEN 16

/* Defaults of --softirq-napi-devices and --softirq-sample (SOFTIRQ_NAPI_MAX, SOFTIRQ_SAMPLE
 * when the probe does not pass them). */
#define SOFTIRQ_NAPI_MAX_DEFAULT 256
#define SOFTIRQ_SAMPLE_DEFAULT 8

#endif /* DPWATCH_SOFTIRQ_H */
