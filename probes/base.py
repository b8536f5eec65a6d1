"""The probe interface.

A probe is its folder ``probes/<name>/`` (probe.py, params.py, findings.py, its helpers) plus
``bpf/<name>.c`` and ``bpf/<name>.h`` when it has a kernel side (docs/architecture.md). The
manager drives each probe through the same steps, and data only flows one way:

    choose_mode(features) -> cflags(features) -> [one compile for all probes]
    -> attach(module) -> collect(inputs) readings -> metrics(reading) and diagnose(window)
    -> close()

Readings are plain dicts of cumulative counters and gauges so the daemon can keep a ring of
them and take deltas over any window without knowing what a probe counts.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from dpwatch.probes.params import Param


class State(str, enum.Enum):
    ATTACHED = "attached"
    DEGRADED = "degraded"
    UNSUPPORTED = "unsupported"
    FAILED = "failed"
    DISABLED = "disabled"


SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Hook:
    """One kernel or user-space source a mode needs. ``kind`` is a key of HOOK_KINDS (below):
    an unknown kind is an error when the probe class is defined, not a hook that is quietly
    taken as present."""
    kind: str
    target: str

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"hook {self.kind}:{self.target}: unknown hook kind {self.kind!r}; "
                             f"known: {', '.join(sorted(HOOK_KINDS))}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def spec(self) -> "HookKind":
        return HOOK_KINDS[self.kind]


@dataclass(frozen=True)
class Mode:
    name: str
    hooks: tuple[Hook, ...]
    description: str = ""
    degraded: bool = False  # a fallback that loses information compared with the best mode
    bpf: bool = True        # False: this mode runs in user space only (nothing to compile)

    @property
    def needs(self) -> tuple[str, ...]:
        """Probes whose readings this mode reads: its hooks of kind "probe"."""
        return tuple(h.target for h in self.hooks if h.kind == "probe")


@dataclass
class Finding:
    id: str
    probe: str
    severity: str
    title: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remediation: list[str] = field(default_factory=list)
    impact: float = 0.0  # for ranking within a severity: e.g. drops per second
    # Evidence keys the headline asserts happened ("the node is fragmenting": fragments
    # created). Each must hold a non-zero count (a number, or numbers in a dict, summed).
    claims: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if os.environ.get(CHECK_CLAIMS_ENV):
            wrong = contradictions(self)
            if wrong:
                raise ContradictionError(f"{self.id}: {'; '.join(wrong)} (title {self.title!r})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "probe": self.probe, "severity": self.severity, "title": self.title,
            "summary": self.summary, "evidence": self.evidence, "remediation": self.remediation,
            "impact": round(self.impact, 3),
        }


CHECK_CLAIMS_ENV = "DPWATCH_CHECK_CLAIMS"  # set by the test suite: a contradiction is an error


class ContradictionError(AssertionError):
    """A finding's headline claims what its own evidence does not show."""


