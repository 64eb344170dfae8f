"""Triggered parts in one station process (winclip_edge/line/parts.py, journal.py, station.py, controller.py): views
from hot folders, cameras and uploads; one row per part whose score is the max over its views and whose maps are
infer's; deadlines measured on the rows' own timestamps with a deliberately slow engine; a trigger storm beyond the
bound; the state machine following an engine that fails and recovers; recipes switched while frames flow; a restart
that finds parts in flight in the journal. The real-process tests (OPC UA, Modbus, SIGKILL) are in test_line_plc.py."""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import textured_part, wait_for
from test_genicam import fake_camera  # noqa: F401  (the fixture: Aravis's simulated camera on loopback)
from winclip_edge.catalog import Catalog
from winclip_edge.inspector import Inspector
from winclip_edge.batcher import Batcher
from winclip_edge.control import Command, ControlRefused, PartRefused, Trigger, VisionState
from winclip_edge.line.controller import StationController
from winclip_edge.line.journal import JOURNAL, PartJournal, Triggered
from winclip_edge.line.parts import PartsConfig
from winclip_edge.line.sources import FolderSource, VideoOptions, VideoSource
from winclip_edge.line.station import Station, StationConfig, results_files

pytest.importorskip("watchdog")


class SlowEngine:
    """The engine as it is, but ``delay`` seconds late per call (a test double; its numbers are the engine's)."""

    def __init__(self, engine, delay=0.0):
        self.engine, self.delay, self.fail = engine, delay, None
        self.name, self.device = engine.name, engine.device
        self.calls = 0

    def run(self, images):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail is not None:
            raise RuntimeError(self.fail)
        return self.engine.run(images)

    def close(self):
        pass


def epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def rows_of(out: Path) -> list[dict]:
    found = []
    for path in results_files(Path(out)):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def write_png(path: Path, seed: int, defect=None) -> np.ndarray:
    image = textured_part((96, 128), seed=seed, defect=defect)
    tmp = path.parent.parent / f".{path.parent.name}-{path.name}"
    cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    os.replace(tmp, path)  # moved in: complete at once
    return image


class Running:
    """A station running in a thread (stopped and joined on exit)."""

    def __init__(self, station: Station):
        self.station, self.stop = station, threading.Event()
        self.thread = threading.Thread(target=station.run, args=(self.stop,))

    def __enter__(self) -> "Running":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def inspector(tiny_bundle):
    inspector = Inspector(tiny_bundle, "widget")
    yield inspector
    inspector.close()


def folders(tmp_path: Path, *names: str) -> list[Path]:
    made = []
    for name in names:
        (tmp_path / "in" / name).mkdir(parents=True)
        made.append(tmp_path / "in" / name)
    return made


# ---------------------------------------------------------------- views and scores
def test_a_two_view_part_scores_the_max_over_its_views_with_infers_maps(inspector, tmp_path):
    top, side = folders(tmp_path, "top", "side")
    sources = [FolderSource(top, "top", settle_s=0.05), FolderSource(side, "side", settle_s=0.05)]
    config = StationConfig(station="s", save="all", status_every_s=0, parts=PartsConfig(continuous=False))
    with Batcher(inspector, max_batch=1) as batcher:
        station = Station(config, tmp_path / "out", batcher, sources)
        with Running(station):
            for part, seeds in (("4711", (1, 2)), ("4712", (3, 4))):
                station.trigger(Trigger(part_id=part, source="opcua", job_id=f"job-{part}"))
                write_png(top / f"{part}.png", seeds[0])
                write_png(side / f"{part}@side.png", seeds[1], defect=(30, 40, 30, 30) if part == "4712" else None)
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 2, 120, "two part rows")
    rows = {r["part_id"]: r for r in rows_of(tmp_path / "out")}
    assert sorted(rows) == ["4711", "4712"]
    for part, row in rows.items():
        files = [top / "done" / f"{part}.png", side / "done" / f"{part}@side.png"]
        expected = inspector.inspect([str(f) for f in files], batch_size=1)  # infer's path: the same files
        assert [v["view"] for v in row["views"]] == ["top", "side"]
        assert [v["score"] for v in row["views"]] == [e.score for e in expected]  # each view: infer's score
        assert row["score"] == max(e.score for e in expected)  # the part: the max over its views
        for view, e in zip(row["views"], expected):  # each view's map is kept, and it is infer's
            assert np.array_equal(np.load(view["map"]), e.anomaly_map)
            assert Path(view["moved_to"]).is_file() and Path(view["file"]).name == Path(view["moved_to"]).name
        best = int(np.argmax([e.score for e in expected]))
        assert row["map"] == row["views"][best]["map"] and row["source"] == ("top", "side")[best]
        assert (row["job_id"], row["triggered_by"], row["late_for"]) == (f"job-{part}", "opcua", None)
        assert row["decision"] is None and row["accept"] is False  # no threshold: no verdict, so the part is rejected
        assert epoch(row["triggered_at"]) <= epoch(row["decided_at"])
    assert not list(top.glob("*.png")) and not list(side.glob("*.png"))
    assert station.stats().parts["decided"] == 2


