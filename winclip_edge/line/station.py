"""The station: sources -> bounded buffers -> batchers -> results.jsonl + maps/overlays + spooled sinks, for
free-running frames and for triggered parts alike (docs/line.md).

Threads: one capture thread per source (sources.py), one submitter per source (buffer -> a batcher, which
blocks while the engine is behind, so camera buffers drop their oldest frames), the batchers' engine workers,
one collector that takes results in submission order, and one deadline thread for the triggered parts.

A frame a triggered part claims (parts.py: the next camera frame after its trigger, a file named for it, an
upload with its id) is one of that part's views; the part's row is written once every view is inspected (its
score the max over the views, each view's map kept). A part whose verdict is not ready at its deadline gets a
fail-safe row at the deadline (``decision: "timeout"``); the real result follows as a late row (``late_for``).
Every other frame is a free-running row, as long as the station runs continuously. Each row is delivered so:

1. maps / overlays (``save``: anomalous | all | none), through :class:`~winclip_edge.results.ResultWriter`;
2. the row (:class:`~winclip_edge.rows.ResultRow`, the same object in every sink) into every sink's on-disk spool;
3. the row into results.jsonl, flushed and fsync'd (rotated by size, never truncated);
4. for a source whose frames are files (the hot folder: plugins.FileSource), the move to done/ or failed/ --
   only now, so a crash never loses a decision; then the row hooks (the OPC UA face's event).

A restart after a crash between 3 and 4 finds the row (same path and sha256, its ``moved_to`` not there
yet) and only moves the file: every file gets exactly one row. A crash between 2 and 3 re-inspects the
file and sends its decision again (sinks are at-least-once; ``id`` tells repeats apart). Triggers are in the
journal (journal.py) before they are acknowledged: a restart gives every part without a row its one row.
"""
from __future__ import annotations

import fcntl
import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Iterable, Sequence, TextIO

import numpy as np

from ..errors import WinclipError
from ..inspector import InspectionResult
from ..results import RESULTS_JSONL, ResultWriter, Saved
from ..rows import ModelIds, ResultRow, utc_iso
from ..batcher import Batcher, BatcherClosed, Job
from ..control import ControlRefused, PartRefused, Trigger, check_part_id
from .journal import PartJournal, Triggered
from .parts import HTTP_VIEW, Part, PartsConfig, PartTracker, named_part
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
_CLOSE = object()


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
    parts: PartsConfig = PartsConfig()  # triggered parts: deadline, fail-safe, views, bounds

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
    parts: dict[str, int] = field(default_factory=dict)  # triggered, decided, timeouts, overflow, late, refused, ...
    verdict_p50_ms: float | None = None  # trigger -> live verdict (verdicts and fail-safes) of the last parts
    verdict_p99_ms: float | None = None
    incomplete: dict[str, int] = field(default_factory=dict)  # per camera source: frames dropped incomplete


def results_files(out: Path) -> list[Path]:
    """results.jsonl and its rotated predecessors (results.<n>.jsonl), oldest first."""
    rotated = sorted((p for p in out.glob("results.*.jsonl") if p.name.split(".")[1].isdigit()),
                     key=lambda p: int(p.name.split(".")[1]))
    current = out / RESULTS_JSONL
    return rotated + ([current] if current.is_file() else [])


def _rows(out: Path) -> Iterable[dict]:
    for path in results_files(out):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash (repaired on open)
                if isinstance(row, dict):
                    yield row


def moved_rows(out: Path) -> dict[tuple[str, str], list[str]]:
    """(file, sha256) -> the ``moved_to`` of every hot-folder file a row written under ``out`` names (a part's
    row names the files of its views)."""
    index: dict[tuple[str, str], list[str]] = {}
    for row in _rows(out):
        for entry in [row, *(v for v in row.get("views") or () if isinstance(v, dict))]:
            if entry.get("moved_to") and entry.get("file"):
                moves = index.setdefault((entry["file"], entry.get("file_sha256") or ""), [])
                if entry["moved_to"] not in moves:
                    moves.append(entry["moved_to"])
    return index


def part_rows(out: Path, wanted: set[str]) -> dict[str, str]:
    """part id -> the id of its live row (the first without ``late_for``), for the ``wanted`` ids found under ``out``."""
    found: dict[str, str] = {}
    for row in _rows(out):
        part = row.get("part_id")
        if part in wanted and part not in found and not row.get("late_for"):
            found[part] = row.get("id") or ""
    return found


def spooled_part_rows(spool: Path, wanted: set[str]) -> list[dict]:
    """The live rows of the ``wanted`` parts that wait in a sink's spool (a crash came between the spool and
    results.jsonl), oldest first, one per part."""
    found: dict[str, tuple[int, dict]] = {}
    for path in sorted(spool.glob("*/*.json")) if wanted else ():
        try:
            row = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        part = row.get("part_id") if isinstance(row, dict) else None
        if part in wanted and not row.get("late_for") and part not in found and path.stem.isdigit():
            found[part] = (int(path.stem), row)
    return [row for _, row in sorted(found.values(), key=lambda item: item[0])]


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


