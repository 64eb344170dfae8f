"""A station wired from its spec (spec.py): everything that can be refused is checked before the engine loads,
then the OPC UA face starts (the line sees Preoperational while the engine loads), the catalog (one engine, one
Inspector per product), one batcher per product, the sources and sinks of their registries (registry.py) and the
station; the HTTP face and the MQTT trigger topic start when it runs. ``serve`` only maps its flags onto the spec
and handles the signals.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from ..bundle import Bundle
from ..catalog import Catalog
from ..engines.config import AUTO
from ..tiles.overrides import resolve_tiling
from .alerts import mqtt_alert_sinks
from ..batcher import Batcher
from .controller import StationController
from .drift_watch import DriftWatch
from .health import EngineWatch, watch
from .plugins import SinkContext
from .registry import check_requirements, resolve_source, sink_plugin, sink_plugins, source_plugins
from .spec import HttpSpec, OpcuaSpec, SinkSpec, StationSpec, engine_config
from .station import SPOOL, Station, StationConfig

log = logging.getLogger("winclip_edge.line")

TOKEN_ENV = "WINCLIP_TOKEN"
TOKENS_ENV = "WINCLIP_TOKENS"  # named tokens (service/auth.py)
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")
PLC_MODULES = ("asyncua",)
OPCUA_FOLDER = "opcua"  # OUT/opcua: the self-signed server certificate, made once
PROBE_S = 2.0  # a failed engine is tried with one small call this often while nothing else runs


def http_config(spec: HttpSpec, environ: Mapping[str, str] = os.environ) -> Any:
    """The HttpConfig of ``[http]`` (the token from WINCLIP_TOKEN when the spec has none; named tokens from
    ``token_file`` and WINCLIP_TOKENS), checked: an unsafe bind, an unreadable token file or a missing serve extra is
    refused here, before the engine loads."""
    from ..service import HttpConfig, ServiceError
    from ..service.auth import DEFAULT_NAME, load_token_file, tokens_from_env

    host, port = spec.host_port
    token = spec.token if spec.token is not None else environ.get(TOKEN_ENV) or None
    tokens = (load_token_file(spec.token_file) if spec.token_file else ()) + tokens_from_env(dict(environ))
    names = [t.name for t in tokens] + ([DEFAULT_NAME] if token is not None else [])
    secrets = [t.token for t in tokens] + ([token] if token is not None else [])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ServiceError(f"the token name {twice[0]!r} is given twice (token file, {TOKENS_ENV}, and "
                           f"{TOKEN_ENV} = {DEFAULT_NAME!r}): give every name once")
    if len(set(secrets)) != len(secrets):
        raise ServiceError("two token names share one token (token file, WINCLIP_TOKENS, WINCLIP_TOKEN): give every "
                           "name its own token, so that a verdict names one person")
    config = HttpConfig(host=host, port=port, token=token, tokens=tokens, insecure=spec.insecure,
                        max_upload_mb=spec.max_upload_mb, keep_results=spec.keep_results,
                        result_timeout_s=spec.request_timeout)
    config.check()
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServiceError(f"--http needs the serve extra ({', '.join(missing)} missing): "
                           "pip install \"winclip-edge[serve]\"")
    return config


def opcua_config(spec: OpcuaSpec, out: str) -> Any:
    """The OpcuaConfig of ``[opcua]`` (user and password from the environment), checked: an unsafe bind or a missing
    plc extra is refused here, before the engine loads."""
    from .opcua import OpcuaConfig, OpcuaError

    host, port = spec.host_port
    config = OpcuaConfig.from_env(host=host, port=port, certificate=spec.certificate, private_key=spec.private_key,
                                  certificate_dir=spec.certificate_dir or str(Path(out).resolve() / OPCUA_FOLDER),
                                  trusted_clients=tuple(spec.trusted_clients))
    config.check()
    missing = [m for m in PLC_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise OpcuaError(f"--opcua needs the plc extra ({', '.join(missing)} missing): pip install \"winclip-edge[plc]\"")
    return config


class LineStation:
    """A wired station: :meth:`run` until ``stop`` is set (or its finite sources ended), then everything is closed.

    ``drift`` watches every product's decisions (sources and HTTP) and verdicts; a face that shows alerts (the OPC UA
    server, a plugin) appends a callable to ``drift.on_alert`` before :meth:`run`. Every MQTT sink also publishes
    them (line/alerts.py)."""

    def __init__(self, spec: StationSpec, catalog: Catalog, batchers: dict[str, Batcher], station: Station,
                 http: Any, controller: StationController | None = None, opcua: Any = None,
                 triggers: Any = None, engine_watch: EngineWatch | None = None):
        self.spec, self.catalog, self.batchers, self.station, self.http = spec, catalog, batchers, station, http
        self.controller = controller or StationController()
        self.controller.attach(self)
        self.opcua, self.triggers, self.watch = opcua, triggers, engine_watch
        self.drift = DriftWatch(catalog, spec.drift.window, spec.drift.limits(), station.config.station)
        self.station.on_row.append(self.drift.observe)
        self.service: Any = None
        self.alert_sinks: list[Any] = []
        self._closed = False
        self._done = threading.Event()
        if opcua is not None:
            station.on_row.append(opcua.publish)  # one result event per row, in the order written

    def _decided(self, row: dict) -> None:
        """An HTTP decision: counted with the sources' and watched for drift."""
        self.station.count(row)
        self.drift.observe(row)

    def start_line(self) -> str:
        """What runs, in one line: every product served, the engine, the sources (and what they inspect), the sinks."""
        catalog, station = self.catalog, self.station
        products = ", ".join(f"{p} ({catalog.get(p).mode})" for p in catalog.products)
        sources = ", ".join(f"{s.name} ({s.kind})" for s in station.sources)
        parts = self.spec.parts_config()
        faces = "".join(part for part, on in (
            ("; HTTP serves every product", self.http is not None),
            (f"; OPC UA on {self.opcua.endpoint if self.opcua is not None else ''}", self.opcua is not None),
            (f"; MQTT triggers on {self.triggers.topic if self.triggers is not None else ''}",
             self.triggers is not None)) if on)
        deadline = f"deadline {parts.deadline_ms:g} ms (on timeout {parts.on_timeout})" if parts.deadline_ms else \
            "no deadline"
        named = "" if self.spec.station is not None else " (named after the host: --station or station = \"...\" to choose)"
        return (f"station {station.config.station}{named}: products {products} on {catalog.engine.name} "
                f"({catalog.engine.device}); sources {sources + ' -> ' + catalog.products[0] if sources else 'none'}; "
                f"sinks {', '.join(s.name for s in station.sinks) or 'none'}; parts: views "
                f"{', '.join(station.views)}, {deadline}, "
                f"{'free-running between parts' if station.continuous else 'triggered only'}" + faces)

    def probe(self) -> None:
        """One small engine call (a failed engine that works again takes the station out of Error)."""
        try:
            self.catalog.warm_up(1)
        except Exception as err:
            log.warning("engine probe failed: %s: %s", type(err).__name__, err)

    def _health(self) -> None:
        while not self._done.wait(0.5):
            w = self.watch
            if w is not None and w.failure is not None and time.monotonic() - w.last_call >= PROBE_S:
                self.probe()

    def run(self, stop: threading.Event) -> None:
        try:
            outputs = self.spec.outputs
            self.alert_sinks = mqtt_alert_sinks(self.spec.sinks, SinkContext(self.station.config.station,
                                                                             tuple(self.spec.products)),
                                                self.station.out / SPOOL, outputs.spool_max)
            for sink in self.alert_sinks:
                self.drift.on_alert.append(lambda alert, sink=sink: sink.put(alert))
            if self.http is not None:
                from ..service import start_http

                self.service = start_http(self.http, self.catalog, self.batchers, self.station.out,
                                          station=self.station.config.station, station_stats=self.station.stats,
                                          on_decision=self._decided, drift=self.drift)
                service = self.service
                service.context.trigger = self.controller.trigger
                service.context.upload_part = self.station.upload
                self.station.overlay_base = service.url
                self.station.on_result.append(lambda result, product, row: service.record(result, row))
                log.info("HTTP on %s", self.service.url)
            log.info("%s", self.start_line())
            if self.service is not None or self.opcua is not None:
                self.catalog.warm_up(self.spec.batching.max_batch)  # memory at its working level before /readyz
            self.station.recover()  # the parts an earlier run left, before any new trigger
            if self.triggers is not None:
                self.triggers.start()
            self.controller.running()  # triggers are taken from now on: /readyz says so only after this
            if self.service is not None:
                self.service.set_ready()
            threading.Thread(target=self._health, name="winclip-health", daemon=True).start()
            self.station.run(stop)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._done.set()
        self.controller.stopping()
        if self.triggers is not None:
            self.triggers.stop()
        if self.service is not None:
            self.service.stop()
        for batcher in self.batchers.values():
            batcher.close(drain=True)
        for sink in self.alert_sinks:
            sink.close(self.spec.outputs.flush_timeout)
        self.catalog.close()
        if self.opcua is not None:
            self.opcua.stop()


