"""One shared set of fakes for unit tests: BCC tables and modules, and a probe manager.

The fakes behave like what the probes and the daemon use of the real things, nothing more:

- BCC tables (``bcc.table``): ``Key(...)`` and ``Leaf(...)`` build keys and values (a scalar
  has ``.value``; a struct has one attribute per field), ``table[key]`` (an ``int`` key works
  on arrays, as in BCC), ``items()``, ``keys()``, ``values()``, ``len()``, ``clear()``. A per-CPU
  table's value is a list with one entry per CPU. Arrays hold every index from 0 (BCC's
  ``items()`` on an array yields zero rows too); a hash holds only what was put in; an LRU hash
  evicts its least recently used key when full.
- ``FakeModule``: a loaded BPF module, ``module[b"name"]`` (or a ``str``) -> table, ``funcs``.
- ``FakeManager``: ``collect()``, ``status``, ``active()``, ``statuses()``, ``program_stats()``,
  ``config``, ``compile_seconds``: what daemon/collector.py, daemon/triage.py and
  daemon/app.py read of daemon/manager.py's ProbeManager, with the ``_manager`` block of a
  reading as the real manager builds it.

    probe.module = FakeModule(drops_counts=FakePerCpuArray(4, ncpus=2))
    manager = FakeManager({"drops": probe}, {"drops": reading}, config=Config())
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

from dpwatch.daemon.manager import ProbeStatus
from dpwatch.probes.base import State


# -- keys and values ----------------------------------------------------------------------------

class Scalar:
    """A ctypes integer as BCC hands it out: ``.value``, equal and hashed by its value."""

    __slots__ = ("value",)

    def __init__(self, value: Any = 0):
        self.value = value.value if isinstance(value, Scalar) else value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Scalar):
            return self.value == other.value
        return self.value == other

    def __hash__(self) -> int:
        return hash(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return int(self.value)

    def __repr__(self) -> str:
        return f"Scalar({self.value!r})"


class Struct:
    """A ctypes struct key or value: one attribute per field, equal and hashed by its fields."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    def _fields(self) -> tuple:
        return tuple(sorted(self.__dict__.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Struct) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self._fields()))

    def __repr__(self) -> str:
        return "Struct(" + ", ".join(f"{k}={v!r}" for k, v in self._fields()) + ")"


def make(*args: Any, **fields: Any) -> Scalar | Struct:
    """``Key``/``Leaf`` of a fake table: fields make a Struct, one value a Scalar."""
    if fields:
        return Struct(**fields)
    if len(args) == 1 and isinstance(args[0], (Scalar, Struct)):
        return args[0]
    if len(args) == 1 and isinstance(args[0], Mapping):
        return Struct(**args[0])
    return Scalar(args[0] if args else 0)


# -- tables -------------------------------------------------------------------------------------

class _Table:
    per_cpu = False

    def __init__(self, ncpus: int = 1):
        self.ncpus = ncpus

    @staticmethod
    def Key(*args: Any, **fields: Any):  # noqa: N802 - BCC's name
        return make(*args, **fields)

    @staticmethod
    def Leaf(*args: Any, **fields: Any):  # noqa: N802 - BCC's name
        return make(*args, **fields)

    def _value(self, value: Any):
        """What the table stores: per-CPU tables a list of ncpus entries (ints and structs as
        given, a short list padded with 0), others one Leaf."""
        if self.per_cpu:
            row = list(value) if isinstance(value, (list, tuple)) else [value] + [0] * (self.ncpus - 1)
            return row + [0] * (self.ncpus - len(row))
        if isinstance(value, (Scalar, Struct)):
            return value
        return make(value)

    def _zero(self):
        return [0] * self.ncpus if self.per_cpu else Scalar(0)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> list:
        return [k for k, _v in self.items()]

    def values(self) -> list:
        return [v for _k, v in self.items()]

    def itervalues(self):
        return iter(self.values())

    def iteritems(self):
        return iter(self.items())


