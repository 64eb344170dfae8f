"""``winclip-edge serve``: the long-running line station (docs/line.md), optionally with its HTTP face (docs/service.md)."""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from ..line.sources import (
    DROP_POLICIES,
    FolderSource,
    VideoOptions,
    VideoSource,
    source_kind,
)
from ..line.station import SAVE_POLICIES, Station, StationConfig
from .common import (
    EXIT_OK,
    CliError,
    add_engine_options,
    add_scoring_options,
    announce,
    engine_config,
    open_bundle,
    scoring_options,
)
from .serve_http import add_http_options, http_config
from .tiling_options import add_tiling_options, tiling_and_roi


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a line station: cameras, videos, streams, hot folders -> results.jsonl, "
                                     "MQTT, webhooks (and an HTTP API with --http)")
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--product", action="append", required=True,
                   help="product inside the bundle; repeatable (the sources inspect the first one; the HTTP face serves all)")
    add_engine_options(p)
    add_scoring_options(p)
    add_tiling_options(p)
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the map, pixels (default off)")
    p.add_argument("--out", required=True, help="output folder: results.jsonl, maps/, overlays/, spool/")
    p.add_argument("--station", default=socket.gethostname(), help="station name in every payload (default: host name)")

    s = p.add_argument_group("sources (docs/line.md)")
    s.add_argument("--source", action="append", default=[], metavar="[NAME=]SRC",
                   help="repeatable: camera index (0), video file, rtsp:// or http:// URL, gst:<pipeline ending in "
                        "appsink>, folder:DIR (hot folder)")
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
    p.set_defaults(run=run_serve)


def _named_sources(specs: list[str]) -> list[tuple[str, str]]:
    """(name, spec) per --source: NAME=SRC, else a name made from the spec (never a URL's credentials)."""
    named, used = [], set()
    for i, text in enumerate(specs):
        head, sep, tail = text.partition("=")
        if sep and head.replace("-", "").replace("_", "").isalnum() and not head.isdigit():
            name, spec = head, tail
        else:
            kind, target = source_kind(text)
            name = {"camera": f"camera{target}", "video": Path(target).stem, "folder": Path(target).name or "folder"
                    }.get(kind, f"{kind}{i}")
            spec = text
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        named.append((name, spec))
    return named


def _sources(args: argparse.Namespace) -> list[Any]:
    options = VideoOptions(fps_limit=args.fps_limit, every_nth=args.every_nth, loop=args.loop, drop=args.drop,
                           buffer=args.buffer, reconnect_max_s=args.reconnect_max_s)
    sources: list[Any] = []
    for name, spec in _named_sources(args.source):
        kind, target = source_kind(spec)
        source = (FolderSource(target, name, settle_s=args.settle_s, ignore_existing=args.ignore_existing,
                               buffer=args.buffer) if kind == "folder" else VideoSource(spec, name, options))
        source.check()
        sources.append(source)
    return sources


def _require_extra(module: str, what: str, needed: bool) -> None:
    if needed:
        try:
            importlib.import_module(module)
        except ImportError:
            raise CliError(f"{what} needs the line extra: pip install \"winclip-edge[line]\"") from None


def _log_to_stderr() -> None:
    logger = logging.getLogger("winclip_edge.line")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[serve] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_serve(args: argparse.Namespace) -> int:
    from ..catalog import Catalog
    from ..inputs import parse_host_port
    from ..line.batcher import Batcher
    from ..line.sinks import MqttConfig, MqttSink, WebhookSink

    http = http_config(args)  # bad flags fail before anything loads
    engine = engine_config(args)
    if not args.source and http is None:
        raise CliError("nothing to serve: give --source (repeatable) and/or --http HOST:PORT")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--queue-size", args.queue_size, 1),
                             ("--buffer", args.buffer, 1)):
        if value < low:
            raise CliError(f"{flag} must be >= {low}, got {value}")
    if args.max_wait_ms < 0:
        raise CliError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    try:
        config = StationConfig(station=args.station, save=args.save, rotate_mb=args.rotate_mb,
                               status_every_s=args.status_every, flush_timeout_s=args.flush_timeout,
                               spool_max=args.spool_max, keep_running=http is not None)
    except ValueError as err:
        raise CliError(str(err)) from None
    _require_extra("paho.mqtt.client", "--mqtt", args.mqtt is not None)
    _require_extra("watchdog", "a folder: source", any(source_kind(s)[0] == "folder" for _, s in _named_sources(args.source)))
    sources = _sources(args)
    mqtt = None
    if args.mqtt is not None:
        host, port = parse_host_port(args.mqtt, 8883 if args.mqtt_tls else 1883)
        topic = args.mqtt_topic or f"winclip/{args.station}/{args.product[0]}/result"
        mqtt = MqttConfig(host=host, port=port, topic=topic, tls=args.mqtt_tls, ca_file=args.mqtt_ca,
                          client_id=f"winclip-edge-{args.station}")
    sinks: list[Any] = [MqttSink(mqtt)] if mqtt is not None else []  # made here, connected once the station runs
    if args.webhook is not None:
        sinks.append(WebhookSink(args.webhook))
    _log_to_stderr()
    out = Path(args.out).resolve()
    bundle = open_bundle(args)  # opened and verified once, for the catalog and the tiling flags

    def settings(product: str) -> tuple:  # the product's tiling / ROI with this run's flags applied
        return tiling_and_roi(argparse.Namespace(**{**vars(args), "product": product}), bundle)

    catalog = Catalog(bundle, args.product, engine=engine, options=scoring_options(args), sigma=args.sigma,
                      settings=settings)
    announce(args, catalog.selection)
    batchers = {p: Batcher(catalog.get(p), args.max_batch, args.max_wait_ms, args.queue_size) for p in catalog.products}
    station = Station(config, out, batchers[catalog.products[0]], sources, sinks)
    service = None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if http is not None:
            from ..service import start_http

            service = start_http(http, catalog, batchers, out, station=args.station, station_stats=station.stats)
            station.on_result.append(lambda result, product, row: service.record(result, row))
            logging.getLogger("winclip_edge.line").info("HTTP on %s", service.url)
        logging.getLogger("winclip_edge.line").info(
            "station %s: %s %s with %s, sources %s, sinks %s", args.station, catalog.products[0],
            catalog.get(catalog.products[0]).mode, catalog.engine.device,
            ", ".join(f"{s.name} ({s.kind})" for s in sources) or "none", ", ".join(s.name for s in sinks) or "none")
        if service is not None:
            catalog.warm_up(args.max_batch)  # memory at its working level before /readyz says ready
            service.set_ready()
        station.run(stop)
    finally:
        if service is not None:
            service.stop()
        for batcher in batchers.values():
            batcher.close(drain=True)
        catalog.close()
    return EXIT_OK
