#!/usr/bin/python3
"""Run a command inside a Debian kernel booted under qemu, against this same host filesystem.

The host kernel here has no kprobes, Debian's own kernel (linux-image-amd64) has. This tool boots
that kernel under qemu (software emulation, no KVM) with a small initrd of its own: busybox-static,
the virtio/9p/overlay modules and an /init script. The guest mounts the host root read-only over
9p, puts a tmpfs overlay on top, makes that its root, and runs the command in the same working
directory as on the host. The command's exit status comes back on the serial console as a marker
line that carries a per-run token; the host prints the console live and exits with that status.

Usage:
    python3 tests/vm/run_guest.py [--kernel-version VER|auto] [--timeout 1500] [--memory 2048]
                                  [--smp 2] [--workdir DIR] [--env KEY=VAL ...] -- CMD ARGS...

Exit status: the command's own, or
    2    setup error (missing package, headers, modules, bad arguments),
    124  timeout (qemu killed),
    125  the guest never reported the command's exit status (boot failure, panic, init error),
    130  interrupted (SIGINT/SIGTERM/SIGHUP; qemu killed).

Standard library only: this runs with /usr/bin/python3 before any venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import gzip
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EXIT_SETUP = 2
EXIT_TIMEOUT = 124
EXIT_NO_REPORT = 125
EXIT_INTERRUPTED = 130

DEFAULT_CACHE = "/var/cache/dpwatch-vm"
MOUNT_TAG = "hostroot"
# Modules the initrd must load before it can mount its root; their dependencies come from
# modules.dep. On Debian 6.1 the closure is: virtio_ring, virtio, virtio_pci_legacy_dev,
# virtio_pci_modern_dev, virtio_pci, netfs, fscache, 9pnet, 9pnet_virtio, 9p, overlay.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASS_THROUGH_ENV = ("CI",)
# Host directories the guest does not see as on the host (fresh filesystems in the guest).
# /tmp is NOT private: the guest sees the host's /tmp through the 9p root (writes land in the
# tmpfs overlay), so a checkout under /tmp (CI's clean clone may be there) works in the guest.
GUEST_PRIVATE_DIRS = ("/run", "/proc", "/sys", "/dev")

ANSI_RE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_]|c)")
EXIT_MARKER = "DPWATCH-GUEST-EXIT"
START_MARKER = "DPWATCH-GUEST-START"
FAIL_MARKER = "DPWATCH-GUEST-FAILED"


def log(msg: str) -> None:
    sys.stderr.write(f"[run_guest] {msg}\n")
    sys.stderr.flush()


class SetupError(Exception):
    """Something on the host is missing or wrong; exit EXIT_SETUP with the message."""


class Interrupted(BaseException):
    """Raised from a signal handler so that finally blocks kill qemu."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# --------------------------------------------------------------------------- host packages

def missing_packages(packages: list[str]) -> list[str]:
    missing = []
    for pkg in packages:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        if res.returncode != 0 or res.stdout.strip() != "install ok installed":
            missing.append(pkg)
    return missing