def _count(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        parts = [_count(v) for v in value.values()]
        return sum(p for p in parts if p is not None)
    if isinstance(value, (list, tuple)):
        return float(len(value))
    return None


def contradictions(f: "Finding") -> list[str]:
    """What is wrong between a finding's headline and its evidence: every claimed key must be
    present with a non-zero count."""
    out = []
    for key in f.claims:
        if key not in f.evidence:
            out.append(f"claims {key!r} but the evidence has no such key")
            continue
        n = _count(f.evidence[key])
        if not n:
            out.append(f"claims {key!r} but its count is {f.evidence[key]!r}")
    return out


# A reading: {"counters": {group: {key_tuple: value}}, "gauges": {...}, "info": {...}}.
Reading = dict[str, Any]


class Window:
    """What a probe's diagnose() sees: deltas of its counters over a span of time."""

    def __init__(self, seconds: float, old: Reading | None, new: Reading):
        self.seconds = max(seconds, 1e-9)
        self.old = old
        self.new = new

    def delta(self, group: str) -> dict[Any, float]:
        return counter_delta((self.old or {}).get("counters", {}).get(group, {}),
                             self.new.get("counters", {}).get(group, {}))

    def rate(self, value: float) -> float:
        return value / self.seconds


def counter_delta(old: dict, new: dict) -> dict:
    """Per-key increase of cumulative counters. A key whose value went down was evicted
    from an LRU map and re-added (or the kernel reset it): its new value is the increase."""
    out = {}
    for key, value in new.items():
        before = old.get(key, 0)
        diff = value - before if value >= before else value
        if diff:
            out[key] = diff
    return out


class Probe:
    """Base class. Subclasses set the class attributes and override what they need."""

    name: str = ""
    bpf_source: str | None = None       # file name under bpf/, or None for user-space only
    modes: tuple[Mode, ...] = ()         # best first
    error_slots: dict[str, str] = {}     # C macro -> map or stage name, for dpw_errors
    description: str = ""
    # Every finding id this probe can emit ("<probe>.<name>"). docs/findings.md documents
    # each one, and a test holds the code and the doc to the same list.
    finding_ids: tuple[str, ...] = ()
    # Settings (probes/<name>/params.py): the daemon generates their flags, DPWATCH_* twins,
    # Config attributes and validation. ``param_group`` titles their --help section.
    params: tuple[Param, ...] = ()
    param_group: str = ""
    # Checks across several params (each alone is checked from its declaration):
    # fn(config, error_class) raising error_class naming the flags.
    param_checks: tuple[Callable[[Any, type], None], ...] = ()
    # Probes whose readings collect() receives (``inputs``) when they run; a mode that cannot
    # work without one says Hook("probe", name) (the manager then attaches it only when that
    # probe runs). The manager collects them first; no probe reads another's maps.
    needs: tuple[str, ...] = ()

    def __init__(self, config: Any):
        self.config = config
        self.mode: Mode | None = None
        self.module = None

    def needed(self) -> tuple[str, ...]:
        """The probes whose readings this probe's current mode reads."""
        extra = self.mode.needs if self.mode is not None else ()
        return tuple(dict.fromkeys(self.needs + extra))

    def fallback_modes(self, features) -> list[Mode]:
        """User-space modes after the current one that this kernel allows: what the manager
        tries, without a recompile, when attaching the current mode fails."""
        if self.mode not in self.modes:
            return []
        later = self.modes[self.modes.index(self.mode) + 1:]
        return [m for m in later if not m.bpf
                and all(hook_available(h, features) for h in m.hooks)]

    # -- selection -------------------------------------------------------------
    def choose_mode(self, features) -> tuple[Mode | None, str]:
        """Return the best mode the kernel allows, with a reason; (None, why) if none."""
        missing_all = []
        for mode in self.modes:
            missing = [str(h) for h in mode.hooks if not hook_available(h, features)]
            if not missing:
                return mode, mode.description or f"all hooks of {mode.name} present"
            missing_all.append(f"{mode.name}: missing {', '.join(missing)}")
        return None, "; ".join(missing_all) or "no modes"

    def cflags(self, features) -> list[str]:
        return []

    def table(self, name: str):
        """A BCC map of the loaded module (BCC wants bytes names)."""
        return self.module[name.encode()]

    def source_text(self) -> str:
        """The probe's BCC C source (package data bpf/<bpf_source>), after its header
        bpf/<name>.h when it has one: the constants both sides share (probes/cdefs.py)."""
        from importlib import resources
        files = resources.files("dpwatch.bpf")
        header = files.joinpath(self.bpf_source.rsplit(".", 1)[0] + ".h")
        text = files.joinpath(self.bpf_source).read_text(encoding="utf-8")
        if header.is_file():
            return header.read_text(encoding="utf-8") + "\n" + text
        return text

    # -- lifecycle --------------------------------------------------------------
    def attach(self, module) -> None:
        """Attach the mode's kernel hooks that HOOK_KINDS knows how to attach (BCC names:
        tracepoint__<system>__<event>, raw_tracepoint__<event>, kprobe__<function>); other
        kinds (sockets, netlink, tc) are the probe's own attach."""
        self.module = module
        self._attached: list[Hook] = []
        for hook in self.mode.hooks if self.mode else ():
            if hook.spec.attach is None:
                continue
            hook.spec.attach(module, hook)
            self._attached.append(hook)

    @property
    def programs(self) -> list[str]:
        """BCC function names of the programs this probe attached (for --bpf-stats)."""
        return [hook.spec.program(hook) for hook in getattr(self, "_attached", [])
                if hook.spec.program is not None]

    def detach(self) -> None:
        """Undo attach(): detach every hook this probe attached (best effort)."""
        module = self.module
        for hook in reversed(getattr(self, "_attached", [])):
            try:
                hook.spec.detach(module, hook)
            except Exception:
                pass
        self._attached = []

    def collect(self, inputs: Mapping[str, Reading] | None = None) -> Reading:
        """A fresh cumulative reading. ``inputs`` holds this round's readings of the probes
        named by needed() that are running (a missing one is a probe that is down)."""
        return {"counters": {}, "gauges": {}}

    def background(self) -> None:
        """Optional slow work done on the sampler thread, never in a request."""

    def metrics(self, reading: Reading) -> Iterable:
        return ()

    def diagnose(self, window: Window) -> list[Finding]:
        return []

    def info(self) -> dict[str, Any]:
        """Extra facts for /probes (sizes, name source, ...)."""
        return {}

    def close(self) -> None:
        if self.module is not None:
            self.detach()
        self.module = None


def hook_available(hook: Hook, features) -> bool:
    return hook.spec.available(hook, features)


def _tp_name(hook: Hook) -> str:
    system, event = hook.target.split(":")
    return f"tracepoint__{system}__{event}"


def _raw_event(hook: Hook) -> str:
    return hook.target.split(":")[-1]


def _field_available(hook: Hook, features) -> bool:
    system, event, fname = hook.target.split(":")  # "system:event:field"
    return f"{system}:{event}" == "skb:kfree_skb" and fname == "reason" and features.kfree_skb_reason


def _checked_at_attach(hook: Hook, features) -> bool:
    return True  # the probe opens it at attach time and says why when it cannot


@dataclass(frozen=True)
class HookKind:
    """How the manager and the base class treat one kind of hook: whether the running kernel
    has it, and (for BPF programs the base class attaches) attach, detach and program name."""
    available: Callable[[Hook, Any], bool]
    attach: Callable[[Any, Hook], None] | None = None
    detach: Callable[[Any, Hook], None] | None = None
    program: Callable[[Hook], str] | None = None
    perf_event: bool = False  # attached through perf_event_open (kernel.perf_event_paranoid applies)


HOOK_KINDS: dict[str, HookKind] = {
    "tracepoint": HookKind(
        available=lambda h, f: f.has_tracepoint(h.target),
        attach=lambda m, h: m.attach_tracepoint(tp=h.target.encode(), fn_name=_tp_name(h).encode()),
        detach=lambda m, h: m.detach_tracepoint(tp=h.target.encode()),
        program=_tp_name, perf_event=True),
    "raw_tracepoint": HookKind(
        available=lambda h, f: f.raw_tracepoints and f.has_tracepoint(h.target),
        attach=lambda m, h: m.attach_raw_tracepoint(tp=_raw_event(h).encode(),
                                                   fn_name=f"raw_tracepoint__{_raw_event(h)}".encode()),
        detach=lambda m, h: m.detach_raw_tracepoint(tp=_raw_event(h).encode()),
        program=lambda h: f"raw_tracepoint__{_raw_event(h)}"),
    "kprobe": HookKind(
        available=lambda h, f: f.kprobes and f.kprobe_target(h.target),
        attach=lambda m, h: m.attach_kprobe(event=h.target.encode(), fn_name=f"kprobe__{h.target}".encode()),
        detach=lambda m, h: m.detach_kprobe(event=h.target.encode()),
        program=lambda h: f"kprobe__{h.target}", perf_event=True),
    "kretprobe": HookKind(
        available=lambda h, f: f.kprobes and f.kprobe_target(h.target),
        attach=lambda m, h: m.attach_kretprobe(event=h.target.encode(),
                                               fn_name=f"kretprobe__{h.target}".encode()),
        detach=lambda m, h: m.detach_kretprobe(event=h.target.encode()),
        program=lambda h: f"kretprobe__{h.target}", perf_event=True),
    "fentry": HookKind(available=lambda h, f: f.fentry),
    "tracepoint_field": HookKind(available=_field_available),
    # exact headers of the running kernel (a mode that reads struct layouts)
    "headers": HookKind(available=lambda h, f: f.headers_exact),
    "procfs": HookKind(available=lambda h, f: os.path.exists(h.target)),
    # another probe's readings; the manager checks it is running before attach
    "probe": HookKind(available=_checked_at_attach),
    "netlink": HookKind(available=_checked_at_attach),
    "socket_filter": HookKind(available=_checked_at_attach),
    "bpf_link": HookKind(available=_checked_at_attach),
}
