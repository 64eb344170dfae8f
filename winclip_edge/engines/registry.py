"""Backends as a registry: one record per backend says everything the rest of the package needs to know about it.

A backend is one module that defines one :class:`BackendRecord` (module attribute ``BACKEND``): its name, the
precisions it runs, its own options dataclass, which common :class:`EngineConfig` fields it takes, how to create
its engine, its ``tune`` candidates and preparation, what it builds, the packages it needs. ``create_engine``,
the CLI's ``--backend`` choices and engine flags, ``info``, ``engine tune``, ``engine quantize``, the roofline and the machine key
read this registry; nothing else lists backends.

The built-ins (``BUILTINS``) and third-party backends are loaded the same way: by name, when the registry is
first asked (so importing this module imports no backend), then cached. A third-party backend registers in the
entry-point group ``winclip_edge.backends``; the entry point names either a :class:`BackendRecord` or simply an
engine class taking ``(bundle, config)`` that implements the ``Engine`` protocol of engines/base.py::

    [project.entry-points."winclip_edge.backends"]
    myengine = "my_package.engine:BACKEND"      # a BackendRecord, or a class: "my_package.engine:MyEngine"

A plugin that fails to load is reported by name with its error (``info``, ``--help``, and the error when it is
asked for) and never breaks the built-ins; a plugin may not take a built-in's name.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ..bundle import Bundle
from ..performance import machine as _machine
from .base import Engine, EngineError
from .config import AUTO, COMMON_DEFAULTS, COMMON_FIELDS, EngineConfig

GROUP = "winclip_edge.backends"
# The built-in backends, in the default order: auto's "first backend that takes them", tune's candidate order, --help.
BUILTINS = ("onnxruntime", "openvino", "torch", "tensorrt", "triton")
# In the machine key besides the backends' own libraries: numpy (its BLAS is the roofline's fp32 probe).
EXTRA_KEY_PACKAGES = ("numpy",)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")

# TuneConfig -> (configs to try, [(config, why it cannot run here)])
Candidates = Callable[[Any], "tuple[list[EngineConfig], list[tuple[EngineConfig, str]]]"]
# (bundle, config, product, log, build) -> None: make what the candidate needs (an int8 model) when missing
Prepare = Callable[[Bundle, EngineConfig, Optional[str], Callable[[str], None], bool], None]


def option(default: Any, *, flag: str | None = None, help: str = "", choices: Sequence[str] | None = None,
           type: Callable[[str], Any] | None = None) -> Any:
    """A field of a backend's options dataclass; ``flag`` is its command-line flag (a built-in's historical name;
    a plugin's flags are always ``--<backend>-<field>``), ``help`` / ``choices`` / ``type`` what the CLI shows and
    parses. Plain data: the library never parses flags."""
    meta = {"flag": flag, "help": help, "choices": tuple(choices) if choices else None, "type": type}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class BackendRecord:
    """Everything about one backend. Only ``name`` and ``create`` are required."""

    name: str
    create: Callable[[Bundle, EngineConfig], Engine]  # builds the engine; imports its library lazily
    precisions: Optional[tuple[str, ...]] = ("fp32",)  # what --precision may be; None = any (the engine checks)
    default_precision: str = "fp32"  # precision=None means this
    options: Optional[type] = None  # its options dataclass (EngineConfig.options), None = it takes none
    takes: tuple[str, ...] = ()  # the common EngineConfig fields it reads: a subset of COMMON_FIELDS
    devices: tuple[str, ...] = ()  # the --device values it takes besides auto ("<i>" = an index); () = any
    candidates: Optional[Candidates] = None  # tune: what to time on this machine
    prepare: Optional[Prepare] = None  # tune: make a missing artefact of a candidate
    builds: str = ""  # what it builds from a bundle, e.g. "TensorRT plans per GPU"
    build_command: str = ""  # the command that builds it: quantize | build-engine
    packages: tuple[str, ...] = ()  # distributions it runs on (their versions join the machine key)
    install: str = ""  # how to install them
    # roofline: (precision, n) -> an n x n GEMM call in its library's kernels, to be timed; None = not probed here
    gemm_probe: Optional[Callable[[str, int], Optional[Callable[[], Any]]]] = None
    summary: str = ""  # one line for info and --help
    origin: str = ""  # where a plugin came from (its entry point)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.takes) - set(COMMON_FIELDS))
        if unknown:
            raise EngineError(f"backend {self.name!r}: takes {unknown}, which are not EngineConfig fields "
                              f"(choose from {list(COMMON_FIELDS)})")
        if self.options is not None and not dataclasses.is_dataclass(self.options):
            raise EngineError(f"backend {self.name!r}: options must be a dataclass, got {self.options!r}")

    @property
    def builtin(self) -> bool:
        return self.name in BUILTINS and not self.origin

    def accepts_device(self, device: str) -> bool:
        """Whether ``device`` is one this backend names (before asking its library whether it is present)."""
        if device == AUTO or "device" in self.takes and not self.devices:
            return True
        return "device" in self.takes and any(re.fullmatch(re.escape(d).replace(re.escape("<i>"), r"\d+"), device,
                                                           re.IGNORECASE) for d in self.devices)

    def option_fields(self) -> tuple[dataclasses.Field, ...]:
        return fields(self.options) if self.options is not None else ()


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (tune candidates, info)."""
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


