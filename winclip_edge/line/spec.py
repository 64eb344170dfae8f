"""The station as data: which bundle and products, which engine, sources, sinks, batching, outputs and HTTP face
(docs/line.md, "The station file"). ``winclip-edge serve --config station.toml`` reads it,
``serve ... --print-config`` writes the one its flags describe, :func:`winclip_edge.line.build_station` wires it.

Every part is a frozen dataclass with the defaults of ``serve``'s flags; a file is read strictly (typed.py):
an unknown key or a wrong type is refused naming the key path and the file. A source's or a sink's own keys are
those of its kind's options dataclass (plugins.py), so a new kind brings its keys with it.
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from ..drift import STATISTICS, DriftLimits, Limit
from ..engines import EngineConfig
from ..engines.config import AUTO
from ..engines.registry import backends, owner_of, precisions
from ..inputs import parse_host_port
from ..names import InvalidName, check_name, is_valid_name, suggest_name
from ..scoring import ScoringOptions
from ..service.config import DEFAULT_PORT, KEEP_RESULTS, MAX_UPLOAD_MB, RESULT_TIMEOUT_S
from ..tiles.overrides import TilingOverrides
from .modbus import ModbusOptions
from .opcua.config import DEFAULT_PORT as OPCUA_PORT
from .parts import HTTP_VIEW, ON_TIMEOUT, PartsConfig
from .registry import PluginError, resolve_source, sink_plugin, sink_plugins, source_plugins
from .station import SAVE_POLICIES
from .typed import SpecError, build, from_table, to_table

DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
OPCUA_LISTEN = f"127.0.0.1:{OPCUA_PORT}"


@dataclass(frozen=True)
class EngineSpec:
    """``[engine]``: the EngineConfig of the station as plain values -- backend, precision, the common fields, and
    the backend's own options as keys of the same table (``provider = "cpu"``, ``performance_hint = ...``). With
    ``backend = "auto"``, own options name their backend, as the flags do (engines/registry.py)."""

    backend: str = AUTO
    precision: Optional[str] = None
    threads: int = 0
    device: str = AUTO
    engine_dir: Optional[str] = None
    options: Any = None  # an instance of the backend's options dataclass; None = its defaults

    def __post_init__(self) -> None:
        known = backends()
        if self.backend != AUTO and self.backend not in known:
            raise SpecError("backend", f"must be one of {', '.join((AUTO, *known))}, got {self.backend!r}")
        if self.precision is not None and self.precision not in precisions():
            raise SpecError("precision", f"must be one of {', '.join(precisions())}, got {self.precision!r}")
        if self.threads < 0:
            raise SpecError("threads", f"must be >= 0, got {self.threads}")
        if self.options is not None:
            owner = owner_of(self.options)
            if owner is None or (self.backend != AUTO and owner.name != self.backend):
                raise SpecError("options", f"{type(self.options).__name__} are not options of the {self.backend} "
                                           "backend")

    @classmethod
    def from_table(cls, table: Any, key: str) -> "EngineSpec":
        if not isinstance(table, dict):
            raise SpecError(key, "expected a table (backend = ..., precision = ..., and the backend's own options)")
        rest = dict(table)
        head = build(_EngineHead, {k: rest.pop(k) for k in ("backend", "precision", "threads", "device", "engine_dir")
                                   if k in rest}, key)
        options = None
        if rest:
            record = _options_owner(head.backend, sorted(rest), key)
            options = build(record.options, rest, key)
        try:
            return cls(**{f.name: getattr(head, f.name) for f in fields(_EngineHead)}, options=options)
        except SpecError as err:
            raise err.at(key) from None

    def to_table(self) -> dict:
        head = {f.name: getattr(self, f.name) for f in fields(_EngineHead) if getattr(self, f.name) is not None}
        return {**head, **(to_table(self.options) if self.options is not None else {})}

    @classmethod
    def of(cls, config: EngineConfig) -> "EngineSpec":
        return cls(backend=config.backend, precision=config.precision, threads=config.threads, device=config.device,
                   engine_dir=str(config.engine_dir) if config.engine_dir is not None else None,
                   options=config.options)


@dataclass(frozen=True)
class _EngineHead:
    backend: str = AUTO
    precision: Optional[str] = None
    threads: int = 0
    device: str = AUTO
    engine_dir: Optional[str] = None


def _options_owner(backend_name: str, keys: list[str], key: str) -> Any:
    """The backend whose options these keys are: the named one, or under auto the first that has them all."""
    records = backends()
    candidates = [records[backend_name]] if backend_name != AUTO else list(records.values())
    for record in candidates:
        own = {f.name for f in record.option_fields()}
        if record.options is not None and set(keys) <= own:
            return record
    dot = f"{key}." if key else ""
    if backend_name != AUTO:
        own = [f.name for f in records[backend_name].option_fields()]
        bad = next(k for k in keys if k not in own)
        raise SpecError(f"{dot}{bad}", f"unknown key for the {backend_name} backend (known here: backend, precision, "
                                       f"threads, device, engine_dir{''.join(', ' + o for o in own)})")
    raise SpecError(f"{dot}{keys[0]}", "unknown key: no backend has the options " + ", ".join(keys))


def engine_config(spec: EngineSpec) -> EngineConfig:
    """The EngineConfig of ``[engine]`` (``auto`` is selected by the library, once, when the engine is made)."""
    return EngineConfig(backend=spec.backend, precision=spec.precision, threads=spec.threads, device=spec.device,
                        engine_dir=Path(spec.engine_dir) if spec.engine_dir else None, options=spec.options)


@dataclass(frozen=True)
class SourceSpec:
    """One ``[[sources]]`` entry: ``spec`` as ``--source`` takes it (``0``, ``line.avi``, ``rtsp://...``,
    ``gst:...``, ``folder:DIR``, ``genicam:ID``, a plugin's ``prefix:...``), its ``name`` (None: made from the spec by
    :class:`StationSpec`) and ``options``, an instance of its kind's options dataclass (None: its defaults)."""

    spec: str
    name: Optional[str] = None
    options: Any = None
    kind: str = field(default="", init=False, compare=False)

    def __post_init__(self) -> None:
        _check_part_name(self.name, "source")
        try:
            plugin, _ = resolve_source(self.spec, source_plugins())
        except PluginError as err:
            raise SpecError("spec", str(err)) from None
        options = plugin.options() if self.options is None else self.options
        if not isinstance(options, plugin.options):
            raise SpecError("options", f"a {plugin.kind} source takes {plugin.options.__name__}, got "
                                       f"{type(options).__name__}")
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "kind", plugin.kind)

    @classmethod
    def from_table(cls, table: Any, key: str) -> "SourceSpec":
        if not isinstance(table, dict):
            raise SpecError(key, "expected a table with spec = ... (and name, options of its kind)")
        rest = dict(table)
        head = build(_SourceHead, {k: rest.pop(k) for k in ("spec", "name") if k in rest}, key)
        try:
            plugin, _ = resolve_source(head.spec, source_plugins())
        except PluginError as err:
            raise SpecError(f"{key}.spec", str(err)) from None
        try:
            options = build(plugin.options, rest, key)
        except SpecError as err:
            if not err.problem.startswith("unknown key"):
                raise
            prefix = re.match(r"[A-Za-z][\w.+-]*:(?!//)", head.spec)
            hint = (f"; no installed source kind has the prefix {prefix.group(0)!r}" if prefix and plugin.prefix is None
                    else "")
            raise SpecError(err.key, f"unknown key for a {plugin.kind} source{err.problem[len('unknown key'):]}{hint}",
                            err.file) from None
        try:
            return cls(spec=head.spec, name=head.name, options=options)
        except SpecError as err:
            raise err.at(key) from None

    def to_table(self) -> dict:
        return {"name": self.name, "spec": self.spec, **to_table(self.options)}