@dataclass
class _Item:
    """A frame on its way through the engine: a free-running frame, a view of a part, or a frame named for a
    part that has its verdict already (``late_for``)."""

    source: Source | None
    frame: Frame
    job: Job
    batcher: Batcher  # the one it was submitted to: its Inspector names a row no Inspector scored (cancelled)
    future: Future
    part: Part | None = None
    view: str | None = None
    part_id: str | None = None
    late_for: str | None = None


@dataclass
class _Outcome:
    """One inspected view of a part."""

    result: InspectionResult
    ids: ModelIds
    saved: Saved
    source: Source | None
    frame: Frame


def _triggered(part: Part) -> Triggered:
    """The journal's record of a part's trigger."""
    return Triggered(part.part_id, part.product, part.triggered_by, part.job_id, part.meas_id, part.triggered_at,
                     part.deadline_at, tuple(part.views))


class Station:
    """Runs sources into the batchers and delivers every decision (see the module docstring).

    ``batchers``: one per product (default: ``batcher``'s own); ``batcher`` inspects the free-running frames
    until :meth:`select` picks another product. ``on_result(result, product, row)`` hooks see every row with a
    result (outside the station's lock), ``on_row(row)`` hooks every row in the order written (keep them quick)."""

    def __init__(self, config: StationConfig, out: str | Path, batcher: Batcher, sources: Sequence[Source],
                 sinks: Sequence[Sink] = (), on_result: Iterable[Callable[[InspectionResult, str, dict], None]] = (),
                 batchers: dict[str, Batcher] | None = None, on_row: Iterable[Callable[[dict], None]] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        # The caller's dict itself: a product the HTTP face adds (POST /v1/products) is one the station serves too.
        self.batchers = batchers if batchers is not None else {}
        self.product: str | None = batcher.inspector.product
        self.batchers.setdefault(batcher.inspector.product, batcher)
        self.out = Path(out).resolve()  # payload paths must mean something to the consumers
        self.sources = list(sources)
        self.on_result = list(on_result)
        self.on_row = list(on_row)
        self.overlay_base: str | None = None  # the HTTP face's URL when it runs (rows get overlay_url)
        self.continuous = config.parts.continuous
        self.clock = clock
        views = self._views(config.parts.views)
        live = {s.name: not isinstance(s, FileSource) for s in self.sources}
        self.tracker = PartTracker(config.parts, {v: live.get(v, False) for v in views}, clock=clock)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_handle = _lock(self.out)
        self.journal = PartJournal(self.out, keep=config.parts.remember)
        self._recovered: Any = self._read_journal()  # before the sinks start: they deliver (and forget) spooled rows
        self._recover_lock = threading.Lock()
        self.sinks = [SpooledSink(sink, Spool(self.out / SPOOL / sink.name, config.spool_max)) for sink in sinks]
        _end_with_newline(self.out / RESULTS_JSONL)
        saving = config.save != "none"
        self.writer = ResultWriter(self.out, maps=saving, overlays=saving, append=True,
                                   rotate_bytes=int(config.rotate_mb * 2**20), durable=True, unique_names=False)
        self._run_id = time.strftime("%Y%m%dT%H%M%S")
        self._inflight: queue.Queue = queue.Queue(maxsize=config.inflight)
        self._latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._verdicts: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._counts = {"out": 0, "errors": 0, "unclaimed": 0}
        self._decided: dict[str, int] = {}
        self._ids: dict[str, tuple[Any, ModelIds]] = {}  # product -> (its latest inspector, that one's ids)
        self._lock = threading.Lock()
        self._emit = threading.RLock()  # rows are written, and parts decided, one at a time and in order
        self._trigger_lock = threading.Lock()  # triggers are checked, journaled and admitted one at a time
        self._uploads = 0
        self._sources_done = threading.Event()  # every source ended and its decisions are written
        self._resume = threading.Event()  # cleared while halted: the submitters hold their frames
        self._resume.set()
        self._wake = threading.Event()  # a part was admitted: the deadline thread looks again
        self._stopping = False
        self._deadlines_done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._collector: threading.Thread | None = None
        self._deadline_thread: threading.Thread | None = None
        for source in self.sources:  # a triggered camera tells us of parts it took no frame for
            if hasattr(source, "on_missed") and getattr(source, "trigger_mode", "off") != "off":
                source.on_missed = lambda missed, s=source: self._missed(s, missed)

    def _views(self, wanted: tuple[str, ...]) -> tuple[str, ...]:
        names = [s.name for s in self.sources]
        if not wanted:
            return tuple(names) or (HTTP_VIEW,)
        unknown = [v for v in wanted if v not in names and v != HTTP_VIEW]
        if unknown:
            raise ValueError(f"view {unknown[0]!r} is not a source of this station (sources: "
                             f"{', '.join(names) or 'none'}; or {HTTP_VIEW!r} for uploads)")
        return tuple(dict.fromkeys(wanted))

    @property
    def batcher(self) -> Batcher:
        """The batcher of the free-running frames (the selected product's, else the first)."""
        return self.batchers.get(self.product) or next(iter(self.batchers.values()))

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(self.tracker.live_views)

    # ------------------------------------------------------------ control (the line controller's calls)
    def _served(self, product: str) -> str:
        """``product`` if the station serves it; KeyError naming the ones it does."""
        if product not in self.batchers:
            raise KeyError(f"unknown product {product!r}; this station serves {sorted(self.batchers)}")
        return product

    def select(self, product: str | None) -> None:
        """The product free-running frames and triggers without one are inspected as (None: none)."""
        self.product = None if product is None else self._served(product)

    def halt(self, halted: bool) -> None:
        """Hold every source's frames (cameras keep their newest) and refuse triggers, or go on."""
        if halted:
            self._resume.clear()
        else:
            self._resume.set()

    @property
    def halted(self) -> bool:
        return not self._resume.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def abort(self, reason: str) -> None:
        """Every part in flight gets its fail-safe row now (their late results follow as they come)."""
        deferred: list[Callable[[], None]] = []
        with self._emit:
            for part in self.tracker.open_parts():
                if part.live:
                    self._fail_safe_locked(part, reason, deferred)
        self._run(deferred)

    def trigger(self, trigger: Trigger) -> Part:
        """Take a part: journaled before this returns (the acknowledgement), then its views are captured (a
        triggered camera is told to take its frame). Beyond ``max_pending`` parts in flight it gets its fail-safe
        row at once. Raises ControlRefused (PartRefused for an id in flight or decided) or KeyError."""
        part_id = check_part_id(trigger.part_id)
        self.recover()
        if self._stopping:
            raise ControlRefused("the station is stopping")
        if self.halted:
            raise ControlRefused("the station is halted (Reset to go on)")
        product = trigger.product or self.product
        if product is None:
            raise ControlRefused("no recipe is prepared: name the product or prepare a recipe first")
        part = self._open_part(part_id, self._served(product), trigger.source, trigger.job_id, trigger.meas_id)
        if part is not None:
            self._arm_cameras(part)
        return part

    def _open_part(self, part_id: str, product: str, triggered_by: str, job_id: str = "", meas_id: str = "",
                   at: tuple[float, float] | None = None, views: Iterable[str] | None = None) -> Part:
        part = self.tracker.new_part(part_id, product, triggered_by, job_id, meas_id, views=views, at=at)
        with self._trigger_lock:
            why = self.tracker.refusal(part_id)
            if why is not None:
                self.tracker.refused()
                raise PartRefused(why)
            self.journal.triggered(_triggered(part))
            admitted = self.tracker.admit(part)
        if not admitted:
            deferred: list[Callable[[], None]] = []
            with self._emit:
                self._fail_safe_locked(part, f"fail-safe: {self.config.parts.max_pending} parts in flight already "
                                             "(max_pending)", deferred)
                self.tracker.close(part)
            self._run(deferred)
        else:
            self._wake.set()
        if self.journal.oversized(len(self.tracker.open_parts())):
            self._compact_journal()
        return part

    def _arm_cameras(self, part: Part) -> None:
        """A view that is a triggered camera takes its frame for this part (software) or is told which part its
        next hardware-triggered frame belongs to."""
        for source in self.sources:
            if source.name not in part.views:
                continue
            mode = getattr(source, "trigger_mode", "off")
            try:
                if mode == "software":
                    source.trigger(part.part_id)
                elif mode == "hardware":
                    source.expect(part.part_id)
            except WinclipError as err:
                self._view_failed(source.name, part.part_id, f"the camera's trigger failed: {err}")

    def _missed(self, source: Source, missed: Any) -> None:
        """A camera's trigger brought no complete frame for a part (``missed``: genicam.MissedPart)."""
        self._view_failed(source.name, missed.part_id, missed.reason)

    def _view_failed(self, view: str, part_id: str | None, reason: str) -> None:
        part = self.tracker.missed(part_id, view, f"view {view}: {reason}")
        if part is not None:
            self._complete(part)

    def upload(self, part_id: str, product: str | None, image: np.ndarray, name: str,
               received_at: float | None = None, timeout: float | None = None) -> Future:
        """An upload with a part id (HTTP): the part's ``http`` view if it waits for one, else a part of its own
        (triggered by the upload). The future's result is the part's row once written (live or late)."""
        part_id = check_part_id(part_id)
        self.recover()
        if self._stopping:
            raise BatcherClosed("the station is stopping")
        mono, epoch = self.clock(), received_at if received_at is not None else time.time()
        part = self.tracker.get(part_id)
        if part is not None:
            if product is not None and product != part.product:
                raise PartRefused(f"part {part_id} is inspected as {part.product}, not {product}")
            if self.tracker.claim_named(part_id, HTTP_VIEW) is None:
                raise PartRefused(f"part {part_id} is in flight and waits for no upload (its views: "
                                  f"{', '.join(part.views)})")
        else:
            product = product or self.product
            if product is None:
                raise ControlRefused("no recipe is prepared: name the product")
            self._served(product)
            views = self.views if HTTP_VIEW in self.views else (HTTP_VIEW,)
            part = self._open_part(part_id, product, "http", at=(mono, epoch), views=views)
            part = self.tracker.claim_named(part_id, HTTP_VIEW)
            if part is None:  # it got its fail-safe at once (max_pending): the upload is its late result
                return self._late_upload(part_id, product, image, name, epoch, mono, timeout)
            self._arm_cameras(part)
        waiter: Future = Future()
        part.waiters.append(waiter)
        with self._lock:
            self._uploads += 1
            index = self._uploads
        frame = Frame(HTTP_VIEW, index, epoch, mono, image=image)
        job = Job(name=f"{name}-{part_id}-{index}", image=image, metadata={"source": HTTP_VIEW, "frame": index},
                  keep_image=True)
        batcher = self.batchers[part.product]
        try:
            future = batcher.submit(job, True, timeout)
        except WinclipError as err:
            self.tracker.done(part, HTTP_VIEW, error=f"view {HTTP_VIEW}: not inspected ({err})")
            self._complete(part)
            raise
        self._inflight.put(_Item(None, frame, job, batcher, future, part=part, view=HTTP_VIEW))
        return waiter

    def _late_upload(self, part_id: str, product: str, image: np.ndarray, name: str, epoch: float, mono: float,
                     timeout: float | None) -> Future:
        waiter: Future = Future()
        frame = Frame(HTTP_VIEW, 0, epoch, mono, image=image)
        job = Job(name=f"{name}-{part_id}", image=image, metadata={"source": HTTP_VIEW}, keep_image=True)
        batcher = self.batchers[product]
        item = _Item(None, frame, job, batcher, batcher.submit(job, True, timeout), part_id=part_id,
                     late_for=self.tracker.decided_row(part_id))
        item.job.metadata["waiter"] = waiter
        self._inflight.put(item)
        return waiter

    # ------------------------------------------------------------ running
    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (or, without ``keep_running``, every source ended): then drain and flush."""
        self.recover()
        file_sources = [s for s in self.sources if isinstance(s, FileSource)]
        index = moved_rows(self.out) if file_sources else {}
        for source in file_sources:
            source.recover(lambda path, sha: index.get((path, sha), []))
        for source in self.sources:
            source.start()
        self._threads = [threading.Thread(target=self._submit, args=(s,), name=f"winclip-submit-{s.name}", daemon=True)
                         for s in self.sources]
        self._collector = threading.Thread(target=self._collect, name="winclip-collect", daemon=True)
        self._deadline_thread = threading.Thread(target=self._deadlines, name="winclip-deadlines", daemon=True)
        for t in [*self._threads, self._collector, self._deadline_thread]:
            t.start()
        status = threading.Thread(target=self._status, args=(stop,), name="winclip-status", daemon=True)
        status.start()
        while not stop.is_set():
            if self._sources_done.is_set() and not self.config.keep_running:
                break
            stop.wait(0.2)
        self.shutdown()
        stop.set()  # ends the status thread

    def shutdown(self) -> None:
        """Stop capturing, inspect and write what was already captured, give every open part its row, flush the
        sinks."""
        self._stopping = True
        for source in self.sources:
            source.stop()
            source.buffer.close()  # a capture thread stuck in a read must not hold up the drain
        self._resume.set()
        for t in self._threads:
            t.join()
        if self._collector is not None:
            self._inflight.put(_CLOSE)
            self._collector.join()
        self._close_open_parts()
        self._deadlines_done.set()
        if self._deadline_thread is not None:
            self._wake.set()
            self._deadline_thread.join()
        for sink in self.sinks:
            sink.close(self.config.flush_timeout_s)
        self.writer.close()
        self.journal.close()
        log.info("stopped: %s", self.status_line())
        self._lock_handle.close()

    def _submit(self, source: Source) -> None:
        keep = self.config.save != "none" or bool(self.on_result)  # overlays, or hooks that show the image
        while True:
            frame = source.buffer.get()
            if frame is None:
                break
            self._resume.wait()
            try:
                item = self._route(source, frame, keep)
            except BatcherClosed:
                log.error("source %s: the batcher closed; frame %d not inspected", source.name, frame.index)
                break
            if item is not None:
                self._inflight.put(item)
        self._inflight.put(_END)

    def _job(self, source: Source, frame: Frame, keep: bool) -> Job:
        name = (f"{Path(frame.path).stem}-{(frame.sha256 or 'unread')[:8]}" if frame.path is not None
                else f"{source.name}-{self._run_id}-{frame.index:07d}")
        return Job(name=name, image=frame.image, path=frame.path, keep_image=keep,
                   metadata={"source": source.name, "frame": frame.index})

    def _route(self, source: Source, frame: Frame, keep: bool) -> _Item | None:
        """Where a frame goes: the view of the part that claims it, a late view of a part decided already, its own
        part (a hot-folder file or a triggered camera's frame while the station runs on triggers only), a
        free-running row, or nowhere (counted)."""
        part = self.tracker.claim(source.name, frame)
        if part is not None:
            return self._view_item(source, frame, keep, part)
        named = named_part(frame)
        decided = self.tracker.decided_row(named) if named is not None else None
        if decided is not None and self.tracker.get(named) is None:
            return self._free(source, frame, keep, part_id=named, late_for=decided)
        own = frame.path is not None or (getattr(source, "trigger_mode", "off") == "hardware" and named is None)
        if not self.continuous and own and source.name in self.views and self.product is not None:
            part_id = named or f"{source.name}-{getattr(frame, 'camera_frame_id', frame.index)}"
            try:
                self._open_part(part_id, self.product, "folder" if frame.path is not None else "camera",
                                at=(frame.captured_mono, frame.captured_at))
                part = self.tracker.claim(source.name, frame)
            except ControlRefused as err:
                log.warning("source %s: %s", source.name, err)
            if part is not None:
                return self._view_item(source, frame, keep, part)
            if self.tracker.decided_row(part_id) is not None:  # it got its fail-safe at once (max_pending)
                return self._free(source, frame, keep, part_id=part_id, late_for=self.tracker.decided_row(part_id))
        if self.continuous and self.product is not None:
            return self._free(source, frame, keep)
        if frame.path is not None:  # a file always gets its row
            return self._free(source, frame, keep, part_id=named)
        with self._lock:
            self._counts["unclaimed"] += 1
        return None

    def _view_item(self, source: Source, frame: Frame, keep: bool, part: Part) -> _Item:
        job, batcher = self._job(source, frame, keep), self.batchers[part.product]
        return _Item(source, frame, job, batcher, batcher.submit(job), part=part, view=source.name)

    def _free(self, source: Source, frame: Frame, keep: bool, part_id: str | None = None,
              late_for: str | None = None) -> _Item:
        job, batcher = self._job(source, frame, keep), self.batcher
        return _Item(source, frame, job, batcher, batcher.submit(job), part_id=part_id, late_for=late_for)

    def _collect(self) -> None:
        ended = 0
        if not self.sources:
            self._sources_done.set()
        while True:
            item = self._inflight.get()
            if item is _END:
                ended += 1
                if ended == len(self.sources):
                    self._sources_done.set()
                continue
            if item is _CLOSE:
                break
            try:
                result = item.future.result()
            except CancelledError:
                result = InspectionResult(path=item.frame.path or item.job.name, error="cancelled: the station stopped")
            try:
                if item.part is not None:
                    self._deliver_view(item, result)
                else:
                    self._deliver(item, result)
            except Exception as err:  # a disk error writing one decision must not stop the station
                log.error("source %s frame %d: cannot write its decision (%s: %s)", item.frame.source,
                          item.frame.index, type(err).__name__, err)
        self._sources_done.set()

    # ------------------------------------------------------------ rows
    def _model_ids(self, inspector: Any) -> ModelIds:
        """The ids of ``inspector``, read once per inspector (a reload makes a new one; the old one is let go)."""
        known = self._ids.get(inspector.product)
        if known is None or known[0] is not inspector:
            known = self._ids[inspector.product] = (inspector, ModelIds.of(inspector))
        return known[1]

    def _ids_of(self, item: _Item) -> ModelIds:
        """The ids of the Inspector that scored the item (the batcher sets them), else of its batcher's now."""
        return item.job.ids or self._model_ids(item.batcher.inspector)

    def _save(self, result: InspectionResult) -> Saved:
        save = self.config.save == "all" or (self.config.save == "anomalous" and bool(result.anomalous))
        return self.writer.save_outputs(result, save)

    def _overlay_url(self, row: dict, result: InspectionResult | None) -> str | None:
        if self.overlay_base is None or result is None or result.error is not None or result.anomaly_map is None:
            return None
        return f"{self.overlay_base}/v1/results/{row['id']}/overlay.png"

    def _deliver(self, item: _Item, result: InspectionResult) -> None:
        """A free-running frame's row (or a late view of a part decided already)."""
        source, frame = item.source, item.frame
        ids = self._ids_of(item)
        saved = self._save(result)
        files = source if isinstance(source, FileSource) and frame.path is not None else None
        failed = (saved.error or result.error) is not None
        destination = files.destination(frame, failed=failed) if files is not None else None
        latency_ms = (self.clock() - frame.captured_mono) * 1e3
        made = ResultRow.of(result, ids, frame.captured_at, latency_ms, decided_at=time.time(),
                            station=self.config.station, source=frame.source,
                            frame=frame.index if frame.path is None else None, file=frame.path,
                            file_sha256=frame.sha256, overlay=saved.overlay, map=saved.map, moved_to=destination,
                            error=saved.error, part_id=item.part_id, late_for=item.late_for,
                            **frame.row_fields())
        row = made.as_dict()
        if item.late_for is not None:
            row["accept"] = None  # not a live verdict: its part was decided before
            decided = self.tracker.decided_part(item.part_id)
            if decided is not None:
                row.update(self._trigger_fields(decided))  # the trigger it answers, as on the part's rows
        row["overlay_url"] = self._overlay_url(row, result)
        deferred: list[Callable[[], None]] = []
        with self._emit:
            self._write_locked(row, [(files, frame, destination)] if files is not None else [], result, deferred)
        waiter = item.job.metadata.get("waiter")
        if waiter is not None:
            deferred.append(lambda: waiter.set_result(row))
        self._run(deferred)

    def _view_entry(self, view: str, outcome: _Outcome | None, error: str | None, destination: str | None) -> dict:
        if outcome is None:
            return {"view": view, "score": None, "anomalous": None, "error": error}
        r, frame = outcome.result, outcome.frame
        return {"view": view, "frame": frame.index if frame.path is None else None, "file": frame.path,
                "file_sha256": frame.sha256, "captured_at": utc_iso(frame.captured_at), "score": r.score,
                "anomalous": r.anomalous, "map": outcome.saved.map, "overlay": outcome.saved.overlay,
                "moved_to": destination, "error": r.error or outcome.saved.error or error, **frame.row_fields()}

    def _deliver_view(self, item: _Item, result: InspectionResult) -> None:
        outcome = _Outcome(result, self._ids_of(item), self._save(result), item.source, item.frame)
        part = item.part
        deferred: list[Callable[[], None]] = []
        with self._emit:
            self._expire_locked(deferred)
            if self.tracker.done(part, item.view, outcome):
                self._finish_locked(part, deferred)
        self._run(deferred)

    def _complete(self, part: Part) -> None:
        deferred: list[Callable[[], None]] = []
        with self._emit:
            self._expire_locked(deferred)
            if part.complete and self.tracker.get(part.part_id) is part:
                self._finish_locked(part, deferred)
        self._run(deferred)

    @staticmethod
    def _trigger_fields(part: Part) -> dict:
        return {"part_id": part.part_id, "job_id": part.job_id or None, "meas_id": part.meas_id or None,
                "triggered_by": part.triggered_by, "triggered_at": utc_iso(part.triggered_at),
                "deadline_at": None if part.deadline_at is None else utc_iso(part.deadline_at)}

    def _base_row(self, part: Part, ids: ModelIds | None, now: float) -> dict:
        inspector = self.batchers[part.product].inspector
        threshold = inspector.threshold.value if inspector.threshold is not None else None
        ids = ids or self._model_ids(inspector)
        return ResultRow(
            station=self.config.station, product=part.product, threshold=threshold, mode=ids.mode, model=ids.model,
            weights_id=ids.weights_id, memory_id=ids.memory_id, threshold_id=ids.threshold_id,
            decided_at=utc_iso(now), **self._trigger_fields(part)).as_dict()

    def _fail_safe_locked(self, part: Part, reason: str, deferred: list) -> dict:
        """The part's fail-safe row (``decision: "timeout"``), its live verdict."""
        row = self._base_row(part, None, time.time())
        accept = self.config.parts.on_timeout == "pass"
        row.update(decision="timeout", accept=accept, error=reason,
                   views=[{"view": name, "state": v.state, "error": v.error} for name, v in part.views.items()])
        self._write_locked(row, [], None, deferred)
        part.timeout_row, part.fail_safe = row["id"], row
        self._decided_locked(part, row)
        log.warning("part %s: %s -> fail-safe %s", part.part_id, reason, "pass" if accept else "reject")
        return row

    def _decided_locked(self, part: Part, row: dict) -> None:
        self.tracker.decided(part.part_id, row["id"], part)
        self.journal.decided(part.part_id, row["id"])
        with self._lock:
            self._verdicts.append((time.time() - part.triggered_at) * 1e3)

    def _expire_locked(self, deferred: list) -> None:
        expired = self.tracker.expire()
        for part in expired.timed_out:
            waiting = part.missing
            why = (f"waiting for view{'s' if len(waiting) > 1 else ''} {', '.join(waiting)}" if waiting
                   else f"inspecting (engine queue {self.batchers[part.product].stats().queue_depth})")
            self._fail_safe_locked(part, f"deadline {self.config.parts.deadline_ms:g} ms passed before the verdict: "
                                         f"{why}", deferred)
        for part in expired.completed:
            self._finish_locked(part, deferred)

    def _finish_locked(self, part: Part, deferred: list) -> None:
        """Every view of ``part`` is done: its row (the live verdict, or the late result after its fail-safe)."""
        if self.tracker.overdue(part):
            self._fail_safe_locked(part, f"deadline {self.config.parts.deadline_ms:g} ms passed before the verdict "
                                         "(the result came just after it)", deferred)
        now = time.time()
        views = list(part.views.values())
        outcomes = [v.outcome for v in views if v.outcome is not None]
        if not part.live and not outcomes:  # its fail-safe was its row, and no view ever came: nothing more to say
            self.tracker.close(part)
            for waiter in part.waiters:
                deferred.append(lambda w=waiter: w.set_result(part.fail_safe) if not w.done() else None)
            return
        # A view without a result fails the part (no decision: rejected); one whose outputs could not be written
        # keeps its score, and its row says why.
        failures = [v.error or (f"view {v.name}: not captured" if v.outcome is None else v.outcome.result.error)
                    for v in views if v.error or v.outcome is None or v.outcome.result.error]
        notes = [v.outcome.saved.error for v in views if v.outcome is not None and v.outcome.saved.error]
        scored = [o for o in outcomes if o.result.error is None and o.result.score is not None]
        best = max(scored, key=lambda o: o.result.score) if scored else (outcomes[0] if outcomes else None)
        moves, entries = [], []
        for v in views:
            o = v.outcome
            destination = None
            if o is not None and isinstance(o.source, FileSource) and o.frame.path is not None:
                failed = (v.error or o.result.error or o.saved.error) is not None
                destination = o.source.destination(o.frame, failed=failed)
                moves.append((o.source, o.frame, destination))
            entries.append(self._view_entry(v.name, o, v.error, destination))
        row = self._base_row(part, best.ids if best is not None else None, now)
        best_entry = next(e for v, e in zip(views, entries) if v.outcome is best) if best is not None else None
        if best is not None:
            made = ResultRow.of(best.result, best.ids, best.frame.captured_at,
                                (self.clock() - max(o.frame.captured_mono for o in outcomes)) * 1e3, decided_at=now,
                                station=self.config.station, source=best.frame.source,
                                frame=best_entry["frame"], file=best.frame.path, file_sha256=best.frame.sha256,
                                overlay=best.saved.overlay, map=best.saved.map, moved_to=best_entry["moved_to"],
                                **best.frame.row_fields())
            row = {**made.as_dict(), **self._trigger_fields(part), "captured_at": utc_iso(max(o.frame.captured_at for o in outcomes))}
        row["views"] = entries
        if failures or notes:
            row["error"] = "; ".join(dict.fromkeys(failures + notes))
        if failures:
            row["decision"] = None
        decision = row.get("decision")
        if part.live:
            row["accept"] = decision == "pass"  # no decision (an error, no threshold): rejected, fail-safe
        else:
            row.update(late_for=part.timeout_row, accept=None)
        row["overlay_url"] = self._overlay_url(row, best.result if best is not None else None)
        self._write_locked(row, moves, best.result if best is not None else None, deferred)
        live = part.live
        if live:
            self._decided_locked(part, row)
        self.tracker.close(part, late=not live)
        for waiter in part.waiters:
            deferred.append(lambda w=waiter: w.set_result(row) if not w.done() else None)

    def _write_locked(self, row: dict, moves: list, result: InspectionResult | None, deferred: list) -> None:
        """Deliver one row (module docstring, 2-4); the hooks that take long run after the lock (``deferred``)."""
        for sink in self.sinks:
            sink.put(row)
        self.writer.append_row(row)
        for files, frame, destination in moves:
            files.finish(frame, destination)
        self.count(row)
        if row["error"] is not None and row.get("decision") != "timeout":  # a fail-safe is logged where it is made
            where = f"source {row['source']}" if row.get("source") else f"part {row.get('part_id')}"
            log.warning("%s: %s", where, row["error"])
        for hook in self.on_row:
            try:
                hook(row)
            except Exception as err:
                log.error("row hook failed: %s: %s", type(err).__name__, err)
        if result is not None:
            for hook in self.on_result:
                deferred.append(lambda h=hook: h(result, row["product"], row))

    @staticmethod
    def _run(deferred: list) -> None:
        for fn in deferred:
            try:
                fn()
            except Exception as err:
                log.error("result hook failed: %s: %s", type(err).__name__, err)

    # ------------------------------------------------------------ deadlines, restarts, the end
    def _deadlines(self) -> None:
        while not self._deadlines_done.is_set():
            wake = self.tracker.next_wake()
            wait = 0.5 if wake is None else min(max(wake - self.clock(), 0.0), 0.5)
            if self._wake.wait(wait):
                self._wake.clear()
            deferred: list[Callable[[], None]] = []
            with self._emit:
                self._expire_locked(deferred)
            self._run(deferred)

    def _read_journal(self) -> tuple[Any, dict[str, str], list[dict]]:
        """What an earlier run left: its journal, the rows of its open parts found in results.jsonl, and those only
        in a sink's spool (a crash came between the spool and results.jsonl)."""
        recovered = self.journal.recover()
        wanted = {t.part_id for t in recovered.open}
        found = part_rows(self.out, wanted) if wanted else {}
        return recovered, found, spooled_part_rows(self.out / SPOOL, wanted - set(found))

    def recover(self) -> None:
        """An earlier run's journal: parts with a row stay decided; a part without one gets its fail-safe row now
        (its deadline passed, or a camera view cannot be taken again), or waits again for its files and uploads
        until its deadline. Once, before the first trigger is taken (the first trigger or ``run`` calls it)."""
        with self._recover_lock:
            if self._recovered is not None:
                self._recover_parts(*self._recovered)
                self._recovered = None

    def _recover_parts(self, recovered: Any, found: dict[str, str], spooled: list[dict]) -> None:
        for part_id, row_id in recovered.decided:
            self.tracker.decided(part_id, row_id)
        if recovered.open:
            for row in spooled:
                self.writer.append_row(row)  # results.jsonl gets it now; the sinks have it already
                found[row["part_id"]] = row["id"]
            now_mono, now = self.clock(), time.time()
            for entry in recovered.open:
                if entry.part_id in found:
                    self.tracker.decided(entry.part_id, found[entry.part_id])
                    continue
                product = entry.product if entry.product in self.batchers else self.product or next(iter(self.batchers))
                mono = now_mono - (now - entry.triggered_at)
                views = [v for v in entry.views if v in self.tracker.live_views] or list(self.views)
                part = self.tracker.new_part(entry.part_id, product, entry.triggered_by, entry.job_id, entry.meas_id,
                                             views=views, at=(mono, entry.triggered_at))
                part.deadline_at = entry.deadline_at
                part.deadline_mono = None if entry.deadline_at is None else mono + (entry.deadline_at - entry.triggered_at)
                part.recovered = True
                cameras = [v for v in part.views.values() if v.live]
                passed = part.deadline_at is not None and part.deadline_at <= now
                if cameras or passed or not self.tracker.admit(part):
                    with self._emit:
                        self._fail_safe_locked(part, "the station restarted before this part's verdict (it was in "
                                                     "flight at a crash)", [])
                    self.tracker.close(part)
                else:
                    for view in part.views.values():
                        view.live = False
                    part.capture_by_mono = max(part.capture_by_mono, now_mono)
                    log.info("part %s: waiting again for its views after the restart", part.part_id)
        self._compact_journal()

    def _compact_journal(self) -> None:
        with self._trigger_lock:
            self.journal.rewrite(self.tracker.remembered(), [_triggered(p) for p in self.tracker.open_parts() if p.live])

    def _close_open_parts(self) -> None:
        """At the end of a run every open part gets its row: the fail-safe if it had none, then what its views
        gave (their files move only now)."""
        deferred: list[Callable[[], None]] = []
        with self._emit:
            self._expire_locked(deferred)
            for part in self.tracker.open_parts():
                if part.live:
                    self._fail_safe_locked(part, "the station stopped before this part's verdict", deferred)
                for view in part.views.values():
                    if view.state != "done":
                        view.state, view.error = "done", view.error or f"view {view.name}: the station stopped first"
                if any(v.outcome is not None for v in part.views.values()):
                    self._finish_locked(part, deferred)
                else:
                    self.tracker.close(part, late=False)
                    for waiter in part.waiters:
                        deferred.append(lambda w=waiter: w.set_exception(BatcherClosed("the station stopped"))
                                        if not w.done() else None)
        self._run(deferred)

    def count(self, row: dict) -> None:
        """Count one decision in the status line and stats: the sources' (from ``_deliver``) and those the HTTP
        face made with this station's engine (it calls this for each answered inspection)."""
        with self._lock:
            self._counts["out"] += 1
            self._counts["errors"] += row.get("error") is not None
            name = str(row.get("source") or ("parts" if row.get("part_id") else None))
            self._decided[name] = self._decided.get(name, 0) + 1
            if row.get("latency_ms") is not None:
                self._latencies.append(row["latency_ms"])

    # ------------------------------------------------------------ reporting
    def stats(self) -> StationStats:
        with self._lock:
            latencies = np.array(self._latencies) if self._latencies else None
            verdicts = np.array(self._verdicts) if self._verdicts else None
            out, errors, decided = self._counts["out"], self._counts["errors"], dict(self._decided)
            unclaimed = self._counts["unclaimed"]
        sinks: list[SinkStats] = [s.stats() for s in self.sinks]
        queues = {f"source:{s.name}": len(s.buffer) for s in self.sources}
        queues["engine"] = sum(b.stats().queue_depth for b in list(self.batchers.values()))  # may grow
        queues["awaiting_write"] = self._inflight.qsize()
        parts = dict(self.tracker.counts, open=self.tracker.in_flight(), unclaimed=unclaimed)
        return StationStats(
            frames_in=sum(s.emitted for s in self.sources), frames_out=out, errors=errors,
            dropped={s.name: s.buffer.dropped for s in self.sources},
            reconnects={s.name: s.reconnects for s in self.sources},
            spool_pending={s.name: s.pending for s in sinks}, spool_overflow={s.name: s.overflow for s in sinks},
            latency_p50_ms=None if latencies is None else float(np.percentile(latencies, 50)),
            latency_p99_ms=None if latencies is None else float(np.percentile(latencies, 99)),
            queues=queues, decided=decided, parts=parts,
            verdict_p50_ms=None if verdicts is None else float(np.percentile(verdicts, 50)),
            verdict_p99_ms=None if verdicts is None else float(np.percentile(verdicts, 99)),
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
        p = s.parts
        parts = ""
        if p.get("triggered") or p.get("refused") or p.get("unclaimed"):
            verdict = "" if s.verdict_p50_ms is None else \
                f", trigger->verdict p50 {s.verdict_p50_ms:.0f} ms p99 {s.verdict_p99_ms:.0f} ms"
            parts = (f", parts triggered {p['triggered']} (decided {p['decided']}, timeouts {p['timeouts']}, "
                     f"overflow {p['overflow']}, late {p['late']}, open {p['open']}, refused {p['refused']}), "
                     f"unclaimed frames {p['unclaimed']}{verdict}")
        incomplete = ""
        if s.incomplete:
            each = f" ({', '.join(f'{k} {v}' for k, v in s.incomplete.items())})" if len(s.incomplete) > 1 else ""
            incomplete = f"incomplete {sum(s.incomplete.values())}{each}, "
        return (f"{rate}captured {s.frames_in}, decided {s.frames_out} ({s.errors} errors{http}), "
                f"dropped {sum(s.dropped.values())}, {incomplete}"
                f"reconnects {sum(s.reconnects.values())}, {latency}, queues "
                + " ".join(f"{k}={v}" for k, v in s.queues.items()) + sinks + parts)

    def _status(self, stop: threading.Event) -> None:
        every = self.config.status_every_s
        if every <= 0:
            return
        previous, since = self.stats(), time.monotonic()
        while not stop.wait(every):
            now = time.monotonic()
            log.info("status: %s", self.status_line(previous, now - since))
            previous, since = self.stats(), now
