"""The floor for stage 2: an empty BPF program on the same tracepoint as dpwatch's drops probe
(skb:kfree_skb). What it costs per run is what any program there costs before doing any work.

Run by bench/run.py as a separate process (so the benchmark itself never loads libbcc):
prints "ready <program name>" once attached, detaches and exits 0 on SIGTERM or SIGINT.
"""

import signal
import sys

from bcc import BPF  # Debian's python3-bpfcc, through the venv's system site packages

# <linux/skbuff.h> for enum skb_drop_reason, which BCC's generated tracepoint struct names.
SOURCE = """
#include <linux/skbuff.h>
TRACEPOINT_PROBE(skb, kfree_skb) { return 0; }
"""


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    b = BPF(text=SOURCE)
    print("ready tracepoint__skb__kfree_skb", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