def _check_part_name(name: Optional[str], what: str) -> None:
    """A given source or sink name follows the one name rule (it is a row field, a metric label, a folder)."""
    if name is not None:
        try:
            check_name(name, what)
        except InvalidName as err:
            raise SpecError("name", str(err)) from None


@dataclass(frozen=True)
class _SourceHead:
    spec: str
    name: Optional[str] = None


@dataclass(frozen=True)
class SinkSpec:
    """One ``[[sinks]]`` entry: its ``kind`` (``mqtt``, ``webhook``, a plugin's), ``name`` (None: the kind; the
    spool folder is ``OUT/spool/<name>``) and ``options`` of that kind."""

    kind: str
    name: Optional[str] = None
    options: Any = None

    def __post_init__(self) -> None:
        _check_part_name(self.name, "sink")  # its spool is the folder OUT/spool/<name>
        try:
            plugin = sink_plugin(self.kind, sink_plugins())
        except PluginError as err:
            raise SpecError("kind", str(err)) from None
        if self.options is None:
            raise SpecError("options", f"a {self.kind} sink needs its options ({plugin.options.__name__})")
        if not isinstance(self.options, plugin.options):
            raise SpecError("options", f"a {self.kind} sink takes {plugin.options.__name__}, got "
                                       f"{type(self.options).__name__}")

    @classmethod
    def from_table(cls, table: Any, key: str) -> "SinkSpec":
        if not isinstance(table, dict):
            raise SpecError(key, "expected a table with kind = ... (and name, options of its kind)")
        rest = dict(table)
        head = build(_SinkHead, {k: rest.pop(k) for k in ("kind", "name") if k in rest}, key)
        try:
            plugin = sink_plugin(head.kind, sink_plugins())
        except PluginError as err:
            raise SpecError(f"{key}.kind", str(err)) from None
        options = build(plugin.options, rest, key)
        try:
            return cls(kind=head.kind, name=head.name, options=options)
        except SpecError as err:
            raise err.at(key) from None

    def to_table(self) -> dict:
        return {"kind": self.kind, "name": self.name, **to_table(self.options)}