def test_a_file_named_for_no_part_is_its_own_part_and_a_repeat_is_a_late_row(inspector, tmp_path):
    [inbox] = folders(tmp_path, "inbox")
    config = StationConfig(station="s", save="none", status_every_s=0, parts=PartsConfig(continuous=False))
    with Batcher(inspector, max_batch=1) as batcher:
        station = Station(config, tmp_path / "out", batcher, [FolderSource(inbox, "inbox", settle_s=0.05)])
        with Running(station):
            write_png(inbox / "A-1.png", 5)
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 1 and station.tracker.get("A-1") is None, 60,
                     "the file's part")
            with pytest.raises(PartRefused, match="has its verdict already"):
                station.trigger(Trigger(part_id="A-1"))
            write_png(inbox / "A-1@again.png", 6)  # the same part again: recorded, linked, not a second verdict
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 2, 60, "the repeat")
    first, again = rows_of(tmp_path / "out")
    assert (first["part_id"], first["triggered_by"], first["late_for"]) == ("A-1", "folder", None)
    assert (again["part_id"], again["late_for"], again["accept"]) == ("A-1", first["id"], None)
    assert again["score"] is not None and Path(again["moved_to"]).is_file()
    assert (again["triggered_by"], again["triggered_at"]) == ("folder", first["triggered_at"])  # the trigger it answers


# ---------------------------------------------------------------- deadlines
def test_a_slow_engine_gives_the_fail_safe_at_the_deadline_and_the_late_result_linked(tiny_bundle, tmp_path):
    deadline_ms = 400
    slow = SlowEngine(Inspector(tiny_bundle, "widget").engine.engine, delay=1.0)
    inspector = Inspector(tiny_bundle, "widget", engine=slow)
    [inbox] = folders(tmp_path, "inbox")
    config = StationConfig(station="s", save="none", status_every_s=0,
                           parts=PartsConfig(deadline_ms=deadline_ms, continuous=False))
    with Batcher(inspector, max_batch=1) as batcher:
        station = Station(config, tmp_path / "out", batcher, [FolderSource(inbox, "inbox", settle_s=0.05)])
        with Running(station):
            for i in range(3):
                station.trigger(Trigger(part_id=f"p{i}"))
                write_png(inbox / f"p{i}.png", 10 + i)
                time.sleep(0.1)
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 6, 120, "fail-safes and late results")
    rows = rows_of(tmp_path / "out")
    timeouts = [r for r in rows if r["decision"] == "timeout"]
    late = [r for r in rows if r["late_for"] is not None]
    assert len(timeouts) == len(late) == 3
    for t in timeouts:
        at_deadline = (epoch(t["decided_at"]) - epoch(t["triggered_at"])) * 1e3
        assert abs(at_deadline - deadline_ms) <= 50, at_deadline  # the row's own times: published at the deadline
        assert epoch(t["deadline_at"]) == pytest.approx(epoch(t["triggered_at"]) + deadline_ms / 1e3, abs=2e-3)
        assert t["accept"] is False and t["score"] is None and "deadline 400 ms passed" in t["error"]
        [result] = [r for r in late if r["late_for"] == t["id"]]  # the late result, linked to its fail-safe
        assert result["part_id"] == t["part_id"] and result["score"] is not None and result["accept"] is None
        assert rows.index(result) > rows.index(t)  # written after it
    assert all(r["part_id"] for r in rows) and station.stats().parts["timeouts"] == 3
    expected = {f"p{i}": e.score for i, e in
                enumerate(Inspector(tiny_bundle, "widget").inspect([str(inbox / "done" / f"p{i}.png")
                                                                     for i in range(3)], batch_size=1))}
    assert {r["part_id"]: r["score"] for r in late} == expected  # the late result is still the real one