class FakeArray(_Table):
    """BPF_ARRAY (or BPF_PERCPU_ARRAY with ``per_cpu=True``): indexes 0..size-1, every one there."""

    def __init__(self, size: int, rows: Mapping[int, Any] | Iterable[Any] = (), *,
                 per_cpu: bool = False, ncpus: int = 1):
        super().__init__(ncpus)
        self.per_cpu = per_cpu
        self.size = size
        self._rows = [self._zero() for _ in range(size)]
        items = rows.items() if isinstance(rows, Mapping) else enumerate(rows)
        for i, value in items:
            self[i] = value

    def _index(self, key: Any) -> int:
        i = int(key.value) if isinstance(key, Scalar) else int(key)
        if not 0 <= i < self.size:
            raise IndexError(f"array index {i} out of range (size {self.size})")
        return i

    def __getitem__(self, key: Any):
        return self._rows[self._index(key)]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._rows[self._index(key)] = self._value(value)

    def __delitem__(self, key: Any) -> None:  # BCC zeroes an array slot
        self._rows[self._index(key)] = self._zero()

    def items(self) -> list:
        return [(Scalar(i), row) for i, row in enumerate(self._rows)]

    def clear(self) -> None:
        self._rows = [self._zero() for _ in range(self.size)]


class FakePerCpuArray(FakeArray):
    def __init__(self, size: int, rows: Mapping[int, Any] | Iterable[Any] = (), *, ncpus: int = 2):
        super().__init__(size, rows, per_cpu=True, ncpus=ncpus)


class FakeHash(_Table):
    """BPF_HASH (``per_cpu=True``: BPF_PERCPU_HASH). Keys given as ints become Scalars, dicts
    Structs; a missing key raises KeyError. ``max_entries``: a full hash refuses new keys."""

    lru = False

    def __init__(self, rows: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (), *,
                 per_cpu: bool = False, ncpus: int = 1, max_entries: int | None = None):
        super().__init__(ncpus)
        self.per_cpu = per_cpu
        self.max_entries = max_entries
        self._rows: OrderedDict = OrderedDict()
        for key, value in (rows.items() if isinstance(rows, Mapping) else rows):
            self[key] = value

    @staticmethod
    def _key(key: Any):
        if isinstance(key, (Scalar, Struct)):
            return key
        if isinstance(key, Mapping):
            return Struct(**key)
        return Scalar(key)

    def __getitem__(self, key: Any):
        k = self._key(key)
        value = self._rows[k]
        if self.lru:
            self._rows.move_to_end(k)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        k = self._key(key)
        if k not in self._rows and self.max_entries is not None and len(self._rows) >= self.max_entries:
            if not self.lru:
                raise KeyError(f"hash full ({self.max_entries} entries): {k!r} not added")
            self._rows.popitem(last=False)
        self._rows[k] = self._value(value)
        self._rows.move_to_end(k)

    def __delitem__(self, key: Any) -> None:
        del self._rows[self._key(key)]

    def __contains__(self, key: Any) -> bool:
        return self._key(key) in self._rows

    def items(self) -> list:
        return list(self._rows.items())

    def clear(self) -> None:
        self._rows.clear()


class FakeLruHash(FakeHash):
    """BPF_LRU_HASH: when full, a new key evicts the least recently used one."""

    lru = True

    def __init__(self, rows: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (), *,
                 max_entries: int = 1024, per_cpu: bool = False, ncpus: int = 1):
        super().__init__(rows, per_cpu=per_cpu, ncpus=ncpus, max_entries=max_entries)


class FakeModule:
    """A loaded BCC module: ``module[b"name"]`` (or ``"name"``) is a table; an unknown name
    raises KeyError as BCC does. ``funcs`` maps program names (bytes) to objects with ``fd``."""

    def __init__(self, tables: Mapping[str, Any] | None = None, funcs: Mapping | None = None, **named: Any):
        self.tables: dict[str, Any] = {**(tables or {}), **named}
        self.funcs: dict = dict(funcs or {})
        self.cleaned = False

    @staticmethod
    def _name(name: bytes | str) -> str:
        return name.decode() if isinstance(name, bytes) else name

    def __getitem__(self, name: bytes | str):
        return self.tables[self._name(name)]

    def __contains__(self, name: bytes | str) -> bool:
        return self._name(name) in self.tables

    def get_table(self, name: bytes | str):
        return self[name]

    def cleanup(self) -> None:
        self.cleaned = True


# -- the probe manager --------------------------------------------------------------------------

