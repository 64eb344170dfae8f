"""The station: sources -> bounded buffers -> batcher -> results.jsonl + maps/overlays + spooled sinks.

Threads: one capture thread per source (sources.py), one submitter per source (buffer -> batcher, which
blocks while the engine is behind, so camera buffers drop their oldest frames), the batcher's engine
worker, and one collector that takes results in submission order and delivers each decision:

1. maps / overlays (``save``: anomalous | all | none), through :class:`~winclip_edge.results.ResultWriter`;
2. the row (:class:`~winclip_edge.rows.ResultRow`, the same object in every sink) into every sink's on-disk spool;
3. the row into results.jsonl, flushed and fsync'd (rotated by size, never truncated);
4. for a source whose frames are files (the hot folder: plugins.FileSource), the move to done/ or failed/ --
   only now, so a crash never loses a decision.

A restart after a crash between 3 and 4 finds the row (same path and sha256, its ``moved_to`` not there
yet) and only moves the file: every file gets exactly one row. A crash between 2 and 3 re-inspects the
file and sends its decision again (sinks are at-least-once; ``id`` tells repeats apart).
"""
from __future__ import annotations

import fcntl
import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Iterable, Sequence, TextIO

import numpy as np

from ..errors import WinclipError
from ..inspector import InspectionResult
from ..results import RESULTS_JSONL, ResultWriter
from ..rows import ModelIds, ResultRow
from .batcher import Batcher, BatcherClosed, Job
from .plugins import FileSource, Sink, Source
from .sinks import SinkStats, SpooledSink
from .sources import Frame
from .spool import Spool

log = logging.getLogger("winclip_edge.line")

SAVE_POLICIES = ("anomalous", "all", "none")
LATENCY_WINDOW = 1000  # decisions behind the p50/p99 of the status line
LOCK = ".station.lock"
SPOOL = "spool"
_END = object()


@dataclass(frozen=True)
class StationConfig:
    station: str = "station"
    save: str = "anomalous"  # maps + overlays for: anomalous results | all | none
    rotate_mb: float = 100.0  # results.jsonl is renamed to results.<n>.jsonl beyond this size
    status_every_s: float = 10.0  # one status line this often (0 = never)
    flush_timeout_s: float = 10.0  # at exit, how long sinks may take to deliver their spools
    spool_max: int = 10000  # messages a sink keeps on disk (OUT/spool/<sink>/) while it is down
    inflight: int = 64  # submitted frames waiting for their decision to be written
    keep_running: bool = False  # run until stopped even when every source has ended (HTTP-only stations)

    def __post_init__(self) -> None:
        if self.save not in SAVE_POLICIES:
            raise ValueError(f"--save must be one of {SAVE_POLICIES}, got {self.save!r}")
        if self.rotate_mb <= 0:
            raise ValueError(f"--rotate-mb must be > 0, got {self.rotate_mb}")
        if self.spool_max < 1:
            raise ValueError(f"--spool-max must be >= 1, got {self.spool_max}")


@dataclass(frozen=True)
class StationStats:
    """Counters since start, per source / per sink where it matters (for the status line and /metrics)."""

    frames_in: int  # frames or files taken by the sources
    frames_out: int  # decisions made: the sources' (written) and the HTTP face's (answered)
    errors: int  # decisions with an error
    dropped: dict[str, int]  # per source: frames discarded by drop-oldest
    reconnects: dict[str, int]  # per source
    spool_pending: dict[str, int]  # per sink
    spool_overflow: dict[str, int]  # per sink
    latency_p50_ms: float | None  # capture -> decision, over the last LATENCY_WINDOW decisions
    latency_p99_ms: float | None
    queues: dict[str, int] = field(default_factory=dict)  # source buffers, engine queue, awaiting write
    decided: dict[str, int] = field(default_factory=dict)  # per source ("http" for the HTTP face): decisions
    incomplete: dict[str, int] = field(default_factory=dict)  # per camera source: frames dropped incomplete


def results_files(out: Path) -> list[Path]:
    """results.jsonl and its rotated predecessors (results.<n>.jsonl), oldest first."""
    rotated = sorted((p for p in out.glob("results.*.jsonl") if p.name.split(".")[1].isdigit()),
                     key=lambda p: int(p.name.split(".")[1]))
    current = out / RESULTS_JSONL
    return rotated + ([current] if current.is_file() else [])


def moved_rows(out: Path) -> dict[tuple[str, str], list[str]]:
    """(file, sha256) -> the ``moved_to`` of every hot-folder row written under ``out``."""
    index: dict[tuple[str, str], list[str]] = {}
    for path in results_files(out):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash (repaired on open): it named no move
                if isinstance(row, dict) and row.get("moved_to") and row.get("file"):
                    index.setdefault((row["file"], row.get("file_sha256") or ""), []).append(row["moved_to"])
    return index


class StationBusy(WinclipError, RuntimeError):
    """Another station process writes into the same output folder."""


