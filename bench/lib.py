"""Plumbing for the benchmark: tool paths, started processes (always stopped), the daemon and
peer processes in a netns, load generators, /proc readings and output parsers.

The parsers at the bottom are pure functions of text, so they can be checked on their own.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from netlab import Lab, in_netns  # noqa: E402  (tests/netlab.py: the shared netns helpers)

# Never the caller's PATH: python3/… there may be pyenv shims.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class BenchError(RuntimeError):
    """A stage could not produce its number."""


def which(name: str) -> str | None:
    return shutil.which(name, path=SYSTEM_PATH)


@dataclass
class Tools:
    ip: str
    ss: str
    trafgen: str
    sockperf: str
    bpftool: str
    node_exporter: str
    dpwatch: str

    @classmethod
    def find(cls, dpwatch: str) -> tuple["Tools | None", list[str]]:
        want = {"ip": "ip", "ss": "ss", "trafgen": "trafgen", "sockperf": "sockperf",
                "bpftool": "bpftool", "node_exporter": "prometheus-node-exporter"}
        found, missing = {}, []
        for key, name in want.items():
            path = which(name)
            if path is None:
                missing.append(name)
            found[key] = path
        if not (os.path.isfile(dpwatch) and os.access(dpwatch, os.X_OK)):
            missing.append(f"dpwatch ({dpwatch})")
        if missing:
            return None, missing
        return cls(dpwatch=dpwatch, **found), []


def run(cmd: list[str], timeout: float, check: bool = True, ns: str | None = None,
        ip: str = "/usr/sbin/ip", **kw) -> subprocess.CompletedProcess:
    full = ([ip, "netns", "exec", ns] if ns else []) + cmd
    try:
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(full)} timed out after {timeout:g}s") from exc
    if check and res.returncode != 0:
        raise BenchError(f"{' '.join(full)} exited {res.returncode}: {(res.stderr or res.stdout).strip()[-800:]}")
    return res


# --------------------------------------------------------------------------------------------
# Processes we start. Every one is registered here and stopped by stop_all() in a finally.

class Proc:
    registry: list["Proc"] = []

    def __init__(self, name: str, cmd: list[str], ns: str | None, tools: Tools, env: dict | None = None,
                 logdir: str | None = None, group: bool = False):
        self.name, self.ns, self.group = name, ns, group
        if ns and not os.path.exists(f"/run/netns/{ns}"):
            raise BenchError(f"netns {ns} is gone (deleted by another process?); cannot start {name}")
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"dpwbench-{name}-", suffix=".log",
                                               dir=logdir, delete=False)
        full = ([tools.ip, "netns", "exec", ns] if ns else []) + cmd
        penv = dict(os.environ)
        penv.update(env or {})
        self.started = time.monotonic()
        # group=True: the process leads its own process group, and stop() signals the whole
        # group (trafgen forks one worker per CPU; the parent alone would not stop them).
        self.popen = subprocess.Popen(full, stdout=self.log, stderr=subprocess.STDOUT, env=penv,
                                      stdin=subprocess.DEVNULL, start_new_session=group)
        Proc.registry.append(self)

    @property
    def pid(self) -> int:
        # `ip netns exec NS cmd` joins NS and then execs cmd: same pid (checked by verify_pid).
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 3000) -> str:
        try:
            self.log.flush()
            with open(self.log.name, errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        try:
            if self.group:
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15, sig: int = signal.SIGTERM) -> int | None:
        if self.popen.poll() is None or self.group:
            try:
                if self.popen.poll() is None:
                    self._signal(sig)
                    self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(10)
            if self.group:  # workers that outlived their parent
                self._signal(signal.SIGKILL)
        if not self.log.closed:
            self.log.close()
        if self in Proc.registry:
            Proc.registry.remove(self)
        return self.popen.returncode

    def remove_log(self) -> None:
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    @classmethod
    def stop_all(cls) -> None:
        for p in list(cls.registry):
            try:
                p.stop(timeout=10)
            except Exception:  # keep stopping the others
                pass


def verify_pid(pid: int, ns: str, needle: str) -> None:
    """The pid is the program itself (not `ip`) and lives in netns ``ns``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        ns_ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError as exc:
        raise BenchError(f"pid {pid} vanished: {exc}") from exc
    args = [a.decode(errors="replace") for a in argv if a]
    if not any(needle in a for a in args) or os.path.basename(args[0]) == "ip":
        raise BenchError(f"pid {pid} is not {needle}: argv={args}")
    if ns_ino != os.stat(f"/run/netns/{ns}").st_ino:
        raise BenchError(f"pid {pid} is not in netns {ns}")


