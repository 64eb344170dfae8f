"""A station wired from its spec (spec.py): everything that can be refused is checked before the engine loads,
then the catalog (one engine, one Inspector per product), one batcher per product, the sources and sinks of
their registries (registry.py) and the station; the HTTP face starts when it runs. ``serve`` only maps its
flags onto the spec and handles the signals.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping

from ..bundle import Bundle
from ..catalog import Catalog
from ..engines.config import AUTO
from ..tiles.overrides import resolve_tiling
from .alerts import mqtt_alert_sinks
from .batcher import Batcher
from .drift_watch import DriftWatch
from .plugins import SinkContext
from .registry import check_requirements, resolve_source, sink_plugin, sink_plugins, source_plugins
from .spec import HttpSpec, StationSpec, engine_config
from .station import SPOOL, Station, StationConfig

log = logging.getLogger("winclip_edge.line")

TOKEN_ENV = "WINCLIP_TOKEN"
TOKENS_ENV = "WINCLIP_TOKENS"  # named tokens (service/auth.py)
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


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


class LineStation:
    """A wired station: :meth:`run` until ``stop`` is set (or its finite sources ended), then everything is closed.

    ``drift`` watches every product's decisions (sources and HTTP) and verdicts; a face that shows alerts (the OPC UA
    server, a plugin) appends a callable to ``drift.on_alert`` before :meth:`run`. Every MQTT sink also publishes
    them (line/alerts.py)."""

    def __init__(self, spec: StationSpec, catalog: Catalog, batchers: dict[str, Batcher], station: Station,
                 http: Any):
        self.spec, self.catalog, self.batchers, self.station, self.http = spec, catalog, batchers, station, http
        self.drift = DriftWatch(catalog, spec.drift.window, spec.drift.limits(), station.config.station)
        self.station.on_row.append(self.drift.observe)
        self.service: Any = None
        self.alert_sinks: list[Any] = []
        self._closed = False

    def _decided(self, row: dict) -> None:
        """An HTTP decision: counted with the sources' and watched for drift."""
        self.station.count(row)
        self.drift.observe(row)

    def start_line(self) -> str:
        """What runs, in one line: every product served, the engine, the sources (and what they inspect), the sinks."""
        catalog, station = self.catalog, self.station
        products = ", ".join(f"{p} ({catalog.get(p).mode})" for p in catalog.products)
        sources = ", ".join(f"{s.name} ({s.kind})" for s in station.sources)
        named = "" if self.spec.station is not None else " (named after the host: --station or station = \"...\" to choose)"
        return (f"station {station.config.station}{named}: products {products} on {catalog.engine.name} "
                f"({catalog.engine.device}); sources {sources + ' -> ' + catalog.products[0] if sources else 'none'}; "
                f"sinks {', '.join(s.name for s in station.sinks) or 'none'}"
                + ("; HTTP serves every product" if self.http is not None else ""))

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
                self.station.on_result.append(lambda result, product, row: service.record(result, row))
                log.info("HTTP on %s", self.service.url)
            log.info("%s", self.start_line())
            if self.service is not None:
                self.catalog.warm_up(self.spec.batching.max_batch)  # memory at its working level before /readyz
                self.service.set_ready()
            self.station.run(stop)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.service is not None:
            self.service.stop()
        for batcher in self.batchers.values():
            batcher.close(drain=True)
        for sink in self.alert_sinks:
            sink.close(self.spec.outputs.flush_timeout)
        self.catalog.close()


def build_station(spec: StationSpec) -> LineStation:
    """Check ``spec``, load the engine and wire the station (nothing runs yet; see :meth:`LineStation.run`)."""
    spec.check()
    http = http_config(spec.http) if spec.http is not None else None
    outputs = spec.outputs
    name = spec.station_name
    config = StationConfig(station=name, save=outputs.save, rotate_mb=outputs.rotate_mb,
                           status_every_s=outputs.status_every, flush_timeout_s=outputs.flush_timeout,
                           spool_max=outputs.spool_max, keep_running=http is not None)
    sources_known, sinks_known = source_plugins(), sink_plugins()
    resolved = [(s, *resolve_source(s.spec, sources_known)) for s in spec.sources]
    for s, plugin, _ in resolved:
        check_requirements(f"a {plugin.kind} source ({s.name})", plugin.requires, plugin.install)
    sink_kinds = [(s, sink_plugin(s.kind, sinks_known)) for s in spec.sinks]
    for s, plugin in sink_kinds:
        check_requirements(f"the {s.kind} sink {s.name}", plugin.requires, plugin.install)
    sources = []
    for s, plugin, target in resolved:
        source = plugin.create(s.name, target, s.options)
        source.check()
        sources.append(source)
    context = SinkContext(station=name, products=tuple(spec.products))
    sinks = [plugin.create(s.name, s.options, context) for s, plugin in sink_kinds]  # connected once it runs
    bundle = Bundle(spec.bundle)  # opened and verified once, for the catalog and the tiling overrides
    catalog = Catalog(bundle, list(spec.products), engine=engine_config(spec.engine), options=spec.scoring,
                      sigma=spec.sigma, settings=lambda product: resolve_tiling(bundle, product, spec.tiling))
    if spec.engine.backend == AUTO:
        log.info("engine: %s", catalog.selection.reason)
    batchers: dict[str, Batcher] = {}
    try:
        b = spec.batching
        batchers.update({p: Batcher(catalog.get(p), b.max_batch, b.max_wait_ms, b.queue_size) for p in catalog.products})
        station = Station(config, Path(outputs.out), batchers[catalog.products[0]], sources, sinks)
    except BaseException:
        for batcher in batchers.values():
            batcher.close(drain=False)
        catalog.close()
        raise
    return LineStation(spec, catalog, batchers, station, http)