Readings = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class FakeManager:
    """Stand-in for daemon/manager.py's ProbeManager over given probes and readings.

    ``probes``: name -> Probe (or a list of probes, by their ``name``). ``readings``: name ->
    Reading, or a callable returning that (called at every collect()). ``states`` and ``modes``
    override a probe's status (default attached, mode "test"); ``failed`` names probes whose
    collect fails (no reading, collect_success 0). ``counters``: map_update_errors
    {(probe, map): n} and extra events_lost {(probe, stage): n} of the manager's own counter
    block (collect_errors come from ``failed``); ``seconds`` each probe's collect time
    (default 0.001)."""

    def __init__(self, probes: Mapping[str, Any] | Iterable[Any], readings: Readings = None, *,
                 config: Any = None, states: Mapping[str, State] | None = None,
                 modes: Mapping[str, str | None] | None = None, failed: Iterable[str] = (),
                 counters: Mapping[str, Any] | None = None, seconds: Mapping[str, float] | None = None,
                 program_stats: Iterable[tuple[str, str, int, int]] = (), compile_seconds: float = 0.0,
                 reasons: Mapping[str, str] | None = None):
        if not isinstance(probes, Mapping):
            probes = {p.name: p for p in probes}
        self.probes = dict(probes)
        self.readings = readings if readings is not None else {}
        self.config = config if config is not None else getattr(next(iter(self.probes.values()), None),
                                                                "config", None)
        self.failed = set(failed)
        self.counters = dict(counters or {})
        self.seconds = dict(seconds or {})
        self._program_stats = list(program_stats)
        self.compile_seconds = compile_seconds
        self.compiles = 1
        self.loaded = True
        self.module = None
        self.collect_errors: dict[str, int] = {n: 1 for n in self.failed}
        self.status: dict[str, ProbeStatus] = {}
        for name, probe in self.probes.items():
            st = (states or {}).get(name, State.ATTACHED)
            mode = (modes or {}).get(name, "test")
            self.status[name] = ProbeStatus(name=name, state=st, mode=mode,
                                            reason=(reasons or {}).get(name, ""),
                                            description=getattr(probe, "description", ""))
        self.collects = 0

    def active(self) -> dict[str, Any]:
        return {n: p for n, p in self.probes.items()
                if self.status[n].state in (State.ATTACHED, State.DEGRADED)}

    def order(self) -> list[str]:
        return list(self.probes)

    def collect(self) -> dict[str, Any]:
        self.collects += 1
        source = self.readings() if callable(self.readings) else self.readings
        out: dict[str, Any] = {}
        success: dict[tuple[str], int] = {}
        seconds: dict[tuple[str], float] = {}
        for name in self.active():
            ok = name not in self.failed and name in source
            if ok:
                out[name] = source[name]
            success[(name,)] = 1 if ok else 0
            seconds[(name,)] = self.seconds.get(name, 0.001)
        errors = dict(self.counters.get("map_update_errors", {}))
        lost: dict[tuple[str, str], int] = {}
        for n in self.active():  # as the manager counts them: map_update and collect per probe
            lost[(n, "map_update")] = sum(v for (p, _m), v in errors.items() if p == n)
            lost[(n, "collect")] = self.collect_errors.get(n, 0)
        lost.update(self.counters.get("events_lost", {}))
        counters = {"map_update_errors": errors, "collect_errors": dict(self.collect_errors),
                    "events_lost": lost}
        out["_manager"] = {"counters": counters,
                           "gauges": {"collect_success": success, "collect_seconds": seconds}}
        return out

    def statuses(self) -> list[dict[str, Any]]:
        return [st.as_dict(self.probes.get(n)) for n, st in self.status.items()]

    def failures(self, required_only: bool = False) -> list[ProbeStatus]:
        bad = (State.FAILED, State.UNSUPPORTED)
        return [s for s in self.status.values() if s.state in bad and (s.required or not required_only)]

    def program_stats(self) -> list[tuple[str, str, int, int]]:
        return list(self._program_stats)

    def runtime_faults(self) -> dict[tuple[str, str], int]:
        return {}

    def background(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeFeatures:
    """The detected kernel features, as far as the collector and the report read them."""

    def __init__(self, kernel_release: str = "6.1.0-test", **extra: Any):
        self.kernel_release = kernel_release
        self.tracefs = None
        self.bcc = True
        self.bcc_reason = ""
        self.__dict__.update(extra)
