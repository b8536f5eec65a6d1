"""Network namespaces: enumerate them, and run a function inside one.

Sockets and /proc/thread-self/net files opened inside a namespace stay bound to it, so
callers open their handles once in a namespace and read them later from any thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Callable

from dpwatch.daemon.host import paths

CLONE_NEWNET = 0x40000000


def own_path() -> str:
    """The calling thread's netns file: /proc/thread-self/ns/net under the proc root."""
    return paths.proc("thread-self", "ns", "net")


def inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def own_inode() -> int | None:
    return inode_of(own_path())


def _same_netns(fd: int) -> bool:
    """Whether ``fd`` is the calling thread's own netns: then there is nothing to join, and no
    setns(2), which needs CAP_SYS_ADMIN even for one's own namespace."""
    try:
        a, b = os.fstat(fd), os.stat(own_path())
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def join(path: str) -> None:
    """Move the calling thread into the netns at ``path`` (nothing to do, and no
    CAP_SYS_ADMIN needed, when it is already there). Only for threads made for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _same_netns(fd) and paths.libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(path: str, fn: Callable[[], Any]) -> Any:
    """Run fn in a new thread that joined the netns at ``path`` (e.g. /run/netns/x or
    /proc/PID/ns/net); return its result or raise its exception."""
    box: dict[str, Any] = {}

    def runner():
        try:
            join(path)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=runner, name="dpwatch-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def enumerate_netns(limit: int) -> tuple[dict[int, str], int]:
    """Distinct network namespaces: {inode: a path to it}, from /run/netns and /proc/*/ns/net,
    the calling thread's own first (as /proc/thread-self/ns/net: open it from this thread).
    Returns (found, how many more were skipped by ``limit``)."""
    found: dict[int, str] = {}
    skipped = 0

    def add(path: str) -> None:
        nonlocal skipped
        ino = inode_of(path)
        if ino is None or ino in found:
            return
        if len(found) >= limit:
            skipped += 1
            return
        found[ino] = path

    add(own_path())
    try:
        for name in sorted(os.listdir("/run/netns")):
            add(os.path.join("/run/netns", name))
    except OSError:
        pass
    for pid in paths.pids():
        add(paths.proc(str(pid), "ns", "net"))
    return found, skipped


class NetnsWorker:
    """A thread that joins one netns and runs calls there, one at a time.

    Needed for libraries (pyroute2's synchronous API) that do not keep a socket bound to the
    thread that created it: every call is made from inside the namespace."""

    def __init__(self, path: str, name: str = "dpwatch-netns"):
        import queue
        self._q: "queue.Queue" = queue.Queue()
        fd = os.open(path, os.O_RDONLY)  # opened here: "/proc/thread-self/..." means the caller's
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fd,), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, fd: int) -> None:
        try:
            if not _same_netns(fd) and paths.libc().setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        finally:
            os.close(fd)
        self._ready.set()
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, box, done = item
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            done.set()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        box: dict[str, Any] = {}
        done = threading.Event()
        self._q.put((fn, box, done))
        if not done.wait(timeout):
            raise TimeoutError("netns call timed out")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(2)