def ensure_packages(packages: list[str]) -> None:
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise SetupError(f"missing packages {' '.join(missing)} and not root: install them first")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing missing packages: {' '.join(missing)}")
    t0 = time.monotonic()
    # apt-get update at most once, and only because an install is needed.
    res = subprocess.run(["apt-get", "update"], env=env, stdout=sys.stderr, stderr=sys.stderr)
    if res.returncode != 0:
        raise SetupError("apt-get update failed")
    res = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        env=env, stdout=sys.stderr, stderr=sys.stderr,
    )
    if res.returncode != 0:
        raise SetupError(f"apt-get install {' '.join(missing)} failed")
    still = missing_packages(missing)
    if still:
        raise SetupError(f"packages still missing after apt-get install: {' '.join(still)}")
    log(f"packages installed in {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- kernel choice

def _version_key(ver: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", ver) if p]


def pick_kernel(requested: str) -> str:
    running = platform.release()
    if requested != "auto":
        return requested
    candidates = []
    for p in Path("/boot").glob("vmlinuz-*"):
        ver = p.name[len("vmlinuz-"):]
        if ver != running:
            candidates.append(ver)
    if not candidates:
        raise SetupError(f"--kernel-version auto: no /boot/vmlinuz-* other than the running {running}")
    return max(candidates, key=_version_key)


def check_kernel(ver: str) -> tuple[Path, Path]:
    vmlinuz = Path("/boot") / f"vmlinuz-{ver}"
    moddir = Path("/lib/modules") / ver
    if not vmlinuz.is_file():
        raise SetupError(f"{vmlinuz} not found: install linux-image-{ver}")
    if not (moddir / "modules.dep").is_file():
        raise SetupError(f"{moddir}/modules.dep not found: the modules of {ver} are not installed")
    build = moddir / "build"
    if not (build.exists() and (build / "include").is_dir()):
        raise SetupError(
            f"{build} is missing or broken: BCC in the guest needs the headers, "
            f"install linux-headers-{ver}"
        )
    return vmlinuz, moddir


# --------------------------------------------------------------------------- modules

_MOD_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def _mod_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    for suf in _MOD_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def resolve_modules(moddir: Path, roots=ROOT_MODULES) -> list[tuple[str, str]]:
    """(name, relpath) for roots and their dependencies, dependencies first; built-ins skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_mod_name(path)] = (path, [_mod_name(d) for d in rest.split()])
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.is_file():
        builtin = {_mod_name(l) for l in bfile.read_text().split()}

    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise SetupError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in deps:
            if name in builtin:
                seen.add(name)
                return
            raise SetupError(f"module {name} is neither in {moddir}/modules.dep nor built in")
        path, ds = deps[name]
        # modules.dep lists the deepest dependency last; visiting in reverse only keeps the
        # load order close to modprobe's, the recursion alone already makes it correct.
        for d in reversed(ds):
            visit(d, chain + (name,))
        seen.add(name)
        order.append((name, path))

    for r in roots:
        visit(r.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if not zstd:
            raise SetupError(f"{path} is zstd-compressed and the zstd tool is not installed")
        return subprocess.run([zstd, "-dc", str(path)], check=True, stdout=subprocess.PIPE).stdout
    return data


# --------------------------------------------------------------------------- initrd

INIT_TEMPLATE = r"""#!/bin/busybox sh
# dpwatch test guest init (generated by tests/vm/run_guest.py; do not edit).
# Stage 1 runs from the initrd: load modules, mount the host root over 9p with a tmpfs overlay,
# switch_root into it. Stage 2 runs as PID 1 in the new root: mount the API filesystems, run the
# per-run script from the host, print the exit marker, power off. PID 1 never exits.
if [ "$1" = stage2 ]; then BB=/run/dpwatch-init/busybox; else BB=/bin/busybox; fi
token=unknown
run=

fail() {
    echo "@@FAIL@@ run=$token: $*"
    $BB sync
    $BB poweroff -f
    while :; do $BB sleep 60; done
}

if [ "$1" = stage2 ]; then
    token="$2"
    run="$3"
    $BB mkdir -p /dev/pts /dev/shm
    $BB mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts || fail "mount /dev/pts"
    $BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || fail "mount /dev/shm"
    $BB mount -t tracefs tracefs /sys/kernel/tracing || fail "mount tracefs"
    $BB mount -t debugfs debugfs /sys/kernel/debug || fail "mount debugfs"
    $BB mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
    $BB mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
    [ -e /dev/fd ] || $BB ln -s /proc/self/fd /dev/fd
    $BB hostname dpwatch-guest
    $BB ip link set lo up || fail "ip link set lo up"
    [ -r "$run" ] || fail "per-run script $run not readable in the guest"
    echo "@@START@@ run=$token"
    $BB env -i /bin/sh "$run" </dev/null
    rc=$?
    $BB dmesg -n 1 2>/dev/null  # no kernel message may split the marker line
    echo "@@EXIT@@=$rc run=$token"
    $BB sync
    $BB poweroff -f
    while :; do $BB sleep 60; done
fi

# ---- stage 1 (in the initrd)
echo  # end the firmware's "Booting from ROM..." line
$BB mkdir -p /proc /sys /dev /ro /rw /newroot
$BB mount -t proc proc /proc
$BB mount -t sysfs sysfs /sys
$BB mount -t devtmpfs devtmpfs /dev
for arg in $($BB cat /proc/cmdline); do
    case "$arg" in
        dpwatch_token=*) token="${arg#dpwatch_token=}" ;;
        dpwatch_run=*) run="${arg#dpwatch_run=}" ;;
    esac
