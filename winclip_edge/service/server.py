"""Running the HTTP face inside a station process: uvicorn on a daemon thread, started and stopped by serve.

The socket is bound here, before uvicorn starts, so a taken port or an unknown address is one clear
error at start-up (not a log line from a thread), and port 0 gives a free port (``HttpService.port``).
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..catalog import Catalog
from ..inspector import InspectionResult
from ..batcher import Batcher
from ..review import ReviewDB
from .app import ServiceContext, create_app
from .config import HttpConfig, ServiceError
from .metrics import StationStats, ServiceMetrics
from .review_api import Review
from .store import ResultStore

STARTUP_TIMEOUT_S = 30.0
STORE_FOLDER = "review"
REVIEW_DB = "verdicts.sqlite"  # in the store's folder: the operators' verdicts (review.py)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ServiceError(f"--http {host}:{port}: unknown address ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ServiceError(f"--http {host}:{port}: cannot listen ({err.strerror}); is another station running there?") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class HttpService:
    """A running HTTP face; see :func:`start_http`."""

    def __init__(self, context: ServiceContext, sock: socket.socket):
        import uvicorn

        self.context = context
        self.socket = sock
        self.port = sock.getsockname()[1]
        self.host = context.config.host
        config = uvicorn.Config(create_app(context), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="winclip-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServiceError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.02)

    def set_ready(self) -> None:
        """``/readyz`` answers 200 from now on (call after the engine's warm-up)."""
        self.context.ready.set()

    def record(self, result: InspectionResult, row: dict) -> str | None:
        """Add a live source's finished result (its row, winclip_edge/rows.py) to the review store and the metrics.
        Returns the id, or None when it could not be stored (counted; the station goes on)."""
        ctx = self.context
        latency = row.get("latency_ms")
        ctx.metrics.observe_result(row.get("product", ""), str(row.get("source", "")), result.anomalous, result.error,
                                   result.timings_ms, None if latency is None else latency / 1e3)
        try:
            return ctx.store.add(row, result)
        except (OSError, ValueError):
            ctx.metrics.errors.labels("store").inc()
            return None

    def stop(self) -> None:
        """Stop accepting connections, let the requests in flight finish (up to 5 s), then return."""
        self._server.should_exit = True
        self._thread.join(10)
        self.socket.close()
        if self.context.review is not None:
            self.context.review.db.close()


def start_http(config: HttpConfig, catalog: Catalog, batchers: Mapping[str, Batcher], out_dir: str | Path,
               station: str = "station", station_stats: StationStats | None = None,
               on_decision: Optional[Callable[[dict], None]] = None, drift: Any = None) -> HttpService:
    """Check ``config``, bind, start serving; returns once the socket accepts connections. ``/readyz`` stays 503
    until :meth:`HttpService.set_ready`. The review store is ``<out_dir>/review/``, the operators' verdicts
    ``<out_dir>/review/verdicts.sqlite``. ``on_decision(row)`` sees the row of every inspection the HTTP face
    answers (the station counts them with its sources'). ``drift``: the station's DriftWatch (line/drift_watch.py),
    fed the verdicts and shown in /metrics and the page."""
    config.check()
    missing = sorted(set(catalog.products) - set(batchers))
    if missing:
        raise ServiceError(f"no batcher for product(s) {missing}")
    folder = Path(out_dir) / STORE_FOLDER
    store = ResultStore(folder, config.keep_results)
    db = ReviewDB(folder / REVIEW_DB)
    try:
        context = ServiceContext(config=config, catalog=catalog, batchers=batchers, store=store,
                                 metrics=ServiceMetrics(batchers, station_stats), station=station,
                                 on_decision=on_decision)
        context.review = Review(context, db, drift)
        service = HttpService(context, _bind(config.host, config.port))
        service._start()
    except BaseException:
        db.close()
        raise
    return service