@dataclass(frozen=True)
class _SinkHead:
    kind: str
    name: Optional[str] = None


@dataclass(frozen=True)
class BatchingSpec:
    """``[batching]``: one Batcher per product over the shared engine."""

    max_batch: int = 8  # frames per engine call at most
    max_wait_ms: float = 10.0  # a batch closes when its oldest frame waited this long
    queue_size: int = 64  # frames waiting for the engine at most

    def __post_init__(self) -> None:
        for key, value in (("max_batch", self.max_batch), ("queue_size", self.queue_size)):
            if value < 1:
                raise SpecError(key, f"must be >= 1, got {value}")
        if not self.max_wait_ms >= 0 or not math.isfinite(self.max_wait_ms):
            raise SpecError("max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")


@dataclass(frozen=True)
class OutputsSpec:
    """``[outputs]``: the output folder (results.jsonl, maps/, overlays/, spool/, review/) and how it is kept."""

    out: str = ""
    save: str = "anomalous"  # maps + overlays for: anomalous results | all | none
    rotate_mb: float = 100.0  # results.jsonl is renamed to results.<n>.jsonl beyond this size
    spool_max: int = 10000  # messages a sink keeps on disk while it is down
    flush_timeout: float = 10.0  # at exit, seconds the sinks may take to deliver their spools
    status_every: float = 10.0  # seconds between status lines (0 = none)

    def __post_init__(self) -> None:
        if self.save not in SAVE_POLICIES:
            raise SpecError("save", f"must be one of {', '.join(SAVE_POLICIES)}, got {self.save!r}")
        if not self.rotate_mb > 0:
            raise SpecError("rotate_mb", f"must be > 0, got {self.rotate_mb}")
        if self.spool_max < 1:
            raise SpecError("spool_max", f"must be >= 1, got {self.spool_max}")
        for key, value in (("flush_timeout", self.flush_timeout), ("status_every", self.status_every)):
            if not value >= 0:
                raise SpecError(key, f"must be >= 0, got {value}")


@dataclass(frozen=True)
class HttpSpec:
    """``[http]``: the HTTP face (docs/service.md); no table, no HTTP face. ``token`` None: the environment
    variable WINCLIP_TOKEN (prefer it: a file or a flag is easier to read than a process's environment).
    ``token_file``: named tokens, one ``name:token`` per line (operators' verdicts record the name); the variable
    WINCLIP_TOKENS adds more."""

    listen: str = DEFAULT_LISTEN  # HOST:PORT ([::1]:PORT for IPv6; port 0 = any free port)
    token: Optional[str] = None
    token_file: Optional[str] = None
    insecure: bool = False  # allow a non-loopback listen without a token
    max_upload_mb: float = MAX_UPLOAD_MB
    request_timeout: float = RESULT_TIMEOUT_S  # seconds a request waits for its result before 504
    keep_results: int = KEEP_RESULTS  # newest results the review store keeps

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.listen)
        except Exception:
            raise SpecError("listen", f"expected HOST:PORT, e.g. {DEFAULT_LISTEN} or [::1]:{DEFAULT_PORT}, got "
                                      f"{self.listen!r}") from None

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