done
for m in @@MODULES@@; do
    $BB insmod "/modules/$m.ko" || fail "insmod $m"
done
n=0
until $BB mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose @@TAG@@ /ro; do
    n=$((n + 1))
    [ $n -ge 50 ] && fail "cannot mount the 9p share @@TAG@@"
    $BB sleep 0.1
done
$BB mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs /rw"
$BB mkdir -p /rw/upper /rw/work
$BB mount -t overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work,xino=off,index=off overlay /newroot \
    || fail "mount overlay"
$BB mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
$BB mkdir -p /newroot/run/dpwatch-init
$BB cp /bin/busybox /init /newroot/run/dpwatch-init/ || fail "copy init"
for d in proc sys dev; do
    $BB mount --move /$d /newroot/$d || fail "move /$d"
done
exec $BB switch_root /newroot /run/dpwatch-init/busybox sh /run/dpwatch-init/init stage2 "$token" "$run"
fail "switch_root failed"
"""


def render_init(module_names: list[str]) -> str:
    return (
        INIT_TEMPLATE.replace("@@MODULES@@", " ".join(module_names))
        .replace("@@TAG@@", MOUNT_TAG)
        .replace("@@FAIL@@", FAIL_MARKER)
        .replace("@@START@@", START_MARKER)
        .replace("@@EXIT@@", EXIT_MARKER)
    )


class Cpio:
    """Deterministic newc archive: fixed owners, mtime 0, inode numbers in order of addition."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        nameb = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = -1  # the trailer has inode 0
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def build_initrd(ver: str, moddir: Path, cache: Path) -> Path:
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise SetupError("/bin/busybox not found: install busybox-static")
    mods = resolve_modules(moddir)
    init = render_init([name for name, _ in mods])
    mod_data = [(name, read_module(moddir / rel)) for name, rel in mods]
    bb_data = busybox.read_bytes()
    h = hashlib.sha256(init.encode())
    h.update(hashlib.sha256(bb_data).digest())
    for name, data in mod_data:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    out = cache / f"initrd-{ver}-{h.hexdigest()[:16]}.cpio"
    if out.is_file():
        return out
    log(f"building {out} (modules: {' '.join(n for n, _ in mods)})")
    c = Cpio()
    for d in ("bin", "dev", "modules", "newroot", "proc", "ro", "rw", "sys"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", bb_data, 0o755)
    c.file("init", init.encode(), 0o755)
    for name, data in mod_data:
        c.file(f"modules/{name}.ko", data)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initrd-")
    with os.fdopen(fd, "wb") as f:
        f.write(c.finish())
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    # Drop stale initrds of the same kernel version (other init scripts or module builds).
    for old in cache.glob(f"initrd-{ver}-*.cpio"):
        if old != out:
            try:
                old.unlink()
            except OSError:
                pass
    return out


# --------------------------------------------------------------------------- per-run script

def write_run_script(run_dir: Path, workdir: str, env: dict[str, str], cmd: list[str]) -> Path:
    lines = [
        "# per-run script written by tests/vm/run_guest.py, run by the guest's init",
        f"cd {shlex.quote(workdir)} || {{ echo 'dpwatch guest: cannot cd to {workdir}' >&2; exit 125; }}",
    ]
    for k, v in env.items():
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in cmd))
    path = run_dir / "run.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def guest_env(extra: list[str]) -> dict[str, str]:
    env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
        "DPWATCH_GUEST": "1",
    }
    for k in PASS_THROUGH_ENV:
        if k in os.environ:
            env[k] = os.environ[k]
    for item in extra:
        if "=" in item:
            k, v = item.split("=", 1)
        else:  # --env KEY passes the host's value, if any
            k, v = item, os.environ.get(item)
            if v is None:
                continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise SetupError(f"bad environment variable name in --env: {k!r}")
        env[k] = v
    return env