# ---------------------------------------------------------------- loading (once, by name, built-ins and plugins alike)
def _entry_points() -> list:
    try:
        found = metadata.entry_points(group=GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        found = metadata.entry_points().get(GROUP, ())
    unique: dict[tuple[str, str], Any] = {}
    for ep in found:  # the same distribution seen twice on sys.path is one entry point
        unique.setdefault((ep.name, ep.value), ep)
    return list(unique.values())


def record_of_class(name: str, cls: type, origin: str = "") -> BackendRecord:
    """The record of a bare engine class: ``cls(bundle, config)`` implements the Engine protocol; its precisions
    are its ``precisions`` attribute when it has one (else any); it takes no options and no common field."""
    if not (callable(getattr(cls, "run", None)) and callable(getattr(cls, "close", None))):
        raise EngineError(f"{cls.__module__}.{cls.__qualname__} does not implement the Engine protocol (run, close)")
    precisions = tuple(cls.precisions) if getattr(cls, "precisions", None) else None
    default = getattr(cls, "default_precision", None) or (precisions[0] if precisions else "fp32")
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    return BackendRecord(name=name, create=cls, precisions=precisions, default_precision=default, summary=summary,
                         origin=origin)


def _plugin(ep: Any) -> BackendRecord:
    obj = ep.load()
    if isinstance(obj, BackendRecord):
        if obj.name != ep.name:
            raise EngineError(f"the entry point is called {ep.name!r} but its record {obj.name!r}")
        return dataclasses.replace(obj, origin=ep.value)
    if isinstance(obj, type):
        return record_of_class(ep.name, obj, ep.value)
    raise EngineError(f"{ep.value} is neither a BackendRecord nor an engine class")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, BackendRecord], dict[str, str]]:
    records: dict[str, BackendRecord] = {}
    for name in BUILTINS:  # a failure here is a bug of the package: raised, not hidden
        records[name] = importlib.import_module(f"{__package__}.{name}").BACKEND
    broken: dict[str, str] = {}
    for ep in _entry_points():
        if ep.name in BUILTINS or ep.name == AUTO:
            broken[ep.name] = f"{ep.value}: the name {ep.name!r} is taken by the built-in backend; rename the entry point"
        elif not _NAME.fullmatch(ep.name):
            broken[ep.name] = f"{ep.value}: a backend name is lower-case letters, digits, '-', '_', '.'"
        elif ep.name in records or ep.name in broken:
            broken[ep.name] = f"{ep.value}: a second entry point of that name (the first one is kept)"
        else:
            try:
                records[ep.name] = _plugin(ep)
            except Exception as err:  # noqa: BLE001 -- any error of a plugin's code is that plugin's, reported
                broken[ep.name] = f"{ep.value}: {_first_line(err)}"
    return records, broken


def backends() -> dict[str, BackendRecord]:
    """Every usable backend, built-ins first (in BUILTINS order), then plugins in entry-point order."""
    return dict(_load()[0])


def broken_backends() -> dict[str, str]:
    """Plugins that could not be loaded: name -> why."""
    return dict(_load()[1])


def refresh() -> None:
    """Forget the loaded registry (a plugin installed or removed while the process runs; tests)."""
    _load.cache_clear()


def backend(name: str) -> BackendRecord:
    """The record of ``name``; an EngineError naming the choices (or the plugin's load error) otherwise."""
    records, broken = _load()
    if name in records:
        return records[name]
    if name in broken:
        raise EngineError(f"backend {name!r} could not be loaded ({broken[name]})")
    raise EngineError(f"unknown backend {name!r}; choose one of {(AUTO, *records)}")


def owner_of(options: Any) -> Optional[BackendRecord]:
    """The backend whose options dataclass ``options`` is an instance of."""
    return next((r for r in backends().values() if r.options is not None and isinstance(options, r.options)), None)


def precisions() -> tuple[str, ...]:
    """Every precision some backend names, in the usual order (what --precision accepts)."""
    order = ["fp32", "bf16", "fp16", "int8"]
    for record in backends().values():
        order += [p for p in record.precisions or () if p not in order]
    named = {p for r in backends().values() for p in r.precisions or ()}
    return tuple(p for p in order if p in named)


