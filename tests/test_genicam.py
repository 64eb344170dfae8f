"""GenICam cameras (winclip_edge/line/genicam.py) over the real protocol: Aravis's simulated GigE Vision camera
(``arv-fake-gv-camera-0.8``, Debian aravis-tools) on 127.0.0.1 — discovery and control over GVCP, frames over
GVSP. Skipped, saying why, only where Aravis or the fake camera is not installed."""
from __future__ import annotations

import fcntl
import json
import logging
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import Serve, free_port, wait_for

FAKE = shutil.which("arv-fake-gv-camera-0.8")
# One fake camera can listen on 127.0.0.1 (GVCP port 3956) at a time: test runs of this machine take turns.
LOCK = Path(tempfile.gettempdir()) / "winclip-edge-fake-gv-camera.lock"


def _aravis_missing() -> str | None:
    if FAKE is None:
        return "arv-fake-gv-camera-0.8 not installed (apt-get install aravis-tools)"
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis  # noqa: F401
    except (ImportError, ValueError) as err:
        return f"Aravis for Python not installed ({err}): apt-get install gir1.2-aravis-0.8; pip install PyGObject"
    return None


pytestmark = pytest.mark.skipif(_aravis_missing() is not None, reason=str(_aravis_missing()))


class FakeCamera:
    """arv-fake-gv-camera-0.8 on 127.0.0.1 with a serial number of its own, started and stopped by the test."""

    def __init__(self, folder: Path, lost_per_thousand: int = 0):
        self.serial = f"W{uuid.uuid4().hex[:8].upper()}"
        self.id = f"Aravis-Fake-{self.serial}"
        self.lost, self.log = lost_per_thousand, folder / f"fake-{self.serial}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "FakeCamera":
        from winclip_edge.line.genicam import list_cameras

        command = [FAKE, "-i", "127.0.0.1", "-s", self.serial] + (["-r", str(self.lost)] if self.lost else [])
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: self.process.poll() is not None or any(c.id == self.id for c in list_cameras()), 20,
                 "the fake camera to be discovered")
        assert self.process.poll() is None, self.log.read_text()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def fake_camera(tmp_path):
    """``fake_camera(lost_per_thousand=0)`` -> a started FakeCamera; all are stopped after the test."""
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{LOCK} held for 300 s by another test run")
                time.sleep(0.2)
        from winclip_edge.line.genicam import list_cameras

        others = [c for c in list_cameras() if c.address == "127.0.0.1"]
        if others:
            pytest.skip(f"another GigE Vision camera already answers on 127.0.0.1: {others[0].line()}")
        started: list[FakeCamera] = []

        def start(lost_per_thousand: int = 0) -> FakeCamera:
            camera = FakeCamera(tmp_path, lost_per_thousand)
            started.append(camera)
            return camera.start()

        try:
            yield start
        finally:
            for camera in started:
                camera.stop()
            time.sleep(0.2)


def grab_complete(camera, n: int, timeout: float = 20.0) -> list:
    grabs, deadline = [], time.monotonic() + timeout
    while len(grabs) < n:
        assert time.monotonic() < deadline, f"only {len(grabs)} of {n} complete frames"
        grab = camera.grab(0.5)
        if grab is not None and grab.complete:
            grabs.append(grab)
    return grabs