@dataclass(frozen=True)
class PartsSpec:
    """``[parts]``: how triggered parts are captured (docs/line.md, "Triggered parts"); the deadline is the
    station's ``deadline_ms``."""

    continuous: bool = True  # frames no part claims are inspected free-running; false: triggered parts only
    views: tuple[str, ...] = ()  # the sources (or "http") whose captures are a part's views; empty: every source
    max_pending: int = 64  # parts in flight at most; beyond, a trigger gets its fail-safe row at once (counted)
    capture_timeout_ms: Optional[float] = None  # a view not captured this long after the trigger fails its part;
    # absent: twice the deadline (without one, 10 s)
    remember: int = 10000  # decided part ids kept (in the journal too): a trigger for one of them is refused
    mqtt_trigger: bool = True  # with an MQTT sink: take triggers on winclip/<station>/trigger

    def __post_init__(self) -> None:
        for key, value in (("max_pending", self.max_pending), ("remember", self.remember)):
            if value < 1:
                raise SpecError(key, f"must be >= 1, got {value}")
        if self.capture_timeout_ms is not None and not (self.capture_timeout_ms > 0
                                                        and math.isfinite(self.capture_timeout_ms)):
            raise SpecError("capture_timeout_ms", f"must be > 0, got {self.capture_timeout_ms}")


@dataclass(frozen=True)
class OpcuaSpec:
    """``[opcua]``: the OPC UA face (OPC 40100-1 machine vision). User and password only from the environment
    (WINCLIP_OPCUA_USERNAME / WINCLIP_OPCUA_PASSWORD); a non-loopback listen needs them or trusted client
    certificates. ``certificate_dir`` None: ``OUT/opcua`` (a self-signed server certificate is made there once)."""

    listen: str = OPCUA_LISTEN
    certificate: Optional[str] = None
    private_key: Optional[str] = None
    certificate_dir: Optional[str] = None
    trusted_clients: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            parse_host_port(self.listen)
        except Exception:
            raise SpecError("listen", f"expected HOST:PORT, e.g. {OPCUA_LISTEN}, got {self.listen!r}") from None

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


@dataclass(frozen=True)
class DriftSpec:
    """``[drift]``: drift watched per product over the last ``window`` decisions and verdicts (winclip_edge/drift.py,
    docs/service.md "Drift"). Each statistic of ``watch`` raises an alert above its level and clears it below its
    ``_clear`` level (hysteresis); none is judged before ``min_samples`` observations."""

    window: int = 200
    min_samples: int = 30
    watch: tuple[str, ...] = STATISTICS
    false_alarm_rate: float = 0.10  # of reviewed goods, the share that was flagged
    false_alarm_rate_clear: float = 0.06
    ks: float = 0.30  # two-sample Kolmogorov-Smirnov statistic, recent scores vs the calibration's
    ks_clear: float = 0.20
    share_above: float = 0.20  # of recent scores, the share above the threshold
    share_above_clear: float = 0.12

    def __post_init__(self) -> None:
        for key, value in (("window", self.window), ("min_samples", self.min_samples)):
            if value < 1:
                raise SpecError(key, f"must be >= 1, got {value}")
        unknown = [w for w in self.watch if w not in STATISTICS]
        if unknown or len(set(self.watch)) != len(self.watch):
            raise SpecError("watch", f"must name each of {', '.join(STATISTICS)} at most once, got {list(self.watch)}")
        for name in STATISTICS:
            on, off = getattr(self, name), getattr(self, name + "_clear")
            if not 0 <= on <= 1:
                raise SpecError(name, f"must be in [0, 1], got {on}")
            if not 0 <= off <= on:
                raise SpecError(name + "_clear", f"must be in [0, {name}] = [0, {on}] (an alert clears below the "
                                                 f"level that raised it), got {off}")

    def limits(self) -> DriftLimits:
        return DriftLimits(**{name: Limit(getattr(self, name), getattr(self, name + "_clear")) if name in self.watch
                              else None for name in STATISTICS}, min_samples=self.min_samples)