def test_on_timeout_pass_and_a_capture_that_never_comes(inspector, tmp_path):
    [inbox] = folders(tmp_path, "inbox")
    config = StationConfig(station="s", save="none", status_every_s=0,
                           parts=PartsConfig(deadline_ms=200, on_timeout="pass", capture_timeout_ms=600,
                                             continuous=False))
    with Batcher(inspector) as batcher:
        station = Station(config, tmp_path / "out", batcher, [FolderSource(inbox, "inbox", settle_s=0.05)])
        with Running(station):
            station.trigger(Trigger(part_id="lost"))
            wait_for(lambda: station.tracker.get("lost") is None, 30, "the part to close")
    [timeout] = rows_of(tmp_path / "out")  # no view came: the fail-safe is its row, and nothing is late
    assert (timeout["decision"], timeout["accept"]) == ("timeout", True)
    assert "waiting for view inbox" in timeout["error"]


def test_a_trigger_storm_beyond_the_bound_gives_counted_fail_safe_rows(tiny_bundle, tmp_path):
    slow = SlowEngine(Inspector(tiny_bundle, "widget").engine.engine, delay=0.3)
    inspector = Inspector(tiny_bundle, "widget", engine=slow)
    [inbox] = folders(tmp_path, "inbox")
    config = StationConfig(station="s", save="none", status_every_s=0,
                           parts=PartsConfig(deadline_ms=30000, max_pending=4, continuous=False))
    with Batcher(inspector, max_batch=1, queue_size=2) as batcher:
        station = Station(config, tmp_path / "out", batcher, [FolderSource(inbox, "inbox", settle_s=0.05)])
        with Running(station):
            for i in range(20):
                station.trigger(Trigger(part_id=str(i)))
            assert len(station.tracker.open_parts()) == 4  # never more than the bound in flight
            for i in range(20):
                write_png(inbox / f"{i}.png", i)
            wait_for(lambda: not list(inbox.glob("*.png")), 120, "every file")
    rows = rows_of(tmp_path / "out")
    live = [r for r in rows if r["late_for"] is None]
    assert sorted(r["part_id"] for r in live) == sorted(str(i) for i in range(20))  # one live row per part
    overflow = [r for r in live if r["decision"] == "timeout"]
    assert len(overflow) == 16 and all("max_pending" in r["error"] for r in overflow)
    assert {r["part_id"] for r in overflow} == {str(i) for i in range(4, 20)}
    assert station.stats().parts["overflow"] == 16
    late = [r for r in rows if r["late_for"] is not None]  # their files are recorded as late results
    assert sorted(r["part_id"] for r in late) == sorted(str(i) for i in range(4, 20))


# ---------------------------------------------------------------- the state machine and recipes
class Line:
    """What the controller reads of a LineStation, without the CLI (an engine injected in-process)."""

    def __init__(self, catalog, batchers, station, engine_watch):
        self.catalog, self.batchers, self.station, self.watch = catalog, batchers, station, engine_watch

    def probe(self):
        try:
            self.catalog.warm_up(1)
        except Exception:
            pass


@pytest.fixture(scope="module")
def two_products(make_bundle):
    return make_bundle(products=("widget", "bolt"))