def _mqtt_trigger_config(spec: StationSpec, name: str) -> Any:
    """The MQTT settings of the trigger subscriber: the first MQTT sink's (None: no MQTT sink, or turned off)."""
    if not spec.parts.mqtt_trigger:
        return None
    mqtt = next((s for s in spec.sinks if s.kind == "mqtt"), None)
    if mqtt is None:
        return None
    from .mqtt_trigger import trigger_topic

    trigger_topic(name)  # a station name that cannot be a topic level is refused here
    return mqtt.options.config(SinkContext(station=name, products=tuple(spec.products)))


def build_station(spec: StationSpec) -> LineStation:
    """Check ``spec``, load the engine and wire the station (nothing runs yet; see :meth:`LineStation.run`)."""
    spec.check()
    http = http_config(spec.http) if spec.http is not None else None
    outputs = spec.outputs
    opcua = opcua_config(spec.opcua, outputs.out) if spec.opcua is not None else None
    name = spec.station_name
    config = StationConfig(station=name, save=outputs.save, rotate_mb=outputs.rotate_mb,
                           status_every_s=outputs.status_every, flush_timeout_s=outputs.flush_timeout,
                           spool_max=outputs.spool_max, keep_running=http is not None or opcua is not None,
                           parts=spec.parts_config())
    sources_known, sinks_known = source_plugins(), sink_plugins()
    resolved = [(s, *resolve_source(s.spec, sources_known)) for s in spec.sources]
    for s, plugin, _ in resolved:
        check_requirements(f"a {plugin.kind} source ({s.name})", plugin.requires, plugin.install)
    sink_specs = list(spec.sinks) + ([SinkSpec("modbus", "modbus", spec.modbus)] if spec.modbus is not None else [])
    sink_kinds = [(s, sink_plugin(s.kind, sinks_known)) for s in sink_specs]
    for s, plugin in sink_kinds:
        check_requirements(f"the {s.kind} sink {s.name}", plugin.requires, plugin.install)
    trigger_mqtt = _mqtt_trigger_config(spec, name)
    sources = []
    for s, plugin, target in resolved:
        source = plugin.create(s.name, target, s.options)
        source.check()
        sources.append(source)
    context = SinkContext(station=name, products=tuple(spec.products), out=outputs.out)
    sinks = [plugin.create(s.name, s.options, context) for s, plugin in sink_kinds]  # connected once it runs
    controller = StationController()
    face = None
    if opcua is not None:
        from .opcua import start_opcua

        face = start_opcua(opcua, controller)  # Preoperational while the engine loads
    try:
        bundle = Bundle(spec.bundle)  # opened and verified once, for the catalog and the tiling overrides
        catalog = Catalog(bundle, list(spec.products), engine=engine_config(spec.engine), options=spec.scoring,
                          sigma=spec.sigma, settings=lambda product: resolve_tiling(bundle, product, spec.tiling))
    except BaseException:
        if face is not None:
            face.stop()
        raise
    if spec.engine.backend == AUTO:
        log.info("engine: %s", catalog.selection.reason)
    engine_watch = watch(catalog.engine)  # inside the one engine lock: every caller's calls count
    batchers: dict[str, Batcher] = {}
    try:
        b = spec.batching
        batchers.update({p: Batcher(catalog.get(p), b.max_batch, b.max_wait_ms, b.queue_size) for p in catalog.products})
        station = Station(config, Path(outputs.out), batchers[catalog.products[0]], sources, sinks, batchers=batchers)
        triggers = None
        if trigger_mqtt is not None:
            from .mqtt_trigger import MqttTriggers

            triggers = MqttTriggers(trigger_mqtt, name, controller.trigger)
    except BaseException:
        for batcher in batchers.values():
            batcher.close(drain=False)
        catalog.close()
        if face is not None:
            face.stop()
        raise
    return LineStation(spec, catalog, batchers, station, http, controller=controller, opcua=face, triggers=triggers,
                       engine_watch=engine_watch)
