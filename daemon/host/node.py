"""Which Kubernetes node this daemon runs on."""

from __future__ import annotations

import os
import socket


def node_name() -> str:
    """The node as Kubernetes names it: NODE_NAME (the DaemonSet sets it from the downward
    API; with hostNetwork the hostname is usually the same, but not on every cloud), else the
    hostname."""
    return os.environ.get("NODE_NAME", "").strip() or socket.gethostname()