def opcua_state(endpoint: str) -> tuple[str, str, str]:
    """(CurrentState, the automatic mode's CurrentState, StateReason) as asyncua's client reads them."""
    import asyncio

    from asyncua import Client

    from winclip_edge.line.opcua.server import NAMESPACE

    async def read():
        async with Client(endpoint, timeout=10) as client:
            idx = await client.get_namespace_index(NAMESPACE)
            machine = await client.nodes.objects.get_child([f"{idx}:VisionSystem", f"{idx}:VisionStateMachine"])
            auto = await machine.get_child([f"{idx}:AutomaticModeStateMachine"])
            return ((await (await machine.get_child(["0:CurrentState"])).read_value()).Text,
                    (await (await auto.get_child(["0:CurrentState"])).read_value()).Text,
                    await (await machine.get_child([f"{idx}:StateReason"])).read_value())

    return asyncio.run(asyncio.wait_for(read(), 60))


def test_engine_failure_is_error_with_the_reason_and_recovery_is_operational(two_products, tmp_path):
    pytest.importorskip("asyncua")
    from conftest import free_port
    from winclip_edge.line.health import watch
    from winclip_edge.line.opcua import OpcuaConfig, start_opcua

    flaky = SlowEngine(Inspector(two_products, "widget").engine.engine)
    catalog = Catalog(two_products, ["widget", "bolt"], engine=flaky)
    engine_watch = watch(catalog.engine)
    batchers = {p: Batcher(catalog.get(p), max_batch=1) for p in catalog.products}
    [inbox] = folders(tmp_path, "inbox")
    config = StationConfig(station="s", save="none", status_every_s=0, keep_running=True,
                           parts=PartsConfig(continuous=False))
    station = Station(config, tmp_path / "out", batchers["widget"], [FolderSource(inbox, "inbox", settle_s=0.05)],
                      batchers=batchers)
    controller = StationController()
    face = start_opcua(OpcuaConfig(port=free_port(), poll_s=0.05), controller)
    assert controller.state().state is VisionState.PREOPERATIONAL
    assert opcua_state(face.endpoint) == ("Preoperational", "", "loading the bundle and the engine")
    controller.attach(Line(catalog, batchers, station, engine_watch))
    with pytest.raises(ControlRefused, match="still loading"):
        controller.trigger(Trigger(part_id="x"))
    controller.running()
    try:
        with Running(station):
            assert controller.state().state is VisionState.READY
            wait_for(lambda: opcua_state(face.endpoint) == ("Operational", "Ready", ""), 30, "Ready over OPC UA")
            flaky.fail = "CUDA error: device lost"
            write_png(inbox / "f1.png", 1)
            wait_for(lambda: controller.state().state is VisionState.ERROR, 30, "Error")
            assert controller.state().reason == "engine failed: RuntimeError: CUDA error: device lost"
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 1, 30, "the failed part's row")
            assert controller.state().state is VisionState.ERROR  # until the engine works again
            wait_for(lambda: opcua_state(face.endpoint) == ("Error", "", "engine failed: RuntimeError: CUDA error: "
                                                                    "device lost"), 30, "Error over OPC UA")
            flaky.fail = None
            controller.command(Command.RESET, "operator")  # probes the engine at once
            assert controller.state().state is VisionState.READY
            wait_for(lambda: opcua_state(face.endpoint) == ("Operational", "Ready", ""), 30, "back over OPC UA")
            [row] = rows_of(tmp_path / "out")
            assert row["part_id"] == "f1" and row["decision"] is None and row["accept"] is False  # fail-safe
            assert "CUDA error" in row["error"]
            controller.command(Command.HALT, "shift end")
            assert controller.state().state is VisionState.HALTED
            with pytest.raises(ControlRefused, match="halted"):
                controller.trigger(Trigger(part_id="y"))
            controller.command(Command.RESET, "")
            controller.command(Command.START_CONTINUOUS, "")
            assert controller.state().state is VisionState.CONTINUOUS_EXECUTION
            controller.command(Command.STOP, "")
            controller.unprepare("widget")
            assert controller.state().state is VisionState.INITIALIZED
            with pytest.raises(ControlRefused, match="no recipe is prepared"):
                controller.trigger(Trigger(part_id="z"))
            with pytest.raises(KeyError):
                controller.prepare("nut")
            controller.prepare("bolt")
            assert [(r.id, r.prepared) for r in controller.recipes()] == [("widget", False), ("bolt", True)]
    finally:
        face.stop()
        for b in batchers.values():
            b.close()
        catalog.close()