@dataclass(frozen=True)
class StationSpec:
    """A whole station. Sources inspect the first product; the HTTP face serves all of them."""

    station: Optional[str] = None  # the name in every row; None: the host name
    bundle: str = ""
    products: tuple[str, ...] = ()
    sigma: float = 0.0  # Gaussian smoothing of the map, pixels
    engine: EngineSpec = EngineSpec()
    scoring: ScoringOptions = ScoringOptions()
    tiling: TilingOverrides = TilingOverrides()
    batching: BatchingSpec = BatchingSpec()
    outputs: OutputsSpec = OutputsSpec()
    sources: tuple[SourceSpec, ...] = ()
    sinks: tuple[SinkSpec, ...] = ()
    http: Optional[HttpSpec] = None
    deadline_ms: Optional[float] = None  # a triggered part's verdict is due this long after its trigger
    on_timeout: str = "reject"  # the fail-safe row at the deadline: reject | pass
    parts: PartsSpec = PartsSpec()
    opcua: Optional[OpcuaSpec] = None
    modbus: Optional[ModbusOptions] = None  # one PLC; more: [[sinks]] with kind = "modbus"
    drift: DriftSpec = DriftSpec()

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise SpecError("sigma", f"must be >= 0, got {self.sigma}")
        if self.deadline_ms is not None and not (self.deadline_ms > 0 and math.isfinite(self.deadline_ms)):
            raise SpecError("deadline_ms", f"must be > 0, got {self.deadline_ms}")
        if self.on_timeout not in ON_TIMEOUT:
            raise SpecError("on_timeout", f"must be one of {', '.join(ON_TIMEOUT)}, got {self.on_timeout!r}")
        try:
            if self.station is not None:
                check_name(self.station, "station")
        except InvalidName as err:
            raise SpecError("station", str(err)) from None
        for i, product in enumerate(self.products):
            try:
                check_name(product, "product")
            except InvalidName as err:
                raise SpecError(f"products[{i}]", str(err)) from None
        object.__setattr__(self, "sources", tuple(named_sources(self.sources)))
        object.__setattr__(self, "sinks", tuple(named_sinks(self.sinks)))
        names = {s.name for s in self.sources}
        unknown = [v for v in self.parts.views if v not in names and v != HTTP_VIEW]
        if unknown:
            raise SpecError("parts.views", f"{unknown[0]!r} is not a source of this station (sources: "
                                           f"{', '.join(sorted(names)) or 'none'}; or {HTTP_VIEW!r} for uploads)")
        if self.modbus is not None and any(s.name == "modbus" for s in self.sinks):
            raise SpecError("modbus", "a sink is named 'modbus' already (its spool would be the [modbus] one's)")

    def parts_config(self) -> PartsConfig:
        """The station's PartsConfig: the deadline and fail-safe with ``[parts]``."""
        p = self.parts
        return PartsConfig(deadline_ms=self.deadline_ms, on_timeout=self.on_timeout, views=p.views,
                           continuous=p.continuous, max_pending=p.max_pending,
                           capture_timeout_ms=p.capture_timeout_ms, remember=p.remember)

    @property
    def station_name(self) -> str:
        """``station``, else the host name's first label made a valid name (``Line-PC.plant.local`` ->
        ``Line-PC``; names.suggest_name)."""
        return self.station or default_station_name()

    def check(self) -> None:
        """Refuse a spec that names no station to run (every part is valid on its own already)."""
        if not self.bundle:
            raise SpecError("bundle", "missing: give --bundle or bundle = \"...\" in the station file")
        if not self.products:
            raise SpecError("products", "missing: give --product or products = [\"...\"] in the station file")
        if not self.outputs.out:
            raise SpecError("outputs.out", "missing: give --out or out = \"...\" under [outputs] in the station file")
        if not self.sources and self.http is None:
            raise SpecError("", "nothing to serve: give --source (repeatable) and/or --http HOST:PORT "
                                "([[sources]] / [http] in a station file)")