def test_discovery_lists_the_camera_and_finds_it_by_each_name(fake_camera, capsys):
    from winclip_edge.cli import main
    from winclip_edge.line.genicam import CameraNotFound, camera_target, find_camera, list_cameras

    fake = fake_camera()
    found = [c for c in list_cameras() if c.id == fake.id]
    assert len(found) == 1
    info = found[0]
    assert (info.serial, info.address, info.vendor, info.model, info.protocol) == \
        (fake.serial, "127.0.0.1", "Aravis", "Fake", "GigEVision")
    assert find_camera(fake.serial) == info
    for name in (fake.id, "127.0.0.1", fake.serial.lower()):
        assert find_camera(name, found) == info, name
    assert find_camera("").id  # the first camera found
    with pytest.raises(CameraNotFound, match=f"no such camera.*{fake.id}"):
        find_camera("NOPE-0")
    assert camera_target("genicam:127.0.0.1") == "127.0.0.1" and camera_target("genicam:") == ""

    assert main(["cameras"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith(fake.id + " ")] == [info.line()]
    assert sorted(lines) == sorted(c.line() for c in list_cameras())  # one line per camera, starting with its id
    assert main(["cameras", "--features", fake.serial]) == 0
    shown = capsys.readouterr().out
    assert "PixelFormat (enumeration, rw) = Mono8  [BayerBG8, BayerGB8, BayerGR8, BayerRG8, Mono8, RGB8, Mono16]" in shown
    assert "Width (integer, rw) = 512  [1..2048]" in shown and "TriggerSoftware (command, wo)" in shown
    assert main(["cameras", "--features", "NOPE-0"]) == 2
    assert "no such camera" in capsys.readouterr().err


def test_features_are_set_read_back_and_logged(fake_camera, caplog):
    from winclip_edge.line.genicam import GenicamCamera, GenicamOptions

    fake = fake_camera()
    features = {"PixelFormat": "BayerRG8", "Width": 320, "Height": 240, "OffsetX": 16, "OffsetY": 8,
                "ExposureTime": 5000, "AcquisitionFrameRate": 40.0, "GainRaw": 3}
    caplog.set_level(logging.INFO, logger="winclip_edge.line")
    camera = GenicamCamera(fake.serial, GenicamOptions(features=features))
    try:
        assert camera.trigger == "off" and camera.pixel_format == "BayerRG8"
        for name, value in features.items():
            assert camera.settings[name] == value, name
            assert camera.features.read(name) == value, name  # read again, from the camera
        assert camera.features.describe("ExposureTime").name == "ExposureTimeAbs"  # the GigE Vision 1.x name
        assert camera.settings["TriggerMode"] == "Off" and camera.settings["AcquisitionMode"] == "Continuous"
        logged = caplog.text
        assert f"camera {fake.id}: Width = 320" in logged and f"camera {fake.id}: ExposureTime = 5000.0" in logged
        camera.start()
        grab = grab_complete(camera, 1)[0]
        assert grab.image.shape == (240, 320, 3) and grab.pixel_format == "BayerRG8"
    finally:
        camera.close()


BAD_FEATURES = [
    ({"Gain": 3.0}, r"has no feature 'Gain' \(nor GainAbs\); did you mean GainRaw.*it offers: .*ExposureTimeAbs"),
    ({"Widht": 64}, r"no feature 'Widht'; did you mean Width"),
    ({"Width": 5000}, r"Width=5000 is out of range for camera Aravis-Fake-\w+: Width takes 1\.\.2048"),
    ({"ExposureTime": 1.0}, r"ExposureTime=1\.0 is out of range .*ExposureTimeAbs takes 10\.\.1e\+07"),
    ({"PixelFormat": "Mono12p"}, r"PixelFormat='Mono12p' is not offered .*one of BayerBG8, .*RGB8, Mono16"),
    ({"Width": "wide"}, r"Width='wide': Width takes 1\.\.2048 .*\(a number\)"),
    ({"Width": 64.5}, r"Width=64\.5: Width .* is an integer"),
    ({"TestBoolean": 1}, r"TestBoolean=1: TestBoolean .* is a boolean"),
    ({"SensorWidth": 100}, r"SensorWidth is read-only"),
    ({"TriggerSoftware": 1}, r"TriggerSoftware is a command"),
]


def test_an_unknown_feature_or_a_bad_value_names_it_and_what_the_camera_takes(fake_camera):
    from winclip_edge.line.genicam import CameraError, GenicamCamera, GenicamOptions

    fake = fake_camera()
    for features, message in BAD_FEATURES:
        with pytest.raises(CameraError, match=message):
            GenicamCamera(fake.id, GenicamOptions(features={"Width": 64, **features}))
    camera = GenicamCamera(fake.id, GenicamOptions(features={"Width": 64}))  # each failed one let go of the camera
    camera.close()


def test_options_refuse_an_incomplete_trigger_setup_before_opening_anything():
    from winclip_edge.line.genicam import CameraError, GenicamOptions

    with pytest.raises(CameraError, match="needs a TriggerSource"):
        GenicamOptions(features={"TriggerMode": "On"})
    with pytest.raises(CameraError, match="TriggerSelector=FrameStart"):
        GenicamOptions(features={"TriggerMode": "On", "TriggerSource": "Line0", "TriggerSelector": "AcquisitionStart"})
    assert GenicamOptions(features={"TriggerMode": "On", "TriggerSource": "Line0"}).trigger == "hardware"
    assert GenicamOptions(features=[("TriggerMode", "On"), ("TriggerSource", "Software")]).trigger == "software"


@pytest.mark.parametrize("pixel_format,packet_socket", [("Mono8", True), ("Mono8", False), ("BayerGB8", False),
                                                         ("RGB8", True), ("Mono16", False)])
def test_free_running_frames_are_complete_rgb_with_the_cameras_ids(fake_camera, pixel_format, packet_socket):
    from winclip_edge.line.genicam import GenicamCamera, GenicamOptions

    fake = fake_camera()
    camera = GenicamCamera(fake.id, GenicamOptions(features={"PixelFormat": pixel_format, "Width": 200, "Height": 120,
                                                             "AcquisitionFrameRate": 50.0},
                                                   packet_socket=packet_socket))
    try:
        arv = camera.arv
        assert camera._device.get_stream_options() == (arv.GvStreamOption.NONE if packet_socket
                                                       else arv.GvStreamOption.PACKET_SOCKET_DISABLED)
        camera.start()
        grabs = grab_complete(camera, 5)
    finally:
        camera.close()
    for g in grabs:
        assert g.image.dtype == np.uint8 and g.image.shape == (120, 200, 3) and g.pixel_format == pixel_format
        assert g.image.std() > 0  # the fake camera's moving pattern, not an empty buffer
    if pixel_format in ("Mono8", "Mono16"):
        assert all(np.array_equal(g.image[..., 0], g.image[..., 2]) for g in grabs)
    ids = [g.frame_id for g in grabs]
    assert all(b == a + 1 or (a == 65535 and b == 1) for a, b in zip(ids, ids[1:])), ids  # GigE Vision 1.x ids wrap
    stamps = [g.timestamp_ns for g in grabs]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_software_trigger_gives_exactly_one_frame_per_trigger_with_its_part(fake_camera):
    from winclip_edge.line.genicam import CameraError, GenicamOptions, GenicamSource

    fake = fake_camera()
    options = GenicamOptions(features={"Width": 96, "Height": 64, "TriggerMode": "On", "TriggerSource": "Software"})
    source = GenicamSource(fake.serial, "cam", options)
    source.check()
    source.start()
    try:
        assert source.connected.wait(20)
        time.sleep(1.0)
        assert source.captured == 0 and len(source.buffer) == 0  # no trigger, no frame
        frames = []
        for i in range(6):
            source.trigger(f"part-{i}")
            wait_for(lambda: len(source.buffer) == 1, 10, f"the frame of trigger {i}")
            frames.append(source.buffer.get())
        time.sleep(1.0)
        assert source.captured == 6 and len(source.buffer) == 0  # nothing more arrived
        assert [f.part_id for f in frames] == [f"part-{i}" for i in range(6)]
        assert [f.index for f in frames] == list(range(6)) and all(f.image.shape == (64, 96, 3) for f in frames)
        ids = [f.camera_frame_id for f in frames]
        assert len(set(ids)) == 6 and all(f.camera_timestamp_ns > 0 for f in frames)
        with pytest.raises(CameraError, match="hardware trigger"):
            source.expect("x")
    finally:
        source.stop()
        source.join(10)
    assert not source._thread.is_alive()


def test_hardware_trigger_waits_for_the_line_and_queues_announced_parts(fake_camera):
    from winclip_edge.line.genicam import CameraError, GenicamOptions, GenicamSource

    fake = fake_camera()
    options = GenicamOptions(features={"Width": 64, "Height": 48, "TriggerMode": "On", "TriggerSource": "Line0",
                                       "TriggerActivation": "RisingEdge"})
    source = GenicamSource(fake.id, "cam", options)
    source.check()
    source.start()
    try:
        assert source.connected.wait(20) and source.trigger_mode == "hardware"
        assert {k: source.settings[k] for k in ("TriggerSelector", "TriggerMode", "TriggerSource", "TriggerActivation")} \
            == {"TriggerSelector": "FrameStart", "TriggerMode": "On", "TriggerSource": "Line0",
                "TriggerActivation": "RisingEdge"}
        source.expect("part-1")
        time.sleep(1.5)
        assert source.captured == 0  # no edge on Line0 (the fake camera has no input line): no frame
        with pytest.raises(CameraError, match="software trigger needs"):
            source.trigger("x")
    finally:
        source.stop()
        source.join(10)


def test_the_camera_killed_and_restarted_is_reconnected_and_counted(fake_camera):
    from winclip_edge.line.genicam import GenicamOptions, GenicamSource

    fake = fake_camera()
    options = GenicamOptions(features={"Width": 64, "Height": 48}, stall_s=1.0, buffer=4, reconnect_min_s=0.5,
                             reconnect_max_s=2.0)
    source = GenicamSource(fake.serial, "cam", options)
    source.start()
    try:
        wait_for(lambda: source.emitted >= 3, 20, "frames before the kill")
        fake.kill()
        wait_for(lambda: not source.connected.is_set() and source.reconnects >= 1, 30, "the lost camera noticed")
        before = source.emitted
        fake.start()  # the same serial number, a new process: features reset, frame ids start again
        wait_for(lambda: source.emitted >= before + 3, 60, "frames after the restart")
        assert source.connected.is_set() and source.settings["Width"] == 64
        while len(source.buffer):
            frame = source.buffer.get()
            assert frame.image.shape == (48, 64, 3)
    finally:
        source.stop()
        source.join(10)


def test_incomplete_frames_are_counted_and_dropped_never_scored(fake_camera):
    from winclip_edge.line.genicam import GenicamOptions, GenicamSource

    fake = fake_camera(lost_per_thousand=30)  # 3 % of GVSP packets never sent, and no resend asked for
    missed = []
    options = GenicamOptions(features={"Width": 256, "Height": 256, "AcquisitionFrameRate": 50.0},
                             packet_resend=False, buffer=256, drop="none")
    source = GenicamSource(fake.id, "cam", options, on_missed=missed.append)
    source.start()
    try:
        wait_for(lambda: source.incomplete >= 3 and source.emitted >= 3, 30, "complete and incomplete frames")
    finally:
        source.stop()
        source.join(10)
    frames = []
    while (frame := source.buffer.get()) is not None:
        frames.append(frame)
    assert len(frames) == source.emitted and source.captured == source.emitted + source.incomplete
    assert set(source.incomplete_by_status) <= {"missing-packets", "timeout"}
    assert all(f.image is not None and f.image.shape == (256, 256, 3) for f in frames)
    assert sorted({f.index for f in frames}) == [f.index for f in frames]  # the dropped ones leave gaps
    assert missed == []  # free-running: no part waited for those frames


TRIGGERS = 20


def test_triggered_parts_under_packet_loss_each_get_one_frame_or_are_reported_missed(fake_camera):
    from winclip_edge.line.genicam import GenicamOptions, GenicamSource

    # ~45 packets a frame: at 1.5 % loss about half the frames lose one, so 20 triggers give both outcomes (all
    # complete or all lost: ~1e-6 each; at 3 % and 12 triggers a busy machine lost all 12)
    fake = fake_camera(lost_per_thousand=15)
    missed = []
    options = GenicamOptions(features={"Width": 256, "Height": 256, "TriggerMode": "On", "TriggerSource": "Software"},
                             packet_resend=False, buffer=64, drop="none")
    source = GenicamSource(fake.id, "cam", options, on_missed=missed.append)
    source.start()
    try:
        assert source.connected.wait(20)
        for i in range(TRIGGERS):
            source.trigger(f"p{i}")
            wait_for(lambda: source.captured == i + 1, 10, f"the buffer of trigger {i}")
    finally:
        source.stop()
        source.join(10)
    frames = []
    while (frame := source.buffer.get()) is not None:
        frames.append(frame)
    assert source.incomplete == len(missed) and len(frames) + len(missed) == TRIGGERS
    assert sorted([f.part_id for f in frames] + [m.part_id for m in missed], key=lambda p: int(p[1:])) == \
        [f"p{i}" for i in range(TRIGGERS)]
    # a lost packet mid-frame: missing-packets; a lost last packet: the frame times out
    assert all(("missing-packets" in m.reason or "timeout" in m.reason) for m in missed) and missed and frames


def test_a_camera_not_there_is_retried_and_a_bad_feature_refused_at_check(fake_camera):
    from winclip_edge.line.genicam import CameraError, GenicamOptions, GenicamSource

    fake = fake_camera()
    with pytest.raises(CameraError, match="no feature 'Gian'"):
        GenicamSource(fake.id, "cam", GenicamOptions(features={"Gian": 1})).check()
    absent = GenicamSource("NOPE-0", "nope", GenicamOptions(reconnect_min_s=0.2, reconnect_max_s=0.4))
    absent.check()  # not there yet: not an error, it is retried
    absent.start()
    try:
        wait_for(lambda: absent.reconnects >= 2, 20, "two reconnect attempts")
        assert absent.emitted == 0 and not absent.connected.is_set()
    finally:
        absent.stop()
        absent.join(10)


def test_frames_score_as_infer_scores_the_same_frames_written_to_png(fake_camera, tiny_bundle, tmp_path):
    from winclip_edge import Inspector
    from winclip_edge.cli import main
    from winclip_edge.line.genicam import GenicamCamera, GenicamOptions

    fake = fake_camera()
    camera = GenicamCamera(fake.id, GenicamOptions(features={"PixelFormat": "BayerRG8", "Width": 320,
                                                             "Height": 256}))
    try:
        camera.start()
        frames = [g.image for g in grab_complete(camera, 4)]
    finally:
        camera.close()
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(frames):
        assert cv2.imwrite(str(folder / f"frame{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    scores = [r.score for r in Inspector(tiny_bundle, "widget").inspect(frames, batch_size=1)]
    out = tmp_path / "out"
    assert main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", "--batch", "1", "--quiet",
                 "--out", str(out), str(folder)]) == 0
    rows = {Path(r["file"]).name: r["score"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert [rows[f"frame{i}.png"] for i in range(4)] == scores  # bit for bit
    assert len(set(scores)) > 1  # the frames differ (the pattern moves), so the comparison can fail


def test_cameras_says_no_cameras_found_when_none_answers(fake_camera, capsys):
    from winclip_edge.cli import main
    from winclip_edge.line.genicam import list_cameras

    # the fixture holds the lock (no test's fake camera runs now) and starts none
    if list_cameras():
        pytest.skip(f"a camera answers on this machine: {list_cameras()[0].line()}")
    assert main(["cameras"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no cameras found") and len(out.splitlines()) == 1


# ---------------------------------------------------------------- `serve --config` with a genicam: source
def mono8_ramp(frame_id: int, height: int, width: int) -> np.ndarray:
    """The fake camera's Mono8 frame ``frame_id`` as RGB: (x + y + frame id) mod 255 at gain factor 1
    (ExposureTime 10000 us, GainRaw 0). A row's camera_frame_id thus gives back the very image it scored."""
    y, x = np.mgrid[0:height, 0:width]
    gray = ((x + y + frame_id) % 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


RAMP_FEATURES = {"PixelFormat": "Mono8", "Width": 240, "Height": 200, "OffsetX": 16, "OffsetY": 8,
                 "ExposureTime": 10000.0, "GainRaw": 0, "AcquisitionFrameRate": 10.0, "TriggerMode": "Off",
                 "TriggerSource": "Line0", "TriggerActivation": "RisingEdge"}


def station_file(folder: Path, bundle, serial: str, features: dict | str, options: str = "", http: int | None = None,
                 name: str = "station.toml") -> Path:
    """A station file with one genicam: source named ``cam`` and its features as a [sources.features] table."""
    table = features if isinstance(features, str) else "".join(f"{k} = {json.dumps(v)}\n" for k, v in features.items())
    text = (f'station = "cams"\nbundle = "{bundle}"\nproducts = ["widget"]\n\n[batching]\nmax_batch = 1\n\n'
            f'[outputs]\nout = "out"\nsave = "none"\nstatus_every = 0.5\n\n'
            f'[[sources]]\nname = "cam"\nspec = "genicam:{serial}"\nbuffer = 2\n{options}\n'
            f"[sources.features]\n{table}")
    if http is not None:
        text += f'\n[http]\nlisten = "127.0.0.1:{http}"\n'
    path = folder / name
    path.write_text(text)
    return path


def results(folder: Path) -> list[dict]:
    path = folder / "out" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_the_fake_cameras_mono8_frames_are_its_ramp(fake_camera):
    """What the station test below relies on to rebuild the frames it scored."""
    from winclip_edge.line.genicam import GenicamCamera, GenicamOptions

    fake = fake_camera()
    camera = GenicamCamera(fake.id, GenicamOptions(features=RAMP_FEATURES))
    try:
        camera.start()
        grabs = grab_complete(camera, 4)
    finally:
        camera.close()
    for g in grabs:
        assert np.array_equal(g.image, mono8_ramp(g.frame_id, 200, 240)), g.frame_id
    assert len({g.image.tobytes() for g in grabs}) == 4


def test_serve_scores_the_cameras_frames_as_infer_scores_them_and_logs_its_features(fake_camera, tiny_bundle,
                                                                                    tmp_path):
    from winclip_edge.cli import main

    fake = fake_camera()
    serve = Serve(tmp_path, "--config", str(station_file(tmp_path, tiny_bundle, fake.serial, RAMP_FEATURES)))
    try:
        wait_for(lambda: len(results(tmp_path)) >= 6 or serve.proc.poll() is not None, 180, "six decisions")
    finally:
        serve.signal(signal.SIGTERM)
    assert serve.wait() == 0, serve.text()[-3000:]
    log = serve.text()
    for name, value in RAMP_FEATURES.items():  # set, read back, logged
        assert f"camera {fake.id}: {name} = {value!r}\n" in log, name
    assert f"camera {fake.id}: ExposureTime = 10000.0" in log and "sources cam (genicam) -> widget" in log
    rows = results(tmp_path)
    assert len(rows) >= 6 and {r["source"] for r in rows} == {"cam"} and all(r["error"] is None for r in rows)
    ids = [r["camera_frame_id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    stamps = [r["camera_timestamp_ns"] for r in rows]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(r["image_size"] == [200, 240] for r in rows)

    frames = tmp_path / "frames"  # the frames the station decided, rebuilt from their camera frame ids
    frames.mkdir()
    for i in ids:
        assert cv2.imwrite(str(frames / f"f{i}.png"), cv2.cvtColor(mono8_ramp(i, 200, 240), cv2.COLOR_RGB2BGR))
    assert main(["infer", "--bundle", str(tiny_bundle), "--product", "widget", "--batch", "1", "--quiet",
                 "--out", str(tmp_path / "infer"), str(frames)]) == 0
    inferred = {Path(r["file"]).name: r["score"] for r in
                map(json.loads, (tmp_path / "infer" / "results.jsonl").read_text().splitlines())}
    assert [inferred[f"f{i}.png"] for i in ids] == [r["score"] for r in rows]  # bit for bit
    assert len({r["score"] for r in rows}) > 1  # different frames, different scores: the comparison can fail


@pytest.mark.parametrize("features,message", [
    ({"Width": 64, "Gian": 1}, r"source cam: camera Aravis-Fake-\w+ has no feature 'Gian'.*; it offers: .*Width"),
    ({"Width": 5000}, r"Width=5000 is out of range for camera Aravis-Fake-\w+: Width takes 1\.\.2048"),
    ({"PixelFormat": "Mono12p"}, r"PixelFormat='Mono12p' is not offered .*one of BayerBG8, .*Mono16"),
])
def test_serve_refuses_a_feature_the_camera_does_not_take_in_one_line_before_the_engine(fake_camera, tmp_path,
                                                                                       features, message):
    fake = fake_camera()
    # no such bundle: refusing the feature first shows the camera is checked before the engine loads
    serve = Serve(tmp_path, "--config", str(station_file(tmp_path, tmp_path / "no-bundle", fake.serial, features)))
    assert serve.wait(60) == 2
    lines = serve.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("winclip-edge serve: error: "), lines
    assert re.search(message, lines[0]), lines[0]


def _metrics(port: int) -> dict[str, float] | None:
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.TransportError:
        return None
    found = {}
    for name in ("incomplete_frames", "source_reconnects", "dropped_frames"):
        match = re.search(rf'^winclip_{name}_total{{source="cam"}} ([0-9.e+]+)$', text, re.M)
        found[name] = float(match.group(1)) if match else None
    return found


def test_serve_counts_incomplete_frames_and_reconnects_a_camera_killed_and_restarted(fake_camera, tiny_bundle,
                                                                                     tmp_path):
    pytest.importorskip("fastapi")
    fake = fake_camera(lost_per_thousand=30)  # 3 % of the stream's packets lost, not resent: incomplete frames
    port = free_port()
    path = station_file(tmp_path, tiny_bundle, fake.serial, {"Width": 256, "Height": 256, "AcquisitionFrameRate": 20.0},
                        options="packet_resend = false\nstall_s = 1.0\nreconnect_max_s = 2.0\n", http=port)
    serve = Serve(tmp_path, "--config", str(path))
    try:
        wait_for(lambda: (m := _metrics(port)) is not None and (m["incomplete_frames"] or 0) >= 1
                 and len(results(tmp_path)) >= 2, 180, "decisions and an incomplete frame")
        assert _metrics(port)["source_reconnects"] == 0
        fake.kill()
        wait_for(lambda: "(reconnect #1)" in serve.text(), 60, "the lost camera noticed")
        before = len(results(tmp_path))
        fake.start()  # the same serial number, a new process: the features are set again
        wait_for(lambda: len(results(tmp_path)) >= before + 3, 120, "decisions after the restart")
        counted = _metrics(port)
    finally:
        serve.signal(signal.SIGTERM)
    assert serve.wait() == 0, serve.text()[-3000:]
    assert counted["source_reconnects"] >= 1 and counted["incomplete_frames"] >= 1
    log = serve.text()
    assert log.count(f"camera {fake.id}: Width = 256") >= 2  # configured at start and again after the restart
    status = re.findall(r"status: .*dropped \d+, incomplete (\d+), reconnects (\d+),", log)
    assert status and int(status[-1][0]) >= 1 and int(status[-1][1]) >= 1, log[-3000:]
    stopped = re.search(r"stopped: .*dropped \d+, incomplete (\d+), reconnects (\d+),", log)
    assert stopped and int(stopped.group(1)) >= counted["incomplete_frames"] and int(stopped.group(2)) >= 1
    assert all(r["error"] is None and r["image_size"] == [256, 256] for r in results(tmp_path))