def test_a_product_added_after_the_station_started_takes_part_uploads(two_products, tmp_path):
    """The HTTP face adds products to the batchers the station was given (POST /v1/products): the station serves
    them too (a fuzzed upload with a part id for a product added later was a 500)."""
    catalog = Catalog(two_products, ["widget", "bolt"])
    batchers = {"widget": Batcher(catalog.get("widget"), max_batch=1)}
    config = StationConfig(station="s", save="none", status_every_s=0, keep_running=True,
                           parts=PartsConfig(continuous=False, views=("http",)))
    station = Station(config, tmp_path / "out", batchers["widget"], [], batchers=batchers)
    image = textured_part((96, 128), seed=5, defect=(30, 30, 20, 20))
    try:
        with Running(station):
            batchers["bolt"] = Batcher(catalog.get("bolt"), max_batch=1)  # as service/app.py's add_product does
            row = station.upload("4711", "bolt", image, "up").result(60)
            with pytest.raises(KeyError, match="unknown product 'nut'"):
                station.upload("4712", "nut", image, "up")
        [expected] = catalog.get("bolt").inspect([image])
        assert row["product"] == "bolt" and row["part_id"] == "4711" and row["accept"] is not None
        assert row["score"] == pytest.approx(expected.score, abs=1e-6)
        assert [r["part_id"] for r in rows_of(tmp_path / "out")] == ["4711"]
    finally:
        for b in batchers.values():
            b.close()
        catalog.close()


def test_a_recipe_switched_while_frames_flow_loses_none_and_scores_each_with_one_product(two_products, tmp_path):
    from winclip_edge.line.health import watch

    frames = [textured_part((96, 128), seed=i) for i in range(30)]
    catalog = Catalog(two_products, ["widget", "bolt"])
    batchers = {p: Batcher(catalog.get(p), max_batch=2) for p in catalog.products}

    class Capture:
        def __init__(self):
            self.frames = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]

        def isOpened(self):
            return True

        def read(self):
            time.sleep(0.03)
            return (True, self.frames.pop(0)) if self.frames else (False, None)

        def release(self):
            pass

    source = VideoSource(__file__, "cam", VideoOptions(drop="none"), capture_factory=lambda target, api: Capture())
    station = Station(StationConfig(station="s", save="none", status_every_s=0), tmp_path / "out",
                      batchers["widget"], [source], batchers=batchers)
    controller = StationController()
    controller.attach(Line(catalog, batchers, station, watch(catalog.engine)))
    controller.running()
    try:
        switcher = threading.Thread(target=lambda: (wait_for(lambda: len(rows_of(tmp_path / "out")) >= 8, 60, "rows"),
                                                    controller.prepare("bolt")))
        switcher.start()
        station.run(threading.Event())  # the video ends: the run ends
        switcher.join(60)
    finally:
        for b in batchers.values():
            b.close()
        catalog.close()
    rows = rows_of(tmp_path / "out")
    assert [r["frame"] for r in rows] == list(range(30))  # none lost
    products = [r["product"] for r in rows]
    assert products[0] == "widget" and products[-1] == "bolt" and products == sorted(products, reverse=True)
    references = {p: Inspector(two_products, p).inspect(frames, batch_size=1) for p in ("widget", "bolt")}
    for r in rows:  # each frame wholly one product's: its score is that product's infer score
        assert r["score"] == pytest.approx(references[r["product"]][r["frame"]].score, abs=1e-6)