# --------------------------------------------------------------------------------------------
# /proc readings

def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(rest.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_interval(pid: int, fn) -> tuple[float, float]:
    """Runs fn(); returns (CPU seconds the process used, wall seconds)."""
    c0, t0 = proc_cpu_seconds(pid), time.monotonic()
    fn()
    return proc_cpu_seconds(pid) - c0, time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# HTTP inside a netns: one thread joins the netns and does every request, timed there.

def _get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_once(ns: str, port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    status, body = in_netns(ns, lambda: _get("127.0.0.1", port, path, timeout))
    return status, body.decode(errors="replace")


def timed_gets(ns: str, port: int, path: str, count: int, warmup: int = 3,
               timeout: float = 30) -> tuple[list[float], str]:
    """``count`` sequential GETs (a new connection each, as a scraper without keep-alive does),
    after ``warmup`` untimed ones. Returns the latencies in seconds and the last body."""
    def go():
        lat, body = [], b""
        for i in range(warmup + count):
            t0 = time.perf_counter()
            status, body = _get("127.0.0.1", port, path, timeout)
            dt = time.perf_counter() - t0
            if status != 200:
                raise BenchError(f"GET {path} -> {status}: {body[:300]!r}")
            if i >= warmup:
                lat.append(dt)
        return lat, body.decode(errors="replace")
    return in_netns(ns, go)


def wait_http(ns: str, port: int, path: str, proc: Proc, timeout: float,
              good=lambda status, body: status == 200, interval: float = 0.05) -> float:
    """Polls until good(status, body); returns seconds since the process was started."""
    def go():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited {proc.popen.returncode} before it was ready:\n"
                                 f"{proc.output()}")
            try:
                status, body = _get("127.0.0.1", port, path, 5)
                if good(status, body.decode(errors="replace")):
                    return time.monotonic() - proc.started
            except OSError:
                pass
            time.sleep(interval)
        raise BenchError(f"{proc.name} not ready ({path}) after {timeout:g}s:\n{proc.output()}")
    return in_netns(ns, go)


PROBE_UP_RE = re.compile(r"^dpwatch_probe_up\{[^}]*\} 1(?:\.0)?$", re.M)


def metrics_good(status: int, body: str) -> bool:
    return status == 200 and PROBE_UP_RE.search(body) is not None


# --------------------------------------------------------------------------------------------
# The daemon and the peer exporter

def daemon_supports(tools: Tools, flag: str, value: str | None = None) -> bool:
    """Whether `dpwatch run` knows ``flag`` (also a hidden one). A bad --listen makes the
    daemon exit 64 before it touches the kernel; an unknown flag is reported by argparse first."""
    cmd = [tools.dpwatch, "run", flag] + ([value] if value is not None else []) + ["--listen", "not-an-address"]
    res = run(cmd, timeout=60, check=False)
    return "unrecognized arguments" not in res.stderr


class Daemon:
    """`dpwatch run` in netns ``ns`` on 127.0.0.1:port."""

    def __init__(self, tools: Tools, ns: str, port: int, extra: list[str] | None = None,
                 env: dict | None = None, logdir: str | None = None, ready_timeout: float = 120):
        self.ns, self.port = ns, port
        self.proc = Proc("dpwatch", [tools.dpwatch, "run", "--listen", f"127.0.0.1:{port}", *(extra or [])],
                         ns, tools, env=env, logdir=logdir)
        try:
            # start-up: process start -> first /metrics 200 with a dpwatch_probe_up ... 1
            self.startup_seconds = wait_http(ns, port, "/metrics", self.proc, ready_timeout, metrics_good)
            wait_http(ns, port, "/readyz", self.proc, ready_timeout)
            verify_pid(self.proc.pid, ns, "dpwatch")
        except BaseException:
            self.proc.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        rc = self.proc.stop()
        if rc == 0:
            self.proc.remove_log()
        return rc


class NodeExporter:
    def __init__(self, tools: Tools, ns: str, port: int, logdir: str | None = None):
        self.ns, self.port = ns, port
        self.proc = Proc("node-exporter", [tools.node_exporter, f"--web.listen-address=127.0.0.1:{port}"],
                         ns, tools, logdir=logdir)
        try:
            self.startup_seconds = wait_http(ns, port, "/metrics", self.proc, 60)
            verify_pid(self.proc.pid, ns, "node-exporter")
        except BaseException:
            self.proc.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.stop()
        self.proc.remove_log()


# --------------------------------------------------------------------------------------------
# Load generators

def wait_listening(tools: Tools, ns: str, proto: str, port: int, proc: Proc, timeout: float = 10) -> None:
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.output()}")
        res = run([tools.ss, flag, f"sport = :{port}"], timeout=10, check=False, ns=ns, ip=tools.ip)
        if res.stdout.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"{proc.name} not listening on {proto}/{port} after {timeout:g}s:\n{proc.output()}")