def default_station_name(hostname: str | None = None) -> str:
    """The station name when none is given: the host name's first label, made valid (names.suggest_name)."""
    import socket

    label = (socket.gethostname() if hostname is None else hostname).split(".")[0]
    return label if is_valid_name(label) else suggest_name(label)


def _unique(name: str, used: set[str]) -> str:
    base, n = name, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    used.add(name)
    return name


def named_sources(sources: tuple[SourceSpec, ...]) -> list[SourceSpec]:
    """Sources with a name each: the given one, else one made from the spec (``camera0``, the video's stem, the
    folder's name, ``<kind><position>``; never a URL's credentials; made valid with names.suggest_name), made
    unique with ``-2``, ``-3`` ..."""
    used, named = {s.name for s in sources if s.name}, []
    for i, source in enumerate(sources):
        if source.name:
            named.append(source)
            continue
        plugin, target = resolve_source(source.spec, source_plugins())
        name = plugin.default_name(target, i) if plugin.default_name else f"{plugin.kind}{i}"
        name = name if is_valid_name(name) else suggest_name(name)  # "/dev/video0", "my part.avi"
        named.append(replace(source, name=_unique(name, used)))
    names = [s.name for s in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError("sources", f"two sources are named {twice[0]!r}: give each its own name")
    return named


def named_sinks(sinks: tuple[SinkSpec, ...]) -> list[SinkSpec]:
    used, named = {s.name for s in sinks if s.name}, []
    for sink in sinks:
        named.append(sink if sink.name else replace(sink, name=_unique(sink.kind, used)))
    names = [s.name for s in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError("sinks", f"two sinks are named {twice[0]!r} (their spools would be one folder)")
    return named


# ---------------------------------------------------------------- the file
def _toml_loads(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the pyproject's tomli for older Pythons
        import tomli as tomllib
    return tomllib.loads(text)


def spec_from_table(table: dict, file: str | None = None) -> StationSpec:
    """The StationSpec of a parsed station file; SpecError naming the key (and ``file``)."""
    try:
        return from_table(StationSpec, table, "")
    except SpecError as err:
        raise err.in_file(file) if file else err


def load_spec(path: str | os.PathLike) -> StationSpec:
    """Read a station file (TOML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("", "no such station file", str(path)) from None
    except UnicodeDecodeError as err:
        raise SpecError("", f"not UTF-8 text ({err})", str(path)) from None
    try:
        table = _toml_loads(text)
    except ValueError as err:  # tomllib.TOMLDecodeError
        raise SpecError("", f"not TOML: {err}", str(path)) from None
    return spec_from_table(table, str(path))


HEADER = ("# A winclip-edge station: `winclip-edge serve --config FILE` (flags given too override it).\n"
          "# Every key is described in docs/line.md, \"The station file\".\n")


def dump_spec(spec: StationSpec) -> str:
    """The station file of ``spec``: ``load_spec`` of it gives ``spec`` back."""
    return HEADER + dumps_toml(to_table(spec))


# A small TOML writer for this one shape (scalars, tables, arrays of tables and their sub-tables; deeper tables
# inline): the file is written for people to edit, so every [[sources]] / [[sinks]] entry (and a camera's
# features) is a section of its own (tomli-w puts short ones inline), and printing a station needs no extra package. tests/test_station_spec.py round-trips it through
# the standard library's TOML reader on generated strings and numbers.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dumps_toml(table: dict) -> str:
    """TOML of ``table``: its plain values, then each sub-table as ``[key]`` and each array of tables as
    ``[[key]]`` entries; a table inside one of those (a camera's features) follows it as ``[key.sub]``, deeper
    values are written inline."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    for key, value in table.items():
        entries = [value] if isinstance(value, dict) else value if _is_table_array(value) else []
        header = f"[{_toml_key(key)}]" if isinstance(value, dict) else f"[[{_toml_key(key)}]]"
        for entry in entries:
            lines += ["", header] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items()
                                     if not isinstance(v, dict)]
            for sub, inner in entry.items():
                if isinstance(inner, dict):
                    lines += ["", f"[{_toml_key(key)}.{_toml_key(sub)}]"]
                    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in inner.items()]
    return "\n".join(lines) + "\n"