# ---------------------------------------------------------------- a restart with parts in flight
def test_a_restart_gives_each_journaled_part_one_row(inspector, tmp_path):
    [inbox] = folders(tmp_path, "inbox")
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    journal = PartJournal(out)
    for part, age, deadline in (("passed", 10, 2.0), ("waits", 0.1, 30.0), ("has-row", 5, 30.0),
                                ("decided", 5, 30.0), ("nodeadline", 0.1, None), ("spooled", 5, 2.0)):
        journal.triggered(Triggered(part, "widget", "opcua", f"job-{part}", "", now - age,
                                    None if deadline is None else now - age + deadline, ("inbox",)))
    journal.decided("decided", "f" * 32)
    journal.close()
    with open(out / JOURNAL, "a") as f:
        f.write('{"event": "trigger", "part_id": "cut by a cra')
    (out / "results.jsonl").write_text(json.dumps({"id": "e" * 32, "part_id": "has-row", "decision": "pass"}) + "\n")
    (out / "spool" / "mqtt").mkdir(parents=True)  # spooled, then the crash before results.jsonl: its verdict stands
    (out / "spool" / "mqtt" / "000000000007.json").write_text(json.dumps({"id": "d" * 32, "part_id": "spooled",
                                                                          "decision": "fail"}))
    config = StationConfig(station="s", save="none", status_every_s=0,
                           parts=PartsConfig(deadline_ms=30000, continuous=False))
    with Batcher(inspector) as batcher:
        station = Station(config, out, batcher, [FolderSource(inbox, "inbox", settle_s=0.05)])
        with Running(station):
            wait_for(lambda: len(rows_of(out)) == 3, 30, "the fail-safe of the part whose deadline passed")
            write_png(inbox / "waits.png", 1)  # the re-armed part's file arrives after the restart
            write_png(inbox / "nodeadline.png", 2)
            wait_for(lambda: len(rows_of(out)) == 5, 60, "the re-armed parts' rows")
            with pytest.raises(PartRefused, match="verdict already"):
                station.trigger(Trigger(part_id="decided"))
            with pytest.raises(PartRefused, match="verdict already"):
                station.trigger(Trigger(part_id="has-row"))
    rows = rows_of(out)[1:]
    by_part = {}
    for r in rows:
        by_part.setdefault(r["part_id"], []).append(r)
    assert sorted(by_part) == ["nodeadline", "passed", "spooled", "waits"] and all(len(v) == 1 for v in by_part.values())
    assert by_part["spooled"][0]["id"] == "d" * 32  # the spooled row, now in results.jsonl too: not a second verdict
    assert by_part["passed"][0]["decision"] == "timeout" and "restarted" in by_part["passed"][0]["error"]
    assert by_part["passed"][0]["job_id"] == "job-passed"
    assert by_part["waits"][0]["score"] is not None and by_part["waits"][0]["late_for"] is None
    recovered = PartJournal(out).recover()
    assert not recovered.open and {p for p, _ in recovered.decided} >= {"passed", "waits", "has-row", "decided",
                                                                         "spooled"}


# ---------------------------------------------------------------- a GenICam camera as a view
def _aravis_missing():
    from test_genicam import _aravis_missing as missing

    return missing()


@pytest.mark.skipif(_aravis_missing() is not None, reason=str(_aravis_missing()))
def test_a_software_triggered_camera_takes_one_frame_per_part_and_a_missed_frame_fails_its_part(
        inspector, tmp_path, fake_camera):  # noqa: F811
    from winclip_edge.line.genicam import GenicamOptions, GenicamSource, MissedPart

    fake = fake_camera()
    options = GenicamOptions(features={"Width": 96, "Height": 64, "TriggerMode": "On", "TriggerSource": "Software"})
    camera = GenicamSource(fake.serial, "cam", options)
    camera.check()
    config = StationConfig(station="s", save="all", status_every_s=0,
                           parts=PartsConfig(deadline_ms=20000, continuous=False))
    with Batcher(inspector, max_batch=1) as batcher:
        station = Station(config, tmp_path / "out", batcher, [camera])
        with Running(station):
            assert camera.connected.wait(30)
            for i in range(3):
                station.trigger(Trigger(part_id=f"cam-{i}"))  # the station fires the camera's software trigger
                wait_for(lambda: len(rows_of(tmp_path / "out")) == i + 1, 60, f"part cam-{i}")
            time.sleep(1.0)
            assert camera.captured == 3  # one frame per trigger, none free-running
            station._open_part("ghost", "widget", "opcua")  # in flight, its frame lost on the way:
            camera.on_missed(MissedPart("ghost", "frame 9 incomplete"))  # what the camera layer reports
            camera.on_missed(MissedPart("nobody", "frame 10 incomplete"))  # a part the station does not know
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 4, 30, "the missed part's row")
    rows = rows_of(tmp_path / "out")
    assert [r["part_id"] for r in rows] == ["cam-0", "cam-1", "cam-2", "ghost"]
    assert [r["views"][0]["frame"] for r in rows[:3]] == [0, 1, 2]  # the camera's frames, one per part, in order
    assert all(r["score"] is not None and np.load(r["map"]).shape == (64, 96) for r in rows[:3])
    ghost = rows[3]
    assert (ghost["decision"], ghost["accept"], ghost["late_for"]) == (None, False, None)  # rejected, fail-safe
    assert "view cam: frame 9 incomplete" in ghost["error"]