def _lock(out: Path) -> TextIO:
    """An exclusive lock on ``out`` held while the station runs (the kernel drops it when the process dies)."""
    handle = open(out / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StationBusy(f"{out} is used by another running `winclip-edge serve`; give each station its own --out")
    return handle


def _end_with_newline(path: Path) -> None:
    """A crash can cut the last row; the next row must not be glued to it."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


class Station:
    """Runs sources into one batcher and delivers every decision (see the module docstring)."""

    def __init__(self, config: StationConfig, out: str | Path, batcher: Batcher, sources: Sequence[Source],
                 sinks: Sequence[Sink] = (), on_result: Iterable[Callable[[InspectionResult, str, dict], None]] = (),
                 on_row: Iterable[Callable[[dict], None]] = ()):
        """``on_result(result, product, row)`` hooks see each delivered decision with its image (kept for them);
        ``on_row(row)`` hooks see only its row (drift watching), so no image is kept for them."""
        self.config, self.batcher = config, batcher
        self.out = Path(out).resolve()  # payload paths must mean something to the consumers
        self.sources = list(sources)
        self.on_result = list(on_result)
        self.on_row = list(on_row)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_handle = _lock(self.out)
        self.sinks = [SpooledSink(sink, Spool(self.out / SPOOL / sink.name, config.spool_max)) for sink in sinks]
        _end_with_newline(self.out / RESULTS_JSONL)
        saving = config.save != "none"
        self.writer = ResultWriter(self.out, maps=saving, overlays=saving, append=True,
                                   rotate_bytes=int(config.rotate_mb * 2**20), durable=True, unique_names=False)
        self._run_id = time.strftime("%Y%m%dT%H%M%S")
        self._inflight: queue.Queue = queue.Queue(maxsize=config.inflight)
        self._latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._counts = {"out": 0, "errors": 0}
        self._decided: dict[str, int] = {}
        self._ids: tuple[Any, ModelIds] | None = None  # (the Inspector they were read from, its ids)
        self._lock = threading.Lock()
        self._collected = threading.Event()  # every source ended and its decisions are written
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ running
    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (or, without ``keep_running``, every source ended): then drain and flush."""
        file_sources = [s for s in self.sources if isinstance(s, FileSource)]
        index = moved_rows(self.out) if file_sources else {}
        for source in file_sources:
            source.recover(lambda path, sha: index.get((path, sha), []))
        for source in self.sources:
            source.start()
        self._threads = [threading.Thread(target=self._submit, args=(s,), name=f"winclip-submit-{s.name}", daemon=True)
                         for s in self.sources]
        self._threads.append(threading.Thread(target=self._collect, name="winclip-collect", daemon=True))
        for t in self._threads:
            t.start()
        status = threading.Thread(target=self._status, args=(stop,), name="winclip-status", daemon=True)
        status.start()
        while not stop.is_set():
            if self._collected.is_set() and not self.config.keep_running:
                break
            stop.wait(0.2)
        self.shutdown()
        stop.set()  # ends the status thread

    def shutdown(self) -> None:
        """Stop capturing, inspect and write what was already captured, flush the sinks."""
        for source in self.sources:
            source.stop()
            source.buffer.close()  # a capture thread stuck in a read must not hold up the drain
        for t in self._threads:
            t.join()
        for sink in self.sinks:
            sink.close(self.config.flush_timeout_s)
        self.writer.close()
        log.info("stopped: %s", self.status_line())
        self._lock_handle.close()

    def _submit(self, source: Source) -> None:
        keep = self.config.save != "none" or bool(self.on_result)  # overlays, or hooks that show the image
        while True:
            frame = source.buffer.get()
            if frame is None:
                break
            name = (f"{Path(frame.path).stem}-{(frame.sha256 or 'unread')[:8]}" if frame.path is not None
                    else f"{source.name}-{self._run_id}-{frame.index:07d}")
            job = Job(name=name, image=frame.image, path=frame.path, keep_image=keep,
                      metadata={"source": source.name, "frame": frame.index})
            try:
                future = self.batcher.submit(job)
            except BatcherClosed:
                log.error("source %s: the batcher closed; frame %d not inspected", source.name, frame.index)
                break
            self._inflight.put((source, frame, job, future))
        self._inflight.put(_END)

    def _collect(self) -> None:
        ended = 0
        while ended < len(self.sources):
            item = self._inflight.get()
            if item is _END:
                ended += 1
                continue
            source, frame, job, future = item
            try:
                result = future.result()
            except CancelledError:
                result = InspectionResult(path=frame.path or source.name, error="cancelled: the station stopped")
            latency_ms = (time.monotonic() - frame.captured_mono) * 1e3
            try:
                self._deliver(source, frame, result, latency_ms, job.ids or self._model_ids())
            except Exception as err:  # a disk error writing one decision must not stop the station
                log.error("source %s frame %d: cannot write its decision (%s: %s)", source.name, frame.index,
                          type(err).__name__, err)
        self._collected.set()

    def _model_ids(self) -> ModelIds:
        """The ids of the batcher's Inspector now: for a frame no Inspector scored (cancelled at the stop). A scored
        frame's row carries the ids of the Inspector that scored it (``Job.ids``), also across a reload."""
        inspector = self.batcher.inspector
        if self._ids is None or self._ids[0] is not inspector:
            self._ids = (inspector, ModelIds.of(inspector))
        return self._ids[1]

    def _deliver(self, source: Source, frame: Frame, result: InspectionResult, latency_ms: float,
                 ids: ModelIds) -> None:
        save = self.config.save == "all" or (self.config.save == "anomalous" and bool(result.anomalous))
        saved = self.writer.save_outputs(result, save)
        files = source if isinstance(source, FileSource) and frame.path is not None else None
        failed = (saved.error or result.error) is not None
        destination = files.destination(frame, failed=failed) if files is not None else None
        row = ResultRow.of(result, ids, frame.captured_at, latency_ms, station=self.config.station, source=source.name,
                           frame=frame.index if frame.path is None else None, file=frame.path,
                           file_sha256=frame.sha256, overlay=saved.overlay, map=saved.map, moved_to=destination,
                           error=saved.error, **frame.row_fields()).as_dict()
        for sink in self.sinks:
            sink.put(row)
        self.writer.append_row(row)
        if files is not None:
            files.finish(frame, destination)
        self.count(row)
        if row["error"] is not None:
            log.warning("source %s: %s", source.name, row["error"])
        for hook in self.on_result:
            try:
                hook(result, ids.product, row)
            except Exception as err:
                log.error("result hook failed: %s: %s", type(err).__name__, err)
        for row_hook in self.on_row:
            try:
                row_hook(row)
            except Exception as err:
                log.error("row hook failed: %s: %s", type(err).__name__, err)

    def count(self, row: dict) -> None:
        """Count one decision in the status line and stats: the sources' (from ``_deliver``) and those the HTTP
        face made with this station's engine (it calls this for each answered inspection)."""
        with self._lock:
            self._counts["out"] += 1
            self._counts["errors"] += row.get("error") is not None
            name = str(row.get("source"))
            self._decided[name] = self._decided.get(name, 0) + 1
            if row.get("latency_ms") is not None:
                self._latencies.append(row["latency_ms"])

    # ------------------------------------------------------------ reporting
    def stats(self) -> StationStats:
        with self._lock:
            latencies = np.array(self._latencies) if self._latencies else None
            out, errors, decided = self._counts["out"], self._counts["errors"], dict(self._decided)
        sinks: list[SinkStats] = [s.stats() for s in self.sinks]
        queues = {f"source:{s.name}": len(s.buffer) for s in self.sources}
        queues["engine"] = self.batcher.stats().queue_depth
        queues["awaiting_write"] = self._inflight.qsize()
        return StationStats(
            frames_in=sum(s.emitted for s in self.sources), frames_out=out, errors=errors,
            dropped={s.name: s.buffer.dropped for s in self.sources},
            reconnects={s.name: s.reconnects for s in self.sources},
            spool_pending={s.name: s.pending for s in sinks}, spool_overflow={s.name: s.overflow for s in sinks},
            latency_p50_ms=None if latencies is None else float(np.percentile(latencies, 50)),
            latency_p99_ms=None if latencies is None else float(np.percentile(latencies, 99)),
            queues=queues, decided=decided,
            incomplete={s.name: s.incomplete for s in self.sources if hasattr(s, "incomplete")})

    def status_line(self, previous: StationStats | None = None, seconds: float = 0.0) -> str:
        s = self.stats()
        rate = ""
        if previous is not None and seconds > 0:
            rate = (f"in {(s.frames_in - previous.frames_in) / seconds:.1f} fps, "
                    f"out {(s.frames_out - previous.frames_out) / seconds:.1f} fps, ")
        latency = ("latency n/a" if s.latency_p50_ms is None
                   else f"latency p50 {s.latency_p50_ms:.0f} ms p99 {s.latency_p99_ms:.0f} ms")
        sinks = "".join(f", {name} spool {n}" + (f" (overflow {s.spool_overflow[name]})" if s.spool_overflow[name] else "")
                        for name, n in s.spool_pending.items())
        http = f", {s.decided['http']} over HTTP" if s.decided.get("http") else ""
        incomplete = ""
        if s.incomplete:
            each = f" ({', '.join(f'{k} {v}' for k, v in s.incomplete.items())})" if len(s.incomplete) > 1 else ""
            incomplete = f"incomplete {sum(s.incomplete.values())}{each}, "
        return (f"{rate}captured {s.frames_in}, decided {s.frames_out} ({s.errors} errors{http}), "
                f"dropped {sum(s.dropped.values())}, {incomplete}"
                f"reconnects {sum(s.reconnects.values())}, {latency}, queues "
                + " ".join(f"{k}={v}" for k, v in s.queues.items()) + sinks)

    def _status(self, stop: threading.Event) -> None:
        every = self.config.status_every_s
        if every <= 0:
            return
        previous, since = self.stats(), time.monotonic()
        while not stop.wait(every):
            now = time.monotonic()
            log.info("status: %s", self.status_line(previous, now - since))
            previous, since = self.stats(), now
