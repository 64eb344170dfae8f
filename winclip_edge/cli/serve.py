"""``winclip-edge serve``: the long-running line station (docs/line.md), optionally with its HTTP face (docs/service.md).

The station is a :class:`~winclip_edge.line.spec.StationSpec`: read from ``--config FILE`` (a TOML station file)
or empty, with every flag actually given laid over it; ``--print-config`` prints that spec as a station file
and exits. The library wires and runs it (``line.build_station``); this module only maps flags onto the spec
and turns signals into a stop.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import fields, replace
from typing import Any

from .commands import Commands
from .. import inputs
from ..line.build import build_station
from ..line.modbus import ModbusOptions
from ..line.parts import ON_TIMEOUT
from ..line.registry import resolve_source, source_plugins
from ..line.sinks import MqttOptions, WebhookOptions
from ..line.sources import DROP_POLICIES
from ..drift import STATISTICS
from ..line.spec import (
    DriftSpec,
    EngineSpec,
    HttpSpec,
    OpcuaSpec,
    PartsSpec,
    SinkSpec,
    SourceSpec,
    StationSpec,
    dump_spec,
    load_spec,
)
from ..line.station import SAVE_POLICIES
from ..line.typed import SpecError
from ..tiles.overrides import TilingOverrides
from ..engines.config import AUTO
from ..engines.registry import owner_of
from .common import EXIT_OK, CliError, add_engine_options, add_scoring_options, engine_config, engine_flags
from .serve_http import add_drift_options, add_http_options, parse_host_port
from .tiling_options import add_tiling_options

# Flags that set one option of every source whose kind has an option of that name (VideoOptions, FolderOptions, ...).
SOURCE_OPTION_FLAGS = ("drop", "buffer", "fps_limit", "every_nth", "loop", "reconnect_max_s", "settle_s",
                       "ignore_existing")
NOT_FLAGS = ("run", "command", "command_line", "config", "print_config")
# Spec keys whose flag is not "--" + the key's last part with - for _ (for error messages about flags).
FLAG_OF_KEY = {"products": "--product", "scoring.use_memory": "--zero-shot", "http.listen": "--http", "spec": "--source",
               "name": "--source", "opcua.listen": "--opcua", "parts.views": "--view", "parts.max_pending": "--max-parts",
               "parts.continuous": "--triggered", "modbus.host": "--modbus", "modbus.port": "--modbus",
               **{f"drift.{key}{clear}": f"--drift-{key.replace('_', '-')}"
                  for key in ("window", "min_samples", *STATISTICS) for clear in ("", "_clear")}}


def register(sub: Commands) -> None:
    p = sub.add_parser("serve", help="run a line station: cameras, videos, streams, hot folders -> results.jsonl, "
                                     "MQTT, webhooks (and an HTTP API with --http)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a station file (TOML, docs/line.md); flags given too override what it says")
    p.add_argument("--print-config", action="store_true",
                   help="print the station file of this command line (and --config) and exit without starting")
    p.add_argument("--bundle", help="bundle folder made by `winclip-edge export` (required, here or in --config)")
    p.add_argument("--product", action="append",
                   help="product inside the bundle; repeatable (the sources inspect the first one; the HTTP face serves all)")
    add_engine_options(p)
    add_scoring_options(p)
    add_tiling_options(p)
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the map, pixels (default off)")
    p.add_argument("--out", help="output folder: results.jsonl, maps/, overlays/, spool/ (required, here or in --config)")
    p.add_argument("--station", help="station name in every row (default: host name)")

    s = p.add_argument_group("sources (docs/line.md)")
    s.add_argument("--source", action="append", default=[], metavar="[NAME=]SRC",
                   help="repeatable: camera index (0), video file, rtsp:// or http:// URL, gst:<pipeline ending in "
                        "appsink>, folder:DIR (hot folder), or a plugin's PREFIX:...; replaces the sources of --config")
    s.add_argument("--drop", choices=DROP_POLICIES, default="oldest",
                   help="cameras/streams when the engine falls behind: drop the oldest frames (default) or wait; "
                        "video files and folders never drop")
    s.add_argument("--buffer", type=int, default=8, help="frames buffered per source (default 8)")
    s.add_argument("--fps-limit", type=float, default=0.0,
                   help="at most this many frames/s per source: live sources skip, video files are paced (default: all)")
    s.add_argument("--every-nth", type=int, default=1, help="inspect every n-th captured frame (default 1)")
    s.add_argument("--loop", action="store_true", help="start video files again when they end (else the run ends)")
    s.add_argument("--reconnect-max-s", type=float, default=30.0,
                   help="longest back-off between reconnects of a dropped stream (default 30; starts at 0.5, doubles)")
    s.add_argument("--settle-s", type=float, default=1.0,
                   help="hot folder: a file is complete when its size stayed the same this long (moved-in files at once)")
    s.add_argument("--ignore-existing", action="store_true", help="hot folder: skip files already there at start")

    b = p.add_argument_group("batching")
    b.add_argument("--max-batch", type=int, default=8, help="frames per engine call at most (default 8)")
    b.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="a batch closes when its oldest frame waited this long (default 10)")
    b.add_argument("--queue-size", type=int, default=64, help="frames waiting for the engine at most (default 64)")

    o = p.add_argument_group("results and sinks")
    o.add_argument("--save", choices=SAVE_POLICIES, default="anomalous", help="maps + overlays for (default anomalous)")
    o.add_argument("--rotate-mb", type=float, default=100.0, help="rotate results.jsonl at this size (default 100)")
    o.add_argument("--mqtt", metavar="HOST:PORT", default=None, help="publish every decision (QoS 1) to this broker")
    o.add_argument("--mqtt-topic", default=None, help="default winclip/<station>/<product>/result")
    o.add_argument("--mqtt-tls", action="store_true", help="TLS to the broker (user/password: env WINCLIP_MQTT_USERNAME/"
                                                            "WINCLIP_MQTT_PASSWORD)")
    o.add_argument("--mqtt-ca", default=None, help="CA bundle (PEM) for --mqtt-tls (default: the system's)")
    o.add_argument("--webhook", default=None, metavar="URL", help="POST every decision as JSON to this URL")
    o.add_argument("--spool-max", type=int, default=10000,
                   help="decisions a sink keeps on disk while it is down (default 10000; beyond: counted, logged)")
    o.add_argument("--flush-timeout", type=float, default=10.0,
                   help="at exit, seconds the sinks may take to deliver what is spooled (the rest waits on disk)")
    o.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines (0 = none)")
    add_http_options(p)
    add_drift_options(p)

    t = p.add_argument_group("triggered parts and the line controller (docs/line.md)")
    t.add_argument("--deadline-ms", type=float, default=None,
                   help="a triggered part's verdict is due this long after its trigger; at the deadline without one a "
                        "fail-safe row (decision \"timeout\") is published (default: no deadline)")
    t.add_argument("--on-timeout", choices=ON_TIMEOUT, default="reject",
                   help="what the fail-safe row tells the line (default reject)")
    t.add_argument("--triggered", action="store_true",
                   help="inspect triggered parts only: frames no part claims are dropped (counted); a hot-folder file "
                        "is its own part (default: free-running between parts)")
    t.add_argument("--view", action="append", metavar="NAME",
                   help="repeatable: a source (or 'http') whose capture is one of a part's views (default: every source)")
    t.add_argument("--max-parts", type=int, default=64,
                   help="parts in flight at most; a trigger beyond gets its fail-safe row at once (default 64)")
    t.add_argument("--opcua", metavar="HOST:PORT", default=None,
                   help="serve OPC UA (OPC 40100-1 machine vision) here; beyond loopback only with "
                        "WINCLIP_OPCUA_USERNAME/WINCLIP_OPCUA_PASSWORD (Basic256Sha256); needs the plc extra")
    t.add_argument("--modbus", metavar="HOST:PORT", default=None,
                   help="write every verdict to this PLC (Modbus TCP, port 502 if left out; docs/line.md has the "
                        "register map); needs the plc extra")
    # The defaults above are for --help; a flag not given leaves no value, so only the flags given override the
    # station file (the spec's dataclasses hold the same defaults).
    for action in p._actions:
        action.default = argparse.SUPPRESS
    p.set_defaults(run=run_serve)


# ---------------------------------------------------------------- flags -> spec
def _flag_message(err: SpecError) -> str:
    last = err.key.rsplit(".", 1)[-1].split("[")[0]
    flag = FLAG_OF_KEY.get(err.key) or FLAG_OF_KEY.get(last) or "--" + last.replace("_", "-")
    return f"{flag} {err.problem}"


def _replace(obj: Any, where: str, **changes: Any) -> Any:
    """``replace(obj, **changes)`` for flags: a refused value is a CliError naming the flag."""
    if not changes:
        return obj
    try:
        return replace(obj, **changes)
    except SpecError as err:
        raise CliError(_flag_message(err.at(where))) from None


def _named_sources(texts: list[str]) -> list[tuple[str | None, str]]:
    """(name, spec) per --source: NAME=SRC (a repeated NAME gets -2, -3 ...), else (None, SRC): the spec names it
    (line/spec.py named_sources)."""
    named, used = [], set()
    for text in texts:
        head, sep, tail = text.partition("=")
        if sep and head.replace("-", "").replace("_", "").isalnum() and not head.isdigit():
            name, n = head, 1
            while name in used:
                n += 1
                name = f"{head}-{n}"
            used.add(name)
            named.append((name, tail))
        else:
            named.append((None, text))
    return named


def _source_options(options: Any, given: dict[str, Any]) -> Any:
    """``options`` with the source flags given that this kind has."""
    own = {f.name for f in fields(options)}
    return replace(options, **{k: given[k] for k in SOURCE_OPTION_FLAGS if k in given and k in own})


def _sources(base: tuple[SourceSpec, ...], given: dict[str, Any]) -> tuple[SourceSpec, ...]:
    if "source" in given:
        plugins = source_plugins()
        return tuple(SourceSpec(spec, name, _source_options(resolve_source(spec, plugins)[0].options(), given))
                     for name, spec in _named_sources(given["source"]))
    return tuple(replace(s, options=_source_options(s.options, given)) for s in base)


def _sinks(base: tuple[SinkSpec, ...], given: dict[str, Any]) -> tuple[SinkSpec, ...]:
    """The file's sinks with the sink flags given: ``--mqtt`` / ``--webhook`` set the address of the file's sinks of
    that kind (the rest of their settings stays), or add one; ``--mqtt-topic/-tls/-ca`` set those of every MQTT sink."""
    mqtt = {key: given[flag] for flag, key in (("mqtt_topic", "topic"), ("mqtt_tls", "tls"), ("mqtt_ca", "ca_file"))
            if flag in given}

    def mqtt_address(tls: bool) -> dict:
        if "mqtt" not in given:
            return {}
        host, port = inputs.parse_host_port(given["mqtt"], 8883 if tls else 1883)
        return {"host": host, "port": port}

    sinks = [replace(s, options=replace(s.options, **mqtt, **mqtt_address(mqtt.get("tls", s.options.tls))))
             if s.kind == "mqtt" else s for s in base]
    if "mqtt" in given and not any(s.kind == "mqtt" for s in base):
        sinks.append(SinkSpec("mqtt", None, MqttOptions(**mqtt_address(mqtt.get("tls", False)), **mqtt)))
    if "webhook" in given:
        sinks = [replace(s, options=replace(s.options, url=given["webhook"])) if s.kind == "webhook" else s
                 for s in sinks]
        if not any(s.kind == "webhook" for s in base):
            sinks.append(SinkSpec("webhook", None, WebhookOptions(given["webhook"])))
    return tuple(sinks)


def _http(base: HttpSpec | None, given: dict[str, Any]) -> HttpSpec | None:
    http = base
    if "http" in given:
        parse_host_port(given["http"])  # the flag's own message
        http = _replace(http or HttpSpec(), "http", listen=given["http"])
    changes = {k: given[k] for k in ("token", "token_file", "insecure", "max_upload_mb", "request_timeout",
                                     "keep_results") if k in given}
    if http is None:
        if {"token", "token_file", "insecure"} & set(changes):
            raise CliError("--token/--token-file/--insecure need --http HOST:PORT")
        return None  # the other HTTP flags without an HTTP face change nothing
    return _replace(http, "http", **changes)


def _opcua(base: OpcuaSpec | None, given: dict[str, Any]) -> OpcuaSpec | None:
    if "opcua" not in given:
        return base
    try:
        inputs.parse_host_port(given["opcua"])
    except Exception:
        raise CliError(f"--opcua {given['opcua']!r}: expected HOST:PORT, e.g. 127.0.0.1:4840") from None
    return _replace(base or OpcuaSpec(), "opcua", listen=given["opcua"])


def _modbus(base: ModbusOptions | None, given: dict[str, Any]) -> ModbusOptions | None:
    if "modbus" not in given:
        return base
    try:
        host, port = inputs.parse_host_port(given["modbus"], 502)
    except Exception:
        raise CliError(f"--modbus {given['modbus']!r}: expected HOST:PORT, e.g. 192.168.0.10:502") from None
    return _replace(base, "modbus", host=host, port=port) if base is not None else ModbusOptions(host=host, port=port)


def _parts(base: PartsSpec, given: dict[str, Any]) -> PartsSpec:
    changes: dict[str, Any] = {}
    if given.get("triggered"):
        changes["continuous"] = False
    if "view" in given:
        changes["views"] = tuple(given["view"])
    if "max_parts" in given:
        changes["max_pending"] = given["max_parts"]
    return _replace(base, "parts", **changes)


def _drift(base: DriftSpec, given: dict[str, Any]) -> DriftSpec:
    """The file's ``[drift]`` with the --drift-* flags given: a limit flag sets its statistic's two levels, or with
    ``none`` takes it off the watch list."""
    changes = {key: given["drift_" + key] for key in ("window", "min_samples") if "drift_" + key in given}
    watch = list(base.watch)
    for name in STATISTICS:
        if "drift_" + name not in given:
            continue
        limit = given["drift_" + name]
        if limit is None:
            watch = [w for w in watch if w != name]
        else:
            changes.update({name: limit[0], name + "_clear": limit[1]})
            watch = watch if name in watch else [*watch, name]
    return _replace(base, "drift", **changes, **({"watch": tuple(watch)} if watch != list(base.watch) else {}))


def _engine(base: EngineSpec, given: dict[str, Any]) -> EngineSpec:
    """The file's ``[engine]`` with the engine flags given laid over it, checked as every command checks them (a
    flag the backend does not take is refused by name)."""
    flags = engine_flags()
    if not any(k in given for k in ("backend", "precision", *(f.dest for f in flags))):
        return base
    args = argparse.Namespace(backend=given.get("backend", base.backend), precision=given.get("precision", base.precision),
                              **{f.dest: given.get(f.dest) for f in flags})
    flagged = engine_config(args)
    common = {name: getattr(flagged, name) if name in given else getattr(base, name)
              for name in ("threads", "device")}
    engine_dir = str(flagged.engine_dir) if "engine_dir" in given else base.engine_dir
    options = base.options
    if flagged.options is not None:
        own = {f.name: getattr(flagged.options, f.name) for f in fields(flagged.options)
               if any(owner_field == f.name and flag.dest in given for flag in flags for _, owner_field in flag.owners)}
        options = replace(options, **own) if type(options) is type(flagged.options) else flagged.options
    elif options is not None and flagged.backend != AUTO and owner_of(options).name != flagged.backend:
        raise CliError(f"--backend {flagged.backend}: the station file's [engine] options are the "
                       f"{owner_of(options).name} backend's ({type(options).__name__}); remove them there")
    try:
        return EngineSpec(backend=flagged.backend, precision=flagged.precision, engine_dir=engine_dir, options=options,
                          **common)
    except SpecError as err:
        raise CliError(_flag_message(err.at("engine"))) from None


def spec_of(given: dict[str, Any], base: StationSpec | None = None) -> StationSpec:
    """``base`` (a station file, or the defaults) with the flags ``given`` (flag dest -> value) laid over it."""
    base = StationSpec() if base is None else base
    top = {"station": given.get("station"), "bundle": given.get("bundle"), "sigma": given.get("sigma"),
           "products": tuple(given["product"]) if "product" in given else None,
           "deadline_ms": given.get("deadline_ms"), "on_timeout": given.get("on_timeout")}
    scoring = {"temperature": given.get("temperature"), "scales": given.get("use_scales"), "mean": given.get("mean"),
               "use_image_scale": False if given.get("no_image_scale") else None,
               "use_memory": False if given.get("zero_shot") else None}
    tiling = {f.name: given[f.name] for f in fields(TilingOverrides) if f.name in given}
    batching = {k: given[k] for k in ("max_batch", "max_wait_ms", "queue_size") if k in given}
    outputs = {k: given[k] for k in ("out", "save", "rotate_mb", "spool_max", "flush_timeout", "status_every")
               if k in given}
    try:
        parts = dict(
            engine=_engine(base.engine, given),
            scoring=replace(base.scoring, **{k: v for k, v in scoring.items() if v is not None}),
            tiling=_replace(base.tiling, "tiling", **tiling),
            batching=_replace(base.batching, "batching", **batching),
            outputs=_replace(base.outputs, "outputs", **outputs),
            sources=_sources(base.sources, given), sinks=_sinks(base.sinks, given), http=_http(base.http, given),
            parts=_parts(base.parts, given), opcua=_opcua(base.opcua, given), modbus=_modbus(base.modbus, given),
            drift=_drift(base.drift, given))
        return _replace(base, "", **{k: v for k, v in top.items() if v is not None}, **parts)
    except SpecError as err:  # a value that is refused with the others, e.g. two sources of one name
        raise CliError(_flag_message(err)) from None


# ---------------------------------------------------------------- running
def _log_to_stderr() -> None:
    logger = logging.getLogger("winclip_edge.line")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[serve] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _misnamed_hint(given: dict[str, Any]) -> None:
    """A --product that is a bundle folder made before the name rule: say which command makes it usable."""
    from ..bundle import Bundle, misnamed_message
    from ..names import is_valid_name

    for product in given.get("product", ()):
        if not is_valid_name(product) and "bundle" in given:
            bundle = Bundle(given["bundle"], verify=False)
            if product in bundle.misnamed_products():
                raise CliError(misnamed_message(bundle, product))


def run_serve(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k not in NOT_FLAGS}
    _misnamed_hint(given)
    config = getattr(args, "config", None)
    spec = spec_of(given, load_spec(config) if config else StationSpec())
    try:
        spec.check()
    except SpecError as err:
        raise CliError(str(err)) from None
    if getattr(args, "print_config", False):
        sys.stdout.write(dump_spec(spec))
        return EXIT_OK
    _log_to_stderr()
    station = build_station(spec)  # everything that can be refused is, before the engine loads
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        station.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


__all__ = ["register", "run_serve", "spec_of"]