# ---------------------------------------------------------------- the flags and the station file
def test_serve_flags_give_the_parts_opcua_and_modbus_sections_and_refuse_bad_ones(tiny_bundle, tmp_path, capsys):
    import tomllib

    from winclip_edge.cli import main
    from winclip_edge.line.spec import load_spec

    base = ["serve", "--bundle", str(tiny_bundle), "--product", "widget", "--out", str(tmp_path / "out"),
            "--source", f"top=folder:{tmp_path}"]
    assert main(base + ["--triggered", "--view", "top", "--max-parts", "8", "--deadline-ms", "750", "--on-timeout",
                        "pass", "--opcua", "127.0.0.1:4841", "--modbus", "10.0.0.7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    table = tomllib.loads(printed)
    assert (table["deadline_ms"], table["on_timeout"]) == (750.0, "pass")
    assert (table["parts"]["continuous"], table["parts"]["views"], table["parts"]["max_pending"]) == (False, ["top"], 8)
    assert table["opcua"]["listen"] == "127.0.0.1:4841"
    assert (table["modbus"]["host"], table["modbus"]["port"]) == ("10.0.0.7", 502)
    (tmp_path / "s.toml").write_text(printed)
    spec = load_spec(tmp_path / "s.toml")
    assert spec.parts_config().capture_ms == 1500 and spec.modbus.config().map.accept_coil == 0
    for extra, message in ((["--view", "side"], "--view 'side' is not a source of this station"),
                           (["--deadline-ms", "0"], "--deadline-ms must be > 0"),
                           (["--opcua", "somewhere"], "--opcua 'somewhere': expected HOST:PORT"),
                           (["--modbus", "plc:99999"], "--modbus 'plc:99999': expected HOST:PORT")):
        assert main(base + extra + ["--print-config"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_hardware_triggered_camera_frame_without_an_announced_part_is_a_part_of_its_own(inspector, tmp_path):
    """A light barrier wired to the camera triggers it: the frame comes with no part the station announced."""
    from winclip_edge.line.frames import FrameBuffer
    from winclip_edge.line.genicam import CameraFrame

    class Camera:  # the GenicamSource interface as the station uses it, in hardware trigger mode
        kind, trigger_mode = "genicam", "hardware"

        def __init__(self):
            self.name, self.buffer, self.emitted, self.reconnects = "cam", FrameBuffer(8, drop_oldest=True), 0, 0
            self.on_missed, self.expected = None, []

        def check(self):
            pass

        def start(self):
            for i in range(3):
                self.buffer.put(CameraFrame("cam", i, time.time(), time.monotonic(), image=textured_part(seed=i),
                                            camera_frame_id=100 + i))
                self.emitted += 1

        def stop(self):
            self.buffer.close()

        def expect(self, part_id):
            self.expected.append(part_id)

    camera = Camera()
    config = StationConfig(station="s", save="none", status_every_s=0, parts=PartsConfig(continuous=False))
    with Batcher(inspector, max_batch=1) as batcher:
        station = Station(config, tmp_path / "out", batcher, [camera])
        assert camera.on_missed is not None  # the station listens for the camera's missed parts
        with Running(station):
            wait_for(lambda: len(rows_of(tmp_path / "out")) == 3, 60, "the camera's parts")
            station.trigger(Trigger(part_id="announced"))  # a trigger from the line: the camera is told to expect it
            assert camera.expected == ["announced"]
    rows = rows_of(tmp_path / "out")
    assert [(r["part_id"], r["triggered_by"]) for r in rows[:3]] == [(f"cam-{100 + i}", "camera") for i in range(3)]
    assert all(r["score"] is not None and r["late_for"] is None for r in rows[:3])