# --------------------------------------------------------------------------- qemu

def qemu_command(vmlinuz: Path, initrd: Path, args, token: str, run_script: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise SetupError("qemu-system-x86_64 not found: install qemu-system-x86")
    append = " ".join([
        "console=ttyS0", "panic=-1", "loglevel=3", "edd=off", "mitigations=off",
        f"dpwatch_token={token}", f"dpwatch_run={run_script}",
    ])
    return [
        qemu,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-machine", "pc", "-cpu", "max",  # software emulation: -enable-kvm hangs on this host
        "-m", str(args.memory), "-smp", str(args.smp),
        "-nic", "none",  # no network device at all: the guest only has loopback and its own netns
        "-monitor", "none", "-serial", "stdio",
        "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append,
        "-virtfs",
        f"local,path=/,mount_tag={MOUNT_TAG},security_model=none,readonly=on,multidevs=remap",
    ]


def _die_with_parent() -> None:
    """In the qemu child: get SIGKILL if this script dies without its finally (kill -9)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_qemu(cmd: list[str], token: str, timeout: float) -> int:
    exit_re = re.compile(re.escape(EXIT_MARKER) + r"=(\d+) run=" + re.escape(token) + r"\b")
    start_re = re.compile(re.escape(START_MARKER) + r" run=" + re.escape(token) + r"\b")
    fail_re = re.compile(re.escape(FAIL_MARKER) + r" run=" + re.escape(token) + r": (.*)")
    state: dict = {"rc": None, "fail": None, "started": None}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us, and we kill qemu ourselves
        preexec_fn=_die_with_parent,
    )

    def reader() -> None:
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        for raw in iter(proc.stdout.readline, b""):
            # SeaBIOS and the kernel send terminal resets (ESC c, ESC[?7l: no wrap, ESC[2J):
            # strip escape sequences so that they reach neither a terminal nor a CI log.
            line = ANSI_RE.sub(b"", raw).replace(b"\r", b"")
            if not line.strip() and raw.strip(b"\r\n"):
                continue  # a line that held nothing but escape sequences
            if not line.endswith(b"\n"):
                line += b"\n"
            try:
                if out is not None:
                    out.write(line)
                    out.flush()
                else:
                    sys.stdout.write(line.decode("utf-8", "replace"))
                    sys.stdout.flush()
            except (OSError, ValueError):
                out = None  # stdout closed (e.g. piped into head): keep reading for the marker
                try:
                    sys.stdout = open(os.devnull, "w")
                except OSError:
                    pass
            text = line.decode("utf-8", "replace")
            if state["started"] is None and start_re.search(text):
                state["started"] = time.monotonic()
                log(f"guest booted, command started after {state['started'] - t0:.1f} s")
            m = exit_re.search(text)
            if m and state["rc"] is None:
                state["rc"] = int(m.group(1))
                state["exited"] = time.monotonic()
            m = fail_re.search(text)
            if m and state["fail"] is None:
                state["fail"] = m.group(1).strip()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        deadline = t0 + timeout
        while True:
            try:
                proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            if state["rc"] is not None and time.monotonic() - state["exited"] > 30:
                log("guest reported its exit status but did not power off within 30 s; killing qemu")
                break
            if time.monotonic() >= deadline:
                th.join(timeout=1)
                if state["rc"] is not None:  # reported just in time
                    break
                log(f"TIMEOUT: no exit status from the guest after {timeout:.0f} s; killing qemu")
                return EXIT_TIMEOUT
    finally:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        th.join(timeout=5)
    elapsed = time.monotonic() - t0
    if state["rc"] is not None:
        ran = state["exited"] - (state["started"] or t0)
        log(f"guest command exited {state['rc']} (command {ran:.1f} s, total {elapsed:.1f} s)")
        return state["rc"]
    if state["fail"]:
        log(f"ERROR: guest init failed: {state['fail']}")
    else:
        log(f"ERROR: qemu exited ({proc.returncode}) after {elapsed:.1f} s and the guest never "
            f"reported an exit status (boot failure or kernel panic? see the console above)")
    return EXIT_NO_REPORT


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_guest.py",
        description="Boot a Debian kernel with kprobes under qemu and run CMD in it, against the "
                    "host filesystem (read-only, with a tmpfs overlay) in the same working directory.",
        usage="%(prog)s [options] -- CMD [ARGS...]",
    )
    p.add_argument("--kernel-version", default="auto",
                   help="kernel to boot, e.g. 6.1.0-56-amd64; 'auto' (default) picks the newest "
                        "/boot/vmlinuz-* that is not the running kernel")
    p.add_argument("--timeout", type=float, default=1500, help="seconds for the whole run (default 1500)")
    p.add_argument("--memory", type=int, default=2048, help="guest memory in MiB (default 2048)")
    p.add_argument("--smp", type=int, default=2, help="guest CPUs (default 2)")
    p.add_argument("--workdir", default=None, help="directory to run CMD in (default: current)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VAL]",
                   help="set KEY in the guest (KEY alone passes the host's value); repeatable. "
                        "CI is passed through when set.")
    p.add_argument("--cache-dir", default=os.environ.get("DPWATCH_VM_CACHE", DEFAULT_CACHE),
                   help=f"initrd cache and per-run scripts (default {DEFAULT_CACHE})")
    p.add_argument("--no-install", action="store_true", help="never call apt-get")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run in the guest, after --")
    args = p.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("no command given (put it after --)")
    return args


def _on_signal(signum, _frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    run_dir = None
    try:
        workdir = os.path.realpath(args.workdir or os.getcwd())
        if not os.path.isdir(workdir):
            raise SetupError(f"workdir {workdir} is not a directory")
        for d in GUEST_PRIVATE_DIRS:
            if workdir == d or workdir.startswith(d + "/"):
                raise SetupError(f"workdir {workdir} is under {d}, which the guest does not share "
                                 f"with the host (it gets a fresh {d})")
        cache = Path(os.path.realpath(args.cache_dir))
        if any(str(cache) == d or str(cache).startswith(d + "/") for d in GUEST_PRIVATE_DIRS) \
                or re.search(r"\s", str(cache)):
            raise SetupError(f"--cache-dir {cache} must be outside {GUEST_PRIVATE_DIRS} and have no spaces")
        env = guest_env(args.env)

        pkgs = ["qemu-system-x86", "busybox-static"]
        if args.kernel_version == "auto":
            pkgs += ["linux-image-amd64", "linux-headers-amd64"]
        else:
            pkgs += [f"linux-image-{args.kernel_version}", f"linux-headers-{args.kernel_version}"]
        if not args.no_install:
            ensure_packages(pkgs)
        ver = pick_kernel(args.kernel_version)
        vmlinuz, moddir = check_kernel(ver)
        cache.mkdir(parents=True, exist_ok=True)
        initrd = build_initrd(ver, moddir, cache)

        runs = cache / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(dir=runs, prefix="run-"))
        os.chmod(run_dir, 0o755)
        token = secrets.token_hex(8)
        script = write_run_script(run_dir, workdir, env, args.cmd)
        qcmd = qemu_command(vmlinuz, initrd, args, token, script)
        log(f"booting {ver} (timeout {args.timeout:.0f} s, {args.memory} MiB, {args.smp} CPUs): "
            f"cd {workdir} && {shlex.join(args.cmd)}")
        return run_qemu(qcmd, token, args.timeout)
    except SetupError as e:
        log(f"ERROR: {e}")
        return EXIT_SETUP
    except Interrupted as e:
        log(f"interrupted by signal {e.signum}; qemu killed")
        return EXIT_INTERRUPTED
    finally:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
