"""The line runtime's parts in one process: spool, buffers, sources with fake captures, sinks, the station's
crash recovery and delivery order (the real-process tests are in test_serve.py)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest

from conftest import free_port, textured_part, wait_for
from winclip_edge.fileio import sha256_file
from winclip_edge.inspector import Inspector
from winclip_edge.batcher import Batcher
from winclip_edge.rows import SCHEMA, ModelIds, ResultRow, utc_iso
from winclip_edge.line.sinks import SpooledSink, WebhookSink
from winclip_edge.line.sources import FolderSource, Frame, FrameBuffer, SourceError, VideoOptions, VideoSource, \
    gstreamer_available, source_kind
from winclip_edge.line.spool import Spool
from winclip_edge.line.station import Station, StationBusy, StationConfig, moved_rows, results_files

PAYLOAD_FIELDS = {"schema", "id", "station", "product", "source", "frame", "file", "file_sha256", "captured_at",
                  "score", "anomalous", "threshold", "mode", "model", "weights_id", "memory_id", "threshold_id",
                  "version", "latency_ms", "overlay", "map", "error",
                  "zero_shot_score", "image_size", "timings_ms", "moved_to",  # result/2: results.jsonl's extras, everywhere
                  "camera_frame_id", "camera_timestamp_ns",  # genicam: sources (null elsewhere)
                  "part_id", "decision", "accept", "job_id", "meas_id", "triggered_by", "triggered_at", "deadline_at",
                  "decided_at", "late_for", "views", "overlay_url"}  # result/2: the triggered parts' fields


# ---------------------------------------------------------------- spool and buffers
def test_spool_keeps_order_across_restarts_and_counts_overflow(tmp_path):
    spool = Spool(tmp_path / "s", max_messages=3)
    assert [spool.put(f"m{i}".encode()) for i in range(4)] == [0, 1, 2, None]
    assert spool.overflow == 1 and len(spool) == 3
    seq, message = spool.peek()
    assert (seq, message) == (0, b"m0")
    spool.pop(seq)
    spool.pop(5)  # not the oldest: ignored
    again = Spool(tmp_path / "s", max_messages=3)  # a restart sees what was left, in order, and keeps counting
    assert again.recovered == 2 and again.peek() == (1, b"m1")
    assert again.put(b"m4") == 3
    got = []
    while (item := again.peek()) is not None:
        got.append(item[1])
        again.pop(item[0])
    assert got == [b"m1", b"m2", b"m4"] and not list((tmp_path / "s").iterdir())


def test_frame_buffer_drops_oldest_or_waits():
    frames = [Frame("s", i, 0.0, 0.0) for i in range(5)]
    dropping = FrameBuffer(2, drop_oldest=True)
    for f in frames:
        assert dropping.put(f)
    assert dropping.dropped == 3 and [dropping.get().index, dropping.get().index] == [3, 4]
    waiting = FrameBuffer(1, drop_oldest=False)
    waiting.put(frames[0])
    took = []
    t = threading.Thread(target=lambda: took.append(waiting.put(frames[1])))
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and waiting.dropped == 0  # full: the producer waits
    assert waiting.get().index == 0
    t.join(5)
    assert took == [True] and waiting.get().index == 1
    waiting.close()
    assert waiting.get() is None and not waiting.put(frames[2])


def test_source_specs():
    assert source_kind("0") == ("camera", "0")
    assert source_kind("rtsp://u:p@cam/1") == ("stream", "rtsp://u:p@cam/1")
    assert source_kind("gst:videotestsrc ! appsink") == ("gstreamer", "videotestsrc ! appsink")
    assert source_kind("folder:/in") == ("folder", "/in")
    assert source_kind("line.avi") == ("video", "line.avi")
    with pytest.raises(SourceError, match="no such video file"):
        VideoSource("missing.avi", "v").check()
    with pytest.raises(SourceError, match="--drop"):
        VideoOptions(drop="newest")
    if not gstreamer_available():  # pip's OpenCV: a clear refusal instead of endless reconnects
        with pytest.raises(SourceError, match="GStreamer"):
            VideoSource("gst:videotestsrc ! appsink", "g").check()


# ---------------------------------------------------------------- fake captures
class FakeCapture:
    def __init__(self, frames=(), opened=True):
        self.frames, self.opened = list(frames), opened

    def isOpened(self):
        return self.opened

    def read(self):
        return (True, self.frames.pop(0)) if self.frames else (False, None)

    def release(self):
        pass


class ScriptedFactory:
    """Hands out the given captures in order, then captures that do not open."""

    def __init__(self, captures):
        self.captures = list(captures)
        self.opened = 0

    def __call__(self, target, api):
        self.opened += 1
        return self.captures.pop(0) if self.captures else FakeCapture(opened=False)


def bgr_frames(n, seed=0):
    return [cv2.cvtColor(textured_part((96, 128), seed=seed + i), cv2.COLOR_RGB2BGR) for i in range(n)]


class SlowEngine:
    def __init__(self, engine, delay):
        self.engine, self.delay = engine, delay
        self.name, self.device = engine.name, engine.device

    def run(self, images):
        time.sleep(self.delay)
        return self.engine.run(images)

    def close(self):
        pass


@pytest.fixture(scope="module")
def inspector(tiny_bundle):
    inspector = Inspector(tiny_bundle, "widget")
    yield inspector
    inspector.close()


def run_station(station, done, timeout=60.0):
    """Run ``station`` in a thread until ``done()``; returns once it stopped."""
    stop = threading.Event()
    t = threading.Thread(target=station.run, args=(stop,))
    t.start()
    try:
        wait_for(done, timeout, "the station")
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()


def rows_of(out):
    rows = []
    for path in results_files(Path(out)):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # the line a test cut on purpose
    return rows


def test_stream_that_fails_and_comes_back_is_reconnected_and_scored_like_inspect(inspector, tmp_path):
    first, second = bgr_frames(4), bgr_frames(3, seed=10)
    factory = ScriptedFactory([FakeCapture(opened=False), FakeCapture(opened=False), FakeCapture(first),
                               FakeCapture(second)])
    source = VideoSource("rtsp://camera/line", "cam", VideoOptions(reconnect_min_s=0.01, reconnect_max_s=0.02, drop="none"),
                         capture_factory=factory)
    with Batcher(inspector, max_batch=1) as batcher:
        station = Station(StationConfig(station="s1", save="none", status_every_s=0), tmp_path / "out", batcher, [source])
        run_station(station, lambda: station.stats().frames_out == 7)
    # opens: fail, fail, 4 frames then the read fails, 3 frames then it fails again, ... -> counted reconnects
    assert source.reconnects >= 3 and station.stats().reconnects == {"cam": source.reconnects}
    rows = rows_of(tmp_path / "out")
    assert [r["frame"] for r in rows] == list(range(7)) and all(r["source"] == "cam" for r in rows)
    expected = inspector.inspect([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in first + second], batch_size=1)
    assert [r["score"] for r in rows] == [e.score for e in expected]  # bit-identical to Inspector.inspect
    assert set(rows[0]) >= PAYLOAD_FIELDS and rows[0]["schema"] == SCHEMA and rows[0]["station"] == "s1"


def test_drop_oldest_when_the_engine_is_slower_than_the_camera(inspector, tmp_path):
    n = 40
    factory = ScriptedFactory([FakeCapture(bgr_frames(n))])
    source = VideoSource("0", "cam", VideoOptions(buffer=2, reconnect_min_s=0.05, reconnect_max_s=0.1),
                         capture_factory=factory)
    original = inspector.engine
    inspector.engine = SlowEngine(original, 0.1)
    try:
        with Batcher(inspector, max_batch=1, queue_size=1) as batcher:
            station = Station(StationConfig(save="none", status_every_s=0), tmp_path / "out", batcher, [source])
            run_station(station, lambda: source.captured == n and station.stats().frames_out + source.buffer.dropped == n
                        and len(source.buffer) == 0)
    finally:
        inspector.engine = original
    frames = [r["frame"] for r in rows_of(tmp_path / "out")]
    stats = station.stats()
    assert stats.dropped["cam"] > 0 and stats.frames_out + stats.dropped["cam"] == n  # every frame: decided or counted
    assert frames == sorted(frames) and frames[-1] == n - 1  # the newest frame is never the one dropped


def test_video_file_never_drops_and_paces_with_every_nth(inspector, tmp_path):
    factory = ScriptedFactory([FakeCapture(bgr_frames(9))])
    source = VideoSource(__file__, "vid", VideoOptions(every_nth=2, buffer=1), capture_factory=factory)
    assert source.finite
    original = inspector.engine
    inspector.engine = SlowEngine(original, 0.02)
    try:
        with Batcher(inspector, max_batch=1, queue_size=1) as batcher:
            station = Station(StationConfig(save="none", status_every_s=0), tmp_path / "out", batcher, [source])
            station.run(threading.Event())  # returns by itself: the file ended
    finally:
        inspector.engine = original
    assert [r["frame"] for r in rows_of(tmp_path / "out")] == [0, 2, 4, 6, 8] and source.buffer.dropped == 0


def test_video_file_loop_starts_again_and_keeps_counting(inspector, tmp_path):
    factory = ScriptedFactory([FakeCapture(bgr_frames(3)), FakeCapture(bgr_frames(3))])  # then it no longer opens
    source = VideoSource(__file__, "vid", VideoOptions(loop=True), capture_factory=factory)
    with Batcher(inspector) as batcher:
        Station(StationConfig(save="none", status_every_s=0), tmp_path / "out", batcher, [source]).run(threading.Event())
    assert [r["frame"] for r in rows_of(tmp_path / "out")] == list(range(6)) and factory.opened == 3
    assert "cannot open" in source.error


# ---------------------------------------------------------------- hot folder recovery
def write_png(path, seed):
    cv2.imwrite(str(path), cv2.cvtColor(textured_part((64, 64), seed=seed), cv2.COLOR_RGB2BGR))


def test_folder_restart_moves_a_file_whose_row_exists_without_a_second_row(inspector, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    (inbox / "done").mkdir(parents=True)
    out.mkdir()
    for name, seed in (("crashed.png", 1), ("fresh.png", 2), ("again.png", 3)):
        write_png(inbox / name, seed)
    write_png(inbox / "done" / "again.png", 3)  # inspected and moved before: a re-delivery gets a new row
    folder = str(inbox.resolve())
    old_rows = [{"file": f"{folder}/crashed.png", "file_sha256": sha256_file(inbox / "crashed.png"),
                 "moved_to": f"{folder}/done/crashed.png", "score": 0.5},
                {"file": f"{folder}/again.png", "file_sha256": sha256_file(inbox / "again.png"),
                 "moved_to": f"{folder}/done/again.png", "score": 0.5}]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows) + '{"cut by a cra')
    source = FolderSource(inbox, "in", settle_s=0.05)
    with Batcher(inspector) as batcher:
        station = Station(StationConfig(save="none", status_every_s=0), out, batcher, [source])
        run_station(station, lambda: station.stats().frames_out == 2)
    assert source.recovered == 1
    rows = rows_of(out)
    new = [r for r in rows if "schema" in r]
    assert sorted(Path(r["file"]).name for r in new) == ["again.png", "fresh.png"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["again-2.png", "again.png", "crashed.png", "fresh.png"]
    assert not list(inbox.glob("*.png"))
    assert all(Path(r["moved_to"]).is_file() for r in new)
    assert (out / "results.jsonl").read_text().count("\n") == 5  # the cut line was closed, nothing glued to it
    assert len(moved_rows(out)) == 3


def test_one_station_per_output_folder(inspector, tmp_path):
    with Batcher(inspector) as batcher:
        first = Station(StationConfig(status_every_s=0), tmp_path / "out", batcher, [])
        with pytest.raises(StationBusy, match="another running"):
            Station(StationConfig(status_every_s=0), tmp_path / "out", batcher, [])
        first.run(threading.Event())  # no sources: ends at once, releases the folder
        Station(StationConfig(status_every_s=0), tmp_path / "out", batcher, []).run(threading.Event())


def test_results_rotate_by_size_and_are_never_truncated(inspector, tmp_path):
    factory = ScriptedFactory([FakeCapture(bgr_frames(6))])
    source = VideoSource(__file__, "vid", capture_factory=factory)
    with Batcher(inspector) as batcher:
        station = Station(StationConfig(save="none", status_every_s=0, rotate_mb=1500 / 2**20), tmp_path / "out",
                          batcher, [source])
        station.run(threading.Event())
    files = results_files(tmp_path / "out")
    assert len(files) >= 3 and files[0].name == "results.1.jsonl"
    assert [r["frame"] for r in rows_of(tmp_path / "out")] == list(range(6))


# ---------------------------------------------------------------- sinks
class Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_down_then_up_delivers_everything_in_order(tmp_path):
    port = free_port()
    sink = SpooledSink(WebhookSink(f"http://127.0.0.1:{port}/hook"), Spool(tmp_path / "spool", 100),
                       retry_min_s=0.05, retry_max_s=0.2)
    for i in range(5):
        assert sink.put({"id": str(i)})
    wait_for(lambda: sink.failures >= 2, 30, "failed attempts")
    assert sink.stats().pending == 5 and not sink.stats().up
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sink.put({"id": "5"})
        wait_for(lambda: len(Receiver.received) == 6, 30, "deliveries")
        sink.close(5)
    finally:
        server.shutdown()
        server.server_close()
    assert [m["id"] for m in Receiver.received] == [str(i) for i in range(6)]
    assert sink.stats().pending == 0 and sink.stats().delivered == 6


def test_payload_schema(inspector):
    [result] = inspector.inspect([textured_part((64, 64))])
    message = ResultRow.of(result, ModelIds.of(inspector), 0.5, 12.3456, station="st", source="cam", frame=3).as_dict()
    assert set(message) == PAYLOAD_FIELDS
    assert message["captured_at"] == "1970-01-01T00:00:00.500Z" == utc_iso(0.5)
    assert message["weights_id"] == inspector.bundle.manifest.weights_id and message["latency_ms"] == 12.346
    assert message["frame"] == 3 and message["file"] is None and message["score"] == result.score
    json.dumps(message)  # plain JSON


def test_iter_inspect_takes_an_endless_stream_reading_one_batch_ahead(inspector):
    images = [textured_part((64, 80), seed=i) for i in range(4)]
    pulled = []

    def camera():
        i = 0
        while True:  # never ends, like a camera
            pulled.append(i)
            yield images[i % 4]
            i += 1

    results = [r for _, r in zip(range(4), inspector.iter_inspect(camera(), batch_size=2))]
    assert len(pulled) <= 4 + 2 * 2  # the batches in use plus one batch of look-ahead
    expected = inspector.inspect(images, batch_size=2)
    assert [r.score for r in results] == [e.score for e in expected]
