"""The probe manager: choose modes, compile every enabled probe into ONE BPF module, attach,
collect, close.

Isolation: a probe whose hooks are missing is "unsupported" before anything is compiled. If
the single compile fails, each probe is compiled alone to find the culprit(s), which are
marked "failed" with the compiler's message, and the rest are compiled together once more.
A probe whose attach fails is "failed" and the others keep running.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dpwatch.daemon.host import paths
from dpwatch.probes.base import Probe, State
from dpwatch.probes.registry import PROBES

log = logging.getLogger("dpwatch.manager")

COMMON_HEADER = "dpwatch.h"


@dataclass
class ProbeStatus:
    name: str
    state: State
    mode: str | None = None
    reason: str = ""
    hooks: list[str] = field(default_factory=list)
    required: bool = False
    description: str = ""

    def as_dict(self, probe: Probe | None = None) -> dict[str, Any]:
        out = {"name": self.name, "state": self.state.value, "mode": self.mode,
               "reason": self.reason, "hooks": self.hooks, "required": self.required,
               "description": self.description}
        if probe is not None and self.state in (State.ATTACHED, State.DEGRADED):
            try:
                out["info"] = probe.info()
            except Exception as exc:  # info must never break /probes
                out["info"] = {"error": str(exc)}
        return out


def bpf_text(name: str) -> str:
    return resources.files("dpwatch.bpf").joinpath(name).read_text(encoding="utf-8")


def malloc_trim() -> None:
    """Give the compiler's freed heap back to the OS (clang leaves ~60 MB behind)."""
    try:
        paths.libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


CAP_SYS_ADMIN = 21


def perf_paranoid_hint(paranoid_path: str | None = None, status_path: str | None = None) -> str:
    """Why a tracepoint or kprobe attach fails with CAP_PERFMON alone on Debian and Ubuntu
    kernels: their patch makes kernel.perf_event_paranoid >= 3 refuse perf_event_open(2) to
    anything without CAP_SYS_ADMIN. Raw tracepoints and socket/tc programs do not use
    perf_event_open and are not affected. Empty when this is not the cause. The paths default
    to /proc/sys/kernel/perf_event_paranoid and /proc/self/status under the proc root."""
    try:
        with open(paranoid_path or paths.proc("sys", "kernel", "perf_event_paranoid")) as fh:
            paranoid = int(fh.read().strip())
        with open(status_path or paths.proc("self", "status")) as fh:
            eff = next(int(ln.split()[1], 16) for ln in fh if ln.startswith("CapEff:"))
    except (OSError, ValueError, StopIteration):
        return ""
    if paranoid < 3 or eff & (1 << CAP_SYS_ADMIN):
        return ""
    return (f"kernel.perf_event_paranoid={paranoid} refuses perf_event_open without CAP_SYS_ADMIN "
            "on Debian/Ubuntu kernels: set it to 2 on the node (sysctl -w "
            "kernel.perf_event_paranoid=2) or grant CAP_SYS_ADMIN")


class _CapturedStderr:
    """Capture fd 2 while BCC compiles, so compiler errors can be reported per probe."""

    def __enter__(self):
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()
        return False


