"""The probe interface.

A probe is ``bpf/<name>.c`` (optional) plus a module here. The manager drives each probe
through the same steps, and data only flows one way:

    choose_mode(features) -> cflags(config, err_slots) -> [one compile for all probes]
    -> attach(module) -> collect() readings -> metrics(reading) and diagnose(window) -> close()

Readings are plain dicts of cumulative counters and gauges so the daemon can keep a ring of
them and take deltas over any window without knowing what a probe counts.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Iterable


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
    """One kernel or user-space source a mode needs. ``kind`` is one of tracepoint,
    raw_tracepoint, kprobe, fentry, socket_filter, procfs, netlink."""
    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class Mode:
    name: str
    hooks: tuple[Hook, ...]
    description: str = ""
    degraded: bool = False  # a fallback that loses information compared with the best mode
    bpf: bool = True        # False: this mode runs in user space only (nothing to compile)


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

    def __init__(self, config: Any):
        self.config = config
        self.mode: Mode | None = None
        self.module = None
        self.peers: dict[str, "Probe"] = {}  # the other probes, set by the manager

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
        """The probe's BCC C source (package data bpf/<bpf_source>)."""
        from importlib import resources
        return resources.files("dpwatch.bpf").joinpath(self.bpf_source).read_text(encoding="utf-8")

    # -- lifecycle --------------------------------------------------------------
    def attach(self, module) -> None:
        """Attach the mode's kernel hooks. BCC function names follow its conventions:
        tracepoint__<system>__<event>, raw_tracepoint__<event>, kprobe__<function>."""
        self.module = module
        self._attached: list[Hook] = []
        for hook in self.mode.hooks if self.mode else ():
            if hook.kind == "tracepoint":
                system, event = hook.target.split(":")
                module.attach_tracepoint(tp=hook.target.encode(),
                                         fn_name=f"tracepoint__{system}__{event}".encode())
            elif hook.kind == "raw_tracepoint":
                event = hook.target.split(":")[-1]
                module.attach_raw_tracepoint(tp=event.encode(), fn_name=f"raw_tracepoint__{event}".encode())
            elif hook.kind == "kprobe":
                module.attach_kprobe(event=hook.target.encode(), fn_name=f"kprobe__{hook.target}".encode())
            elif hook.kind == "kretprobe":
                module.attach_kretprobe(event=hook.target.encode(),
                                        fn_name=f"kretprobe__{hook.target}".encode())
            else:
                continue
            self._attached.append(hook)

    @property
    def programs(self) -> list[str]:
        """BCC function names of the programs this probe attached (for --bpf-stats)."""
        names = []
        for hook in getattr(self, "_attached", []):
            if hook.kind == "tracepoint":
                system, event = hook.target.split(":")
                names.append(f"tracepoint__{system}__{event}")
            elif hook.kind == "raw_tracepoint":
                names.append(f"raw_tracepoint__{hook.target.split(':')[-1]}")
            elif hook.kind in ("kprobe", "kretprobe"):
                names.append(f"{hook.kind}__{hook.target}")
        return names

    def detach(self) -> None:
        """Undo attach(): detach every hook this probe attached (best effort)."""
        module = self.module
        for hook in reversed(getattr(self, "_attached", [])):
            try:
                if hook.kind == "tracepoint":
                    module.detach_tracepoint(tp=hook.target.encode())
                elif hook.kind == "raw_tracepoint":
                    module.detach_raw_tracepoint(tp=hook.target.split(":")[-1].encode())
                elif hook.kind == "kprobe":
                    module.detach_kprobe(event=hook.target.encode())
                elif hook.kind == "kretprobe":
                    module.detach_kretprobe(event=hook.target.encode())
            except Exception:
                pass
        self._attached = []

    def collect(self) -> Reading:
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
    if hook.kind == "tracepoint":
        return features.has_tracepoint(hook.target)
    if hook.kind == "raw_tracepoint":
        return features.raw_tracepoints and features.has_tracepoint(hook.target)
    if hook.kind in ("kprobe", "kretprobe"):
        return features.kprobes and features.kprobe_target(hook.target)
    if hook.kind == "procfs":
        import os
        return os.path.exists(hook.target)
    if hook.kind == "headers":  # exact headers of the running kernel (struct layouts read)
        return features.headers_exact
    if hook.kind == "fentry":
        return features.fentry
    if hook.kind == "tracepoint_field":
        # target is "system:event:field"
        system, event, fname = hook.target.split(":")
        if f"{system}:{event}" == "skb:kfree_skb" and fname == "reason":
            return features.kfree_skb_reason
        return False
    return True  # procfs, netlink, socket_filter: checked by the probe at attach time