SINK_PORT = 9999          # a UDP socket the benchmark binds in the node netns and never reads
FWD_NET = "198.19.255"    # routed by the node netns to a dummy device (forwarded, never dropped)


class Datapath:
    """The two UDP targets trafgen blasts from the pod, set up once per Lab:

    - "drop": node_ip4:SINK_PORT, a socket that is never read. Once its receive buffer is full
      (a few hundred datagrams) every datagram is dropped with SOCKET_RCVBUFF, so
      dpwatch's kfree_skb program runs once per packet: the worst case for dpwatch.
    - "forward": FWD_NET.2, which the node netns forwards to a dummy device, where the
      packet is consumed (ifb), not dropped: the clean path, where dpwatch's program never runs.
    """

    def __init__(self, tools: Tools, lab: Lab, workdir: str):
        self.tools, self.lab = tools, lab
        node, pod = lab.node, lab.pod
        self.sink = in_netns(node, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        in_netns(node, lambda: self.sink.bind((pod.node_ip4, SINK_PORT)))
        # ifb: frees what it is sent (not redirected from tc) with consume_skb, not as a drop,
        # and is NOARP. (dummy would do the same but is not built into every kernel.)
        run([tools.ip, "link", "add", "dpwfwd0", "type", "ifb"], timeout=30, ns=node, ip=tools.ip)
        run([tools.ip, "link", "set", "dpwfwd0", "up"], timeout=30, ns=node, ip=tools.ip)
        run([tools.ip, "addr", "add", f"{FWD_NET}.1/24", "dev", "dpwfwd0"], timeout=30, ns=node, ip=tools.ip)
        # ip_forward is per netns: this changes only the node netns the Lab owns.
        in_netns(node, lambda: _write("/proc/sys/net/ipv4/ip_forward", "1"))
        link = json.loads(run([tools.ip, "-j", "link", "show", pod.veth_node], timeout=30, ns=node,
                              ip=tools.ip).stdout)
        mac = link[0]["address"]
        self.conf = {}
        for target, daddr, dport in (("drop", pod.node_ip4, SINK_PORT), ("forward", f"{FWD_NET}.2", 9)):
            path = os.path.join(workdir, f"trafgen-{target}.cfg")
            with open(path, "w") as f:
                # 64-byte UDP payload; trafgen fills in the IPv4 and UDP checksums.
                f.write(f"{{ eth(da={mac}, type=0x0800), ipv4(saddr={pod.ip4}, daddr={daddr}, ttl=64), "
                        f"udp(sport=40000, dport={dport}), fill(0x41, 64) }}\n")
            self.conf[target] = path

    def close(self) -> None:
        self.sink.close()

    def counters(self) -> dict[str, int]:
        """Node-netns counters: veth rx packets, Ip ForwDatagrams, Udp RcvbufErrors."""
        dev, snmp = in_netns(self.lab.node, lambda: (_read("/proc/thread-self/net/dev"),
                                                     _read("/proc/thread-self/net/snmp")))
        out = parse_net_dev(dev)
        return {"rx": out.get(self.lab.pod.veth_node, {}).get("rx_packets", 0),
                "fwd": parse_snmp(snmp, "Ip").get("ForwDatagrams", 0),
                "rcvbuf": parse_snmp(snmp, "Udp").get("RcvbufErrors", 0)}

    def blast(self, target: str, seconds: float, settle: float = 1.0) -> "LoadResult":
        """trafgen on one CPU (-P 1: its worker is pinned to CPU 0; veth delivers in the
        sender's softirq, so the whole datapath runs on that CPU) for settle + seconds;
        the rate is read from the node's counters over the last ``seconds``."""
        tg = Proc(f"trafgen-{target}", [self.tools.trafgen, "--dev", self.lab.pod.veth_pod,
                                        "--conf", self.conf[target], "-P", "1", "-Q", "-C"],
                  self.lab.pod.ns, self.tools, group=True)
        try:
            time.sleep(settle)
            if not tg.alive():
                raise BenchError(f"trafgen exited {tg.popen.returncode}:\n{tg.output()}")
            c0, t0 = self.counters(), time.monotonic()
            time.sleep(seconds)
            c1, t1 = self.counters(), time.monotonic()
            if not tg.alive():
                raise BenchError(f"trafgen exited {tg.popen.returncode} during the run:\n{tg.output()}")
        finally:
            tg.stop(timeout=10, sig=signal.SIGINT)
            tg.remove_log()
        dt = t1 - t0
        res = LoadResult(target=target, seconds=dt, rx_pps=(c1["rx"] - c0["rx"]) / dt,
                         drop_pps=(c1["rcvbuf"] - c0["rcvbuf"]) / dt, fwd_pps=(c1["fwd"] - c0["fwd"]) / dt)
        if res.rx_pps <= 0:
            raise BenchError(f"trafgen ({target}) delivered no packets to the node")
        return res


@dataclass
class LoadResult:
    target: str
    seconds: float
    rx_pps: float    # packets/s the node netns received on its veth
    drop_pps: float  # of which dropped at the sink socket (Udp RcvbufErrors)
    fwd_pps: float   # of which forwarded (Ip ForwDatagrams)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class LatResult:
    p50: float
    p99: float
    avg: float
    observations: int
    dropped: int
    poll_idle_error: str | None = None


class PollIdle:
    """Holds the PM QoS CPU latency limit at 0 (/dev/cpu_dma_latency) while open, so idle CPUs
    poll instead of halting. In a VM a halted vCPU needs the hypervisor to wake it up (~50 us
    here), which would swamp a request/response round trip of a few microseconds. The kernel
    drops the request by itself when the file is closed, also if this process dies."""

    PATH = "/dev/cpu_dma_latency"

    def __init__(self):
        self.fd: int | None = None
        self.error: str | None = None

    def __enter__(self) -> "PollIdle":
        try:
            self.fd = os.open(self.PATH, os.O_WRONLY)
            os.write(self.fd, struct.pack("i", 0))
        except OSError as exc:
            self.error = f"{self.PATH}: {exc.strerror}"
            self.__exit__()
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sockperf_pp(tools: Tools, lab: Lab, seconds: float, port: int = 11111) -> LatResult:
    """UDP ping-pong pod -> node, 64-byte messages, full round-trip times in microseconds,
    with idle CPUs polling (PollIdle) for the duration."""
    with PollIdle() as pi:
        res = _sockperf_pp(tools, lab, seconds, port)
    res.poll_idle_error = pi.error
    return res


def _sockperf_pp(tools: Tools, lab: Lab, seconds: float, port: int) -> LatResult:
    pod = lab.pod
    server = Proc("sockperf-server", [tools.sockperf, "sr", "-i", pod.node_ip4, "-p", str(port)],
                  lab.node, tools)
    try:
        wait_listening(tools, lab.node, "udp", port, server)
        cmd = [tools.sockperf, "pp", "-i", pod.node_ip4, "-p", str(port), "-t", str(max(1, round(seconds))),
               "-m", "64", "--full-rtt"]
        res = run(cmd, timeout=seconds + 30, check=False, ns=pod.ns, ip=tools.ip)
        if res.returncode != 0:
            raise BenchError(f"sockperf pp exited {res.returncode}: {(res.stdout + res.stderr)[-800:]}")
        return parse_sockperf(res.stdout + res.stderr)
    finally:
        server.stop(timeout=5)
        server.remove_log()


# --------------------------------------------------------------------------------------------
# BPF programs and the sysctl

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


class SysctlGuard:
    """Sets a /proc/sys value and puts the old one back (idempotent; call restore() in finally)."""

    def __init__(self, path: str):
        self.path = path
        self.old: str | None = None

    def set(self, value: str) -> None:
        with open(self.path) as f:
            current = f.read().strip()
        if self.old is None:
            self.old = current
        with open(self.path, "w") as f:
            f.write(value)

    def restore(self) -> None:
        if self.old is not None:
            with open(self.path, "w") as f:
                f.write(self.old)
            self.old = None


def bpf_progs(tools: Tools) -> dict[int, dict]:
    res = run([tools.bpftool, "-j", "prog", "show"], timeout=30)
    return parse_bpftool_progs(res.stdout)


# --------------------------------------------------------------------------------------------
# Parsers (pure)

ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def parse_sockperf(text: str) -> LatResult:
    """sockperf 3.x prints e.g. `sockperf: ---> percentile 99.000 =    5.103` (usec)."""
    text = ANSI_RE.sub("", text)
    pct = {m.group(1): float(m.group(2))
           for m in re.finditer(r"--->\s+percentile\s+([\d.]+)\s*=\s*([\d.]+)", text)}
    if "50.000" not in pct or "99.000" not in pct:
        raise BenchError(f"no percentiles in sockperf output:\n{text[-1500:]}")
    avg = re.search(r"avg-(?:latency|rtt)=([\d.]+)", text)
    obs = re.search(r"Total (\d+) observations", text)
    drop = re.search(r"# dropped messages = (\d+)", text)
    return LatResult(p50=pct["50.000"], p99=pct["99.000"], avg=float(avg.group(1)) if avg else float("nan"),
                     observations=int(obs.group(1)) if obs else 0, dropped=int(drop.group(1)) if drop else 0)


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """/proc/net/dev -> {iface: {rx_packets, tx_packets}}."""
    out = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) >= 10:
            out[name.strip()] = {"rx_packets": int(f[1]), "tx_packets": int(f[9])}
    return out