# ---------------------------------------------------------------- a config against its backend
def check_config(record: BackendRecord, config: EngineConfig) -> None:
    """Refuse what ``record`` would otherwise ignore: another backend's options, a common field it does not take,
    a device it does not name, (plugins) a precision it does not run. Built-ins check their precision themselves,
    saying how to make the missing model."""
    options = config.options
    if options is not None and (record.options is None or not isinstance(options, record.options)):
        owner = owner_of(options)
        what = type(options).__name__ + (f" (the {owner.name} backend's options)" if owner else "")
        takes = f"it takes {record.options.__name__}" if record.options is not None else "it takes no options"
        raise EngineError(f"{what} is not an option of the {record.name} backend ({takes})")
    for name in config.common_given():
        if name not in record.takes:
            takes = ", ".join(record.takes) or "none of " + ", ".join(COMMON_FIELDS)
            raise EngineError(f"{name} is not an option of the {record.name} backend (it takes: {takes})")
    if not record.accepts_device(config.device):
        raise EngineError(f"device {config.device!r} is not valid for the {record.name} backend (it runs on: "
                          f"{', '.join((AUTO, *record.devices))})")
    if (not record.builtin and config.precision is not None and record.precisions is not None
            and config.precision not in record.precisions):
        raise EngineError(f"the {record.name} backend runs precision {', '.join(record.precisions)}, not "
                          f"{config.precision}")


def default_precision(backend_name: str) -> str:
    if backend_name == AUTO:
        return "fp32"
    return backend(backend_name).default_precision


def resolved(config: EngineConfig) -> EngineConfig:
    """``config`` with the backend's default precision filled in (records, reports, comparisons)."""
    return config if config.precision is not None else dataclasses.replace(
        config, precision=default_precision(config.backend))


def describe(config: EngineConfig) -> str:
    """``<backend> <precision>``, the precision resolved: how an engine is named in messages and tables."""
    return f"{config.backend} {resolved(config).precision}"


def options_values(record: BackendRecord, options: Any) -> dict:
    """The backend's options as plain JSON values (its defaults where ``options`` is None)."""
    if record.options is None:
        return {}
    options = options if options is not None else record.options()
    return {f.name: _plain(getattr(options, f.name)) for f in record.option_fields()}


def options_from_values(record: BackendRecord, values: Mapping[str, Any]) -> Any:
    """The options of ``record`` from plain values (unknown keys ignored); None where they are its defaults."""
    if record.options is None:
        return None
    known = {f.name for f in record.option_fields()}
    options = record.options(**{k: v for k, v in values.items() if k in known})
    return None if options == record.options() else options


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def config_to_dict(config: EngineConfig) -> dict:
    """A JSON-safe dict of ``config`` (a child process rebuilds it with :func:`config_from_dict`)."""
    out = {f: _plain(getattr(config, f)) for f in ("backend", "precision", *COMMON_FIELDS)}
    record = owner_of(config.options) if config.options is not None else None
    out["options"] = options_values(record, config.options) if record is not None else None
    return out


def config_from_dict(values: Mapping[str, Any]) -> EngineConfig:
    common = {f: values.get(f, COMMON_DEFAULTS[f]) for f in COMMON_FIELDS}
    common["engine_dir"] = Path(common["engine_dir"]) if common["engine_dir"] is not None else None
    options = None
    if values.get("options") is not None:
        record = backend(values["backend"])
        options = options_from_values(record, values["options"]) or record.options()
    return EngineConfig(backend=values.get("backend", AUTO), precision=values.get("precision"), options=options,
                        **common)


def identity(config: EngineConfig) -> dict:
    """What an engine's results depend on, flat and as strings (a resumed evaluation must match it)."""
    resolved_config = resolved(config)
    out = {f: getattr(resolved_config, f) for f in ("backend", "precision", *COMMON_FIELDS)}
    if config.backend != AUTO:
        out.update(options_values(backend(config.backend), config.options))
    return {k: None if v is None else str(v) for k, v in sorted(out.items())}


# ---------------------------------------------------------------- this machine, as its engines see it
def engine_packages() -> tuple[str, ...]:
    """The distributions whose versions join the machine key: the built-in backends' packages (in BUILTINS order)
    and numpy. Plugins' packages are not part of it: installing a plugin must not invalidate every cache."""
    names: list[str] = []
    for name in BUILTINS:
        names += [p for p in backend(name).packages if p not in names]
    return tuple(names + [p for p in EXTRA_KEY_PACKAGES if p not in names])


def machine_identity() -> dict:
    """CPU model + ISA flags, GPUs, the engine libraries' versions (performance/machine.py)."""
    return _machine.machine_identity(engine_packages())


def machine_key(identity: dict | None = None) -> str:
    """The short key of this machine for compiled-model caches and tune records."""
    return _machine.machine_key(identity if identity is not None else machine_identity())


__all__ = ["BUILTINS", "BackendRecord", "GROUP", "backend", "backends", "broken_backends", "check_config",
           "config_from_dict", "config_to_dict", "default_precision", "describe", "engine_packages", "identity", "installed",
           "machine_identity", "machine_key", "option", "options_from_values", "options_values", "owner_of",
           "precisions", "record_of_class", "refresh", "resolved"]
