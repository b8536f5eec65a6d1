"""dpwatch: a per-node eBPF datapath observer.

The installed package maps the checkout's folders under one import name:
``dpwatch.daemon`` (daemon/), ``dpwatch.probes`` (probes/) and ``dpwatch.bpf`` (bpf/).
"""

__version__ = "0.1.0"