def parse_snmp(text: str, table: str) -> dict[str, int]:
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(table + ":")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])}


def parse_bpftool_progs(text: str) -> dict[int, dict]:
    """bpftool -j prog show -> {id: {name, type, run_time_ns, run_cnt}} (stats absent = 0)."""
    out = {}
    for p in json.loads(text or "[]"):
        out[int(p["id"])] = {"name": p.get("name", ""), "type": p.get("type", ""),
                             "run_time_ns": int(p.get("run_time_ns", 0)), "run_cnt": int(p.get("run_cnt", 0))}
    return out


SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        samples.append((m.group(1), dict(LABEL_RE.findall(m.group(2) or "")), value))
    return samples


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


# --------------------------------------------------------------------------------------------
# Statistics

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# The machine

def machine_info(tools: Tools) -> dict[str, str]:
    u = os.uname()
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])

    def version(cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = ANSI_RE.sub("", res.stdout + res.stderr).strip().splitlines()
        return text[0].strip() if text else "?"

    return {
        "kernel": f"{u.release} ({u.version})",
        "cpu": model,
        "vcpus": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "tools": "; ".join([
            version([tools.dpwatch, "--version"]),
            version([tools.trafgen, "--version"]),
            version([tools.sockperf, "--version"]).replace("sockperf: ", ""),
            version([tools.node_exporter, "--version"]),
            version([tools.bpftool, "version"]),
            "python " + sys.version.split()[0],
        ]),
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def busy_processes(interval: float = 1.0, threshold: float = 0.2) -> list[str]:
    """Processes that used more than ``threshold`` of a core over ``interval`` (other load = noise)."""
    def snap() -> dict[int, tuple[str, float]]:
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                name = st[st.index("(") + 1:st.rindex(")")]
                fields = st[st.rindex(")") + 2:].split()
                out[int(d)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
            except (OSError, ValueError, IndexError):
                continue
        return out
    a = snap()
    time.sleep(interval)
    b = snap()
    busy = []
    for pid, (name, cpu) in b.items():
        if pid in a and pid != os.getpid():
            share = (cpu - a[pid][1]) / interval
            if share > threshold:
                busy.append(f"{name}[{pid}] {share * 100:.0f}%")
    return busy