def _compiler_errors(text: str, limit: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    return " | ".join(lines[:limit]) if lines else (text.strip().splitlines() or ["compile failed"])[-1]


FAULT_ENV = "DPWATCH_FAULT_INJECT"
FAULT_TRACEPOINT = "dpwatch_fault:missing_tracepoint"


def inject_faults(probes: dict[str, Probe], spec: str) -> None:
    """Test-only fault injection, from DPWATCH_FAULT_INJECT="hook:<probe>,compile:<probe>":
    hook: every mode of the probe also needs a tracepoint no kernel has (the probe is then
    unsupported through the ordinary feature detection); compile: the probe's C source gets an
    #error line (the real compile fails and the manager isolates it). Unknown items are ignored
    with a warning; nothing here is used unless the variable is set."""
    import dataclasses
    from dpwatch.probes.base import Hook
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, name = item.partition(":")
        probe = probes.get(name)
        if probe is None or kind not in ("hook", "compile"):
            log.warning("%s: ignoring %r (want hook:<probe> or compile:<probe>)", FAULT_ENV, item)
            continue
        log.warning("%s: injecting a %s fault into probe %s", FAULT_ENV, kind, name)
        if kind == "hook":
            probe.modes = tuple(dataclasses.replace(m, hooks=m.hooks + (Hook("tracepoint", FAULT_TRACEPOINT),))
                                for m in probe.modes)
        elif probe.bpf_source:
            original = probe.source_text
            probe.source_text = lambda original=original: (
                original() + "\n#error dpwatch fault injection: this probe must not compile\n")


class ProbeManager:
    def __init__(self, config, features, probe_classes: tuple[type[Probe], ...] = PROBES):
        self.config = config
        self.features = features
        self.probes: dict[str, Probe] = {cls.name: cls(config) for cls in probe_classes}
        self.status: dict[str, ProbeStatus] = {}
        self.module = None
        self.error_slots: list[tuple[str, str]] = []  # index -> (probe, map or stage)
        self.collect_errors: dict[str, int] = {}
        self.compile_seconds = 0.0
        self.compiles = 0
        self.loaded = False
        self._lock = threading.Lock()
        inject_faults(self.probes, os.environ.get(FAULT_ENV, ""))

    # -- planning -------------------------------------------------------------------
    def plan(self) -> None:
        enabled = set(self.config.enabled_probes)
        required = set(self.config.require)
        for name, probe in self.probes.items():
            st = ProbeStatus(name=name, state=State.DISABLED, required=name in required,
                             description=probe.description)
            self.status[name] = st
            if name not in enabled:
                st.reason = "disabled by configuration"
                continue
            mode, why = probe.choose_mode(self.features)
            if mode is None:
                st.state, st.reason = State.UNSUPPORTED, why
                continue
            probe.mode = mode
            st.mode, st.reason = mode.name, why
            st.hooks = [str(h) for h in mode.hooks]
            st.state = State.DEGRADED if mode.degraded else State.ATTACHED  # provisional
            if probe.bpf_source and mode.bpf and not self.features.bcc:
                st.state, st.reason = State.FAILED, self.features.bcc_reason

    def _pending_bpf(self) -> list[Probe]:
        return [p for n, p in self.probes.items()
                if p.bpf_source and p.mode is not None and p.mode.bpf
                and self.status[n].state in (State.ATTACHED, State.DEGRADED)]

    # -- loading --------------------------------------------------------------------
    def _cflags_and_text(self, probes: list[Probe]) -> tuple[list[str], str]:
        slots: list[tuple[str, str]] = []
        flags: list[str] = []
        parts = [bpf_text(COMMON_HEADER)]
        for probe in probes:
            for macro, mapname in probe.error_slots.items():
                flags.append(f"-D{macro}={len(slots)}")
                slots.append((probe.name, mapname))
            flags += probe.cflags(self.features)
            parts.append(f"/* ---- probe {probe.name}: bpf/{probe.bpf_source} ---- */\n"
                         + probe.source_text())
        flags.insert(0, f"-DDPW_ERR_SLOTS={max(1, len(slots))}")
        self.error_slots = slots
        return flags, "\n".join(parts)

    def _compile(self, probes: list[Probe]):
        from bcc import BPF  # imported late: bcc reads the tracefs location at import

        class _Module(BPF):
            def _trace_autoload(self):  # each probe attaches its own hooks, one by one
                return None

        flags, text = self._cflags_and_text(probes)
        start = time.monotonic()
        with _CapturedStderr() as cap:
            try:
                module = _Module(text=text.encode(), cflags=flags)
                error = None
            except Exception as exc:
                module, error = None, exc
        self.compile_seconds += time.monotonic() - start
        self.compiles += 1
        if cap.text.strip():
            log.debug("compiler output:\n%s", cap.text)
        if module is None:
            return None, f"{error}: {_compiler_errors(cap.text)}"
        return module, None

    def load(self) -> None:
        if not self.status:
            self.plan()
        probes = self._pending_bpf()
        if probes:
            module, err = self._compile(probes)
            if module is None and len(probes) > 1:
                log.warning("combined compile failed (%s); compiling each probe alone to find the cause", err)
                good = []
                for probe in probes:
                    single, perr = self._compile([probe])
                    if single is None:
                        self._fail(probe.name, f"compile failed: {perr}")
                    else:
                        single.cleanup()
                        good.append(probe)
                module, err = self._compile(good) if good else (None, None)
                probes = good
            if module is None:
                for probe in probes:
                    self._fail(probe.name, f"compile failed: {err}")
            self.module = module
            malloc_trim()
        for name in self.order():
            probe = self.probes[name]
            st = self.status[name]
            if st.state not in (State.ATTACHED, State.DEGRADED):
                continue
            try:
                self._attach(probe)
            except Exception as exc:
                hint = perf_paranoid_hint()
                if hint and any(h.spec.perf_event for h in (probe.mode.hooks if probe.mode else ())):
                    exc = f"{exc} ({hint})"
                log.warning("probe %s failed to attach in mode %s: %s", name, st.mode, exc)
                if not self._fall_back(name, probe, f"{st.mode} attach failed: {exc}"):
                    self._fail(name, f"attach failed: {exc}")
        self.loaded = True

    def _attach(self, probe: Probe) -> None:
        down = [n for n in (probe.mode.needs if probe.mode else ()) if not self._running(n)]
        if down:
            raise RuntimeError(f"needs the readings of the {', '.join(down)} probe, which is not running")
        probe.attach(self.module)

    def _fall_back(self, name: str, probe: Probe, why: str) -> bool:
        """Try the probe's later user-space modes after a failed attach (no recompile)."""
        try:
            probe.detach()
        except Exception:
            pass
        for mode in probe.fallback_modes(self.features):
            probe.mode = mode
            try:
                self._attach(probe)
            except Exception as exc:
                why = f"{why}; {mode.name} attach failed: {exc}"
                continue
            st = self.status[name]
            st.state, st.mode = State.DEGRADED, mode.name
            st.reason = f"{why}; fell back to {mode.name}: {mode.description}"
            st.hooks = [str(h) for h in mode.hooks]
            return True
        return False

    def _fail(self, name: str, reason: str) -> None:
        st = self.status[name]
        st.state, st.reason = State.FAILED, reason
        probe = self.probes[name]
        try:
            probe.close()
        except Exception:
            pass

    def _running(self, name: str) -> bool:
        st = self.status.get(name)
        return st is not None and st.state in (State.ATTACHED, State.DEGRADED)

    def order(self) -> list[str]:
        """Probe names with every probe after the probes it needs (Probe.needs and its modes'
        needs): the order of attach and collect. A cycle is a programming error."""
        out: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in out:
                return
            if name in visiting:
                raise RuntimeError(f"probe needs form a cycle through {name}")
            visiting.add(name)
            probe = self.probes[name]
            wanted = probe.needs + tuple(n for m in probe.modes for n in m.needs)
            for dep in wanted:
                if dep in self.probes:
                    visit(dep)
            visiting.discard(name)
            out.append(name)

        for name in self.probes:
            visit(name)
        return out

    # -- queries --------------------------------------------------------------------
    def active(self) -> dict[str, Probe]:
        return {n: p for n, p in self.probes.items()
                if self.status.get(n) and self.status[n].state in (State.ATTACHED, State.DEGRADED)}

    def failures(self, required_only: bool = False) -> list[ProbeStatus]:
        bad = (State.FAILED, State.UNSUPPORTED)
        return [s for s in self.status.values()
                if s.state in bad and (s.required or not required_only)]

    def collect(self) -> dict[str, Any]:
        """Fresh cumulative readings of every active probe, plus the manager's own counters."""
        with self._lock:
            readings: dict[str, Any] = {}
            success: dict[tuple[str], int] = {}
            seconds: dict[tuple[str], float] = {}
            active = self.active()
            for name in self.order():
                probe = active.get(name)
                if probe is None:
                    continue
                inputs = {n: readings[n] for n in probe.needed() if n in readings}
                start = time.perf_counter()
                try:
                    readings[name] = probe.collect(inputs)
                    success[(name,)] = 1
                except Exception as exc:
                    self.collect_errors[name] = self.collect_errors.get(name, 0) + 1
                    success[(name,)] = 0
                    log.warning("probe %s collect failed: %s", name, exc)
                seconds[(name,)] = time.perf_counter() - start
            errors = self._read_errors()
            readings["_manager"] = {"counters": {"map_update_errors": errors,
                                                 "collect_errors": dict(self.collect_errors),
                                                 "events_lost": self._lost_events(errors)},
                                    "gauges": {"collect_success": success,
                                               "collect_seconds": seconds}}
            return readings

    def _lost_events(self, errors: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        """(probe, stage) -> events lost: map_update (a full in-kernel map: the sum of the
        probe's map-update errors), collect (failed reads), and any stage a probe reports
        itself through an optional ``lost_events() -> {stage: count}`` (perf/ring buffers)."""
        out: dict[tuple[str, str], int] = {}
        for name, probe in self.probes.items():
            st = self.status.get(name)
            if st is None or st.state not in (State.ATTACHED, State.DEGRADED):
                continue
            out[(name, "map_update")] = sum(v for (p, _m), v in errors.items() if p == name)
            out[(name, "collect")] = self.collect_errors.get(name, 0)
            own = getattr(probe, "lost_events", None)
            if callable(own):
                try:
                    for stage, value in own().items():
                        out[(name, str(stage))] = int(value)
                except Exception as exc:
                    log.debug("probe %s lost_events failed: %s", name, exc)
        return out

    def _read_errors(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {slot: 0 for slot in self.error_slots}
        if self.module is None or not self.error_slots:
            return out
        try:
            table = self.module[b"dpw_errors"]
            for i, slot in enumerate(self.error_slots):
                out[slot] = int(sum(table[table.Key(i)]))
        except Exception as exc:
            log.debug("reading dpw_errors failed: %s", exc)
        return out

    def program_stats(self) -> list[tuple[str, str, int, int]]:
        """(probe, program, run_time_ns, run_cnt) of every attached program."""
        from dpwatch.daemon.host.bpfstats import prog_info
        out = []
        if self.module is None:
            return out
        for name, probe in self.active().items():
            for fn in probe.programs:
                func = self.module.funcs.get(fn.encode())
                if func is None:
                    continue
                try:
                    info = prog_info(func.fd)
                except OSError as exc:
                    log.debug("prog info of %s failed: %s", fn, exc)
                    continue
                out.append((name, fn, int(info.run_time_ns), int(info.run_cnt)))
        return out

    def background(self) -> None:
        for name, probe in self.active().items():
            try:
                probe.background()
            except Exception as exc:
                log.debug("probe %s background work failed: %s", name, exc)

    def statuses(self) -> list[dict[str, Any]]:
        with self._lock:
            errors = self._read_errors()
            lost = self._lost_events(errors)
        out = []
        for n, st in self.status.items():
            d = st.as_dict(self.probes.get(n))
            if st.state in (State.ATTACHED, State.DEGRADED):
                # A full map or a lost event shows here too, not only in /metrics.
                d["map_update_errors"] = {m: v for (p, m), v in errors.items() if p == n}
                d["events_lost"] = {stage: v for (p, stage), v in lost.items() if p == n}
            out.append(d)
        return out

    def runtime_faults(self) -> dict[tuple[str, str], int]:
        """(probe, stage) -> events lost so far, only the non-zero ones (for --strict)."""
        with self._lock:
            lost = self._lost_events(self._read_errors())
        return {k: v for k, v in lost.items() if v}

    def close(self) -> None:
        with self._lock:
            for probe in self.probes.values():
                try:
                    probe.close()
                except Exception:
                    pass
            if self.module is not None:
                try:
                    self.module.cleanup()
                except Exception as exc:
                    log.debug("cleanup failed: %s", exc)
                self.module = None
