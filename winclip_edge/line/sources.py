"""The built-in sources: cameras, video files, RTSP/HTTP streams, GStreamer pipelines (OpenCV VideoCapture)
and hot folders (watchdog), each feeding a bounded buffer (the Source protocol of plugins.py).

Source specs (``serve --source``): ``0`` (camera index), ``part.avi`` (video file), ``rtsp://...`` /
``http://...`` (stream), ``gst:<pipeline ending in appsink>`` (GStreamer), ``folder:DIR`` (hot folder);
:data:`BUILTIN_SOURCES` registers them (registry.py adds the entry points of other packages).
Camera-like sources (camera, stream, gst) keep only the newest frames when the engine falls behind
(``drop="oldest"``, counted); finite sources (video files, folders) never drop: they wait.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2

from ..fileio import fsync_dir, sha256_file
from ..preprocess import IMAGE_EXTENSIONS
from .frames import Frame, FrameBuffer, SourceError
from .plugins import SourcePlugin

__all__ = ["BUILTIN_SOURCES", "DROP_POLICIES", "FolderOptions", "FolderSource", "Frame", "FrameBuffer", "SourceError",
           "VideoOptions", "VideoSource", "gstreamer_available", "source_kind"]

log = logging.getLogger("winclip_edge.line")

LINE_EXTRA = 'pip install "winclip-edge[line]"'
LIVE_KINDS = frozenset({"camera", "stream", "gstreamer"})
DROP_POLICIES = ("oldest", "none")
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class VideoOptions:
    """Capture settings of a video-like source."""

    fps_limit: float = 0.0  # at most this many frames/s (0 = all): live sources skip, video files are paced
    every_nth: int = 1  # keep frames 0, n, 2n, ... of the capture
    loop: bool = False  # a video file starts again when it ends
    drop: str = "oldest"  # live sources: "oldest" keeps the newest frames when the engine falls behind
    buffer: int = 8  # frames waiting for the engine, per source
    reconnect_min_s: float = 0.5  # back-off after a failed open/read, doubled up to reconnect_max_s
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise SourceError(f"--buffer must be >= 1, got {self.buffer}")
        if self.drop not in DROP_POLICIES:
            raise SourceError(f"--drop must be one of {DROP_POLICIES}, got {self.drop!r}")
        if self.every_nth < 1:
            raise SourceError(f"--every-nth must be >= 1, got {self.every_nth}")
        if self.fps_limit < 0 or not math.isfinite(self.fps_limit):
            raise SourceError(f"--fps-limit must be >= 0, got {self.fps_limit}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise SourceError(f"--reconnect-max-s must be at least the first back-off ({self.reconnect_min_s} s), "
                              f"got {self.reconnect_max_s}")


def source_kind(spec: str) -> tuple[str, str]:
    """``(kind, target)`` of a source spec: camera | stream | gstreamer | video | folder."""
    if spec.startswith("folder:"):
        return "folder", spec[len("folder:"):]
    if spec.startswith("gst:"):
        return "gstreamer", spec[len("gst:"):]
    if spec.isdigit():
        return "camera", spec
    if "://" in spec:
        return "stream", spec
    return "video", spec


def gstreamer_available() -> bool:
    return re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()) is not None


def default_capture(target: str | int, api: int | None) -> Any:
    return cv2.VideoCapture(target) if api is None else cv2.VideoCapture(target, api)


class VideoSource:
    """A VideoCapture in its own thread: camera, video file, stream or GStreamer pipeline.

    Live sources reconnect with back-off when opening or reading fails (counted in ``reconnects``, logged);
    a video file ends the source when exhausted (or starts again with ``loop``)."""

    def __init__(self, spec: str, name: str, options: VideoOptions = VideoOptions(),
                 capture_factory: Callable[[Any, int | None], Any] = default_capture):
        self.kind, self.target = source_kind(spec)
        if self.kind == "folder":
            raise SourceError(f"{spec}: a folder is a FolderSource")
        self.name, self.options, self._factory = name, options, capture_factory
        self.finite = self.kind == "video"
        self.buffer = FrameBuffer(options.buffer, drop_oldest=not self.finite and options.drop == "oldest")
        self.captured = 0  # frames read from the capture
        self.emitted = 0  # frames passed to the buffer (after every_nth / fps_limit)
        self.reconnects = 0
        self.error: str | None = None  # why a video file stopped early
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"winclip-source-{name}", daemon=True)

    def check(self) -> None:
        """Refuse a video file that does not exist or does not open, and GStreamer pipelines when this OpenCV was
        built without GStreamer (live sources may come later: they are not opened here)."""
        if self.kind == "gstreamer" and not gstreamer_available():
            raise SourceError("gst: sources need an OpenCV built with GStreamer (on Jetson: JetPack's python3-opencv, "
                              "not the opencv-python wheel); this one reports 'GStreamer: NO' in cv2.getBuildInformation()")
        if self.kind != "video":
            return
        if not Path(self.target).is_file():
            raise SourceError(f"{self.target}: no such video file (a camera is an index like 0, a stream a URL, "
                              "a GStreamer pipeline starts with gst:, a hot folder with folder:)")
        capture = self._open()
        try:
            if not capture.isOpened():
                raise SourceError(f"{self.target}: OpenCV cannot open this video (unknown container or codec)")
        finally:
            capture.release()

    def _open(self) -> Any:
        if self.kind == "camera":
            return self._factory(int(self.target), None)
        return self._factory(self.target, cv2.CAP_GSTREAMER if self.kind == "gstreamer" else None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop capturing; frames already buffered are still inspected."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _backoff(self, delay: float, why: str) -> float:
        self.reconnects += 1
        log.warning("source %s: %s; reconnecting in %.1f s (reconnect #%d)", self.name, why, delay, self.reconnects)
        self._stop.wait(delay)
        return min(delay * 2, self.options.reconnect_max_s)

    def _run(self) -> None:
        opts = self.options
        delay = opts.reconnect_min_s
        period = 1.0 / opts.fps_limit if opts.fps_limit else 0.0
        last = -math.inf
        try:
            while not self._stop.is_set():
                capture = self._open()
                if not capture.isOpened():
                    capture.release()
                    if self.finite:
                        self.error = f"{self.target}: OpenCV cannot open this video"
                        log.error("source %s: %s", self.name, self.error)
                        return
                    delay = self._backoff(delay, f"cannot open {self.target}")
                    continue
                got = 0
                try:
                    while not self._stop.is_set():
                        ok, bgr = capture.read()
                        if not ok or bgr is None:
                            break
                        got += 1
                        delay = opts.reconnect_min_s
                        index = self.captured
                        self.captured += 1
                        if index % opts.every_nth:
                            continue
                        now = time.monotonic()
                        if period and now - last < period:
                            if not self.finite:
                                continue  # a live source skips frames above the limit
                            self._stop.wait(last + period - now)  # a file is replayed at the limit
                        last = time.monotonic()
                        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                        frame = Frame(self.name, index, time.time(), time.monotonic(), image=rgb)
                        if not self.buffer.put(frame):
                            return
                        self.emitted += 1
                finally:
                    capture.release()
                if self._stop.is_set():
                    return
                if self.finite:
                    if opts.loop and got:
                        continue
                    log.info("source %s: end of %s after %d frames", self.name, self.target, self.captured)
                    return
                delay = self._backoff(delay, "the stream stopped delivering frames" if got else f"no frame from {self.target}")
        finally:
            self.buffer.close()


@dataclass(frozen=True)
class FolderOptions:
    """Settings of a hot folder."""

    settle_s: float = 1.0  # a file written in place is complete when its size and mtime stayed this long
    ignore_existing: bool = False  # skip the files already there at start
    buffer: int = 8  # files waiting for the engine
    rescan_s: float = 5.0  # a full listing this often catches what watchdog's events missed

    def __post_init__(self) -> None:
        if self.settle_s < 0 or not math.isfinite(self.settle_s):
            raise SourceError(f"--settle-s must be >= 0, got {self.settle_s}")
        if self.buffer < 1:
            raise SourceError(f"--buffer must be >= 1, got {self.buffer}")
        if not self.rescan_s > 0:
            raise SourceError(f"rescan_s must be > 0, got {self.rescan_s}")


class FolderSource:
    """A hot folder: image files that appear in ``folder`` are inspected once, then moved to ``done/`` or
    ``failed/`` by :meth:`finish` (the station calls it after the result row is on disk).

    A file is taken when it was moved in (rename: complete by construction) or when its size and mtime
    stayed the same for ``settle_s`` seconds. watchdog reports changes; a rescan every ``rescan_s``
    seconds catches what an overflowing event queue missed."""

    def __init__(self, folder: str | os.PathLike, name: str, settle_s: float = 1.0, ignore_existing: bool = False,
                 buffer: int = 8, rescan_s: float = 5.0):
        self.kind, self.finite = "folder", False
        self.folder = Path(folder).resolve()
        self.name, self.settle_s, self.rescan_s = name, settle_s, rescan_s
        self.ignore_existing = ignore_existing
        self.buffer = FrameBuffer(buffer, drop_oldest=False)
        self.done_dir, self.failed_dir = self.folder / DONE, self.folder / FAILED
        self.captured = self.emitted = self.recovered = 0
        self.reconnects = 0
        self._candidates: dict[str, tuple[int, int, float, bool]] = {}  # path -> size, mtime_ns, since, moved in
        self._taken: set[str] = set()  # in the buffer or being inspected
        self._ignored: set[str] = set()
        self._reserved: set[str] = set()  # destinations named in a row, not yet moved
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Any = None
        self._thread = threading.Thread(target=self._run, name=f"winclip-source-{name}", daemon=True)

    def check(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder}: no such folder for folder: source")
        if self.settle_s < 0:
            raise SourceError(f"--settle-s must be >= 0, got {self.settle_s}")

    def _wanted(self, path: Path) -> bool:
        return (path.parent == self.folder and path.suffix.lower() in IMAGE_EXTENSIONS
                and not path.name.startswith(".") and path.is_file())

    def _listing(self) -> list[Path]:
        return sorted((p for p in self.folder.iterdir() if self._wanted(p)), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def recover(self, already: Callable[[str, str], list[str]]) -> None:
        """Before starting: a file whose row was written by an earlier run but which was not moved yet is
        moved now, without a second row. ``already(path, sha256)`` lists the destinations rows named."""
        self.done_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)
        for path in self._listing():
            try:
                destinations = already(str(path), sha256_file(path))
            except OSError:  # vanished or unreadable: the scan will find it (or not) again
                continue
            pending = [d for d in destinations if not Path(d).exists()]
            if pending:
                self._move(str(path), pending[0])
                self.recovered += 1
                log.info("source %s: %s already has a result row; moved to %s", self.name, path.name, pending[0])
            elif self.ignore_existing:
                self._ignored.add(str(path))

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        source = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event: Any) -> None:
                source._note(event.src_path, moved_in=False)

            def on_modified(self, event: Any) -> None:
                source._note(event.src_path, moved_in=False)

            def on_moved(self, event: Any) -> None:
                source._note(event.dest_path, moved_in=True)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.folder), recursive=False)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _note(self, path: str | bytes, moved_in: bool) -> None:
        path = os.fsdecode(path)
        if Path(path).parent != self.folder or Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            return
        with self._lock:
            if path in self._taken or path in self._ignored:
                return
            old = self._candidates.get(path)
            self._candidates[path] = (-1, -1, time.monotonic(), moved_in or (old is not None and old[3]))

    def _ready(self) -> list[str]:
        """Candidates that are complete now (moved in, or unchanged for settle_s)."""
        now, ready = time.monotonic(), []
        with self._lock:
            for path, (size, mtime, since, moved_in) in list(self._candidates.items()):
                try:
                    st = os.stat(path)
                except OSError:
                    del self._candidates[path]  # gone (moved away or deleted)
                    continue
                if moved_in or ((st.st_size, st.st_mtime_ns) == (size, mtime) and now - since >= self.settle_s):
                    del self._candidates[path]
                    self._taken.add(path)
                    ready.append(path)
                elif (st.st_size, st.st_mtime_ns) != (size, mtime):
                    self._candidates[path] = (st.st_size, st.st_mtime_ns, now, False)
        return ready

    def _rescan(self) -> None:
        for path in self._listing():
            self._note(str(path), moved_in=False)

    def _run(self) -> None:
        tick = max(min(self.settle_s / 4, 0.25), 0.02)
        next_scan = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_scan:
                    self._rescan()
                    next_scan = time.monotonic() + self.rescan_s
                for path in self._ready():
                    try:
                        sha = sha256_file(path)
                    except OSError as err:  # vanished or unreadable: the inspection will say so in its row
                        sha = None
                        log.warning("source %s: cannot hash %s (%s)", self.name, path, err)
                    self.captured += 1
                    frame = Frame(self.name, self.emitted, time.time(), time.monotonic(), path=path, sha256=sha)
                    if not self.buffer.put(frame):
                        return
                    self.emitted += 1
                self._stop.wait(tick)
        finally:
            if self._observer is not None:
                self._observer.stop()
            self.buffer.close()

    def destination(self, frame: Frame, failed: bool) -> str:
        """A free path in done/ or failed/ for ``frame``'s file (named in its row before the move)."""
        folder = self.failed_dir if failed else self.done_dir
        src = Path(frame.path)
        with self._lock:
            n = 1
            while True:
                candidate = folder / (src.name if n == 1 else f"{src.stem}-{n}{src.suffix}")
                if str(candidate) not in self._reserved and not candidate.exists():
                    self._reserved.add(str(candidate))
                    return str(candidate)
                n += 1

    def finish(self, frame: Frame, destination: str) -> None:
        """Move the inspected file to ``destination`` (its row is already durable)."""
        try:
            self._move(frame.path, destination)
        except OSError as err:  # it stays where it is, never inspected again in this run
            log.error("source %s: cannot move %s to %s (%s); its row is written, the file stays", self.name,
                      frame.path, destination, err)
            with self._lock:
                self._ignored.add(frame.path)
        with self._lock:
            self._reserved.discard(destination)
            self._taken.discard(frame.path)

    def _move(self, path: str, destination: str) -> None:
        os.replace(path, destination)
        fsync_dir(Path(destination).parent)
        fsync_dir(self.folder)


# ---------------------------------------------------------------- the built-in kinds (registry.py)
def _video(name: str, target: str, options: VideoOptions) -> VideoSource:
    return VideoSource(target, name, options)


BUILTIN_SOURCES = (
    SourcePlugin("folder", "folder:", FolderOptions,
                 lambda name, target, o: FolderSource(target, name, settle_s=o.settle_s,
                                                      ignore_existing=o.ignore_existing, buffer=o.buffer,
                                                      rescan_s=o.rescan_s),
                 default_name=lambda target, i: Path(target).name or "folder", requires=("watchdog",),
                 install=LINE_EXTRA),
    SourcePlugin("gstreamer", "gst:", VideoOptions, lambda name, target, o: VideoSource("gst:" + target, name, o)),
    SourcePlugin("camera", None, VideoOptions, _video, default_name=lambda target, i: f"camera{target}",
                 matches=str.isdigit),
    SourcePlugin("stream", None, VideoOptions, _video, matches=lambda spec: "://" in spec),
    SourcePlugin("video", None, VideoOptions, _video, default_name=lambda target, i: Path(target).stem,
                 matches=lambda spec: True),
)
