"""Link events of one netns: RTM_NEWLINK/RTM_DELLINK from the RTMGRP_LINK multicast group.

The kernel announces every link added, removed or changed (MTU, state, netns) to the netns
the link is in, and only there: a change to a veth's far end, in a pod's netns, is not seen
from the node's. A lost message (ENOBUFS) counts as an event, so a watcher that re-reads
everything on an event misses nothing.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("dpwatch.linkwatch")
NETLINK_ROUTE = 0          # linux/netlink.h
RTMGRP_LINK = 1            # linux/rtnetlink.h: the link add/change/delete multicast group
POLL = 0.5                 # seconds the thread blocks before it looks at its stop flag


class LinkWatch:
    """A thread that calls ``on_event(monotonic time)`` for every batch of link messages of the
    netns the constructing thread is in (the socket is made there). ``state`` is "netlink"
    while it runs, else why not, followed by ``fallback`` (what covers for it). ``events``
    counts the batches. An exception from on_event is logged; the next batch calls it again."""

    def __init__(self, on_event: Callable[[float], None], name: str = "dpwatch-links", fallback: str = ""):
        self.on_event = on_event
        self._suffix = f"; {fallback}" if fallback else ""
        self.state = "not started"
        self.events = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._sock: socket.socket | None = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            self._sock.bind((0, RTMGRP_LINK))
            self._sock.settimeout(POLL)
        except OSError as exc:
            self.state = f"not running ({exc}){self._suffix}"
            self._sock = None
            return
        self.state = "netlink"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        with sock:
            while not self._stop.is_set():
                try:
                    sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:  # a broken socket: stop, never spin
                        self.state = f"stopped ({exc}){self._suffix}"
                        return
                    # ENOBUFS: messages were lost; an event all the same
                if self._stop.is_set():
                    return
                self.events += 1
                try:
                    self.on_event(time.monotonic())
                except Exception as exc:  # never the thread's end
                    log.debug("%s: link event handler: %s", self._thread.name, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * POLL + 1)
        elif self._sock is not None:
            self._sock.close()
        self._thread = self._sock = None
