"""GenICam cameras (winclip_edge/line/genicam.py) over the real protocol: Aravis's simulated GigE Vision camera
(``arv-fake-gv-camera-0.8``, Debian aravis-tools) on 127.0.0.1 — discovery and control over GVCP, frames over
GVSP. Skipped, saying why, only where Aravis or the fake camera is not installed."""
from __future__ import annotations

import fcntl
import json
import logging
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

from conftest import wait_for
from winclip_edge.line.sources import VideoOptions

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
    options = GenicamOptions(features={"Width": 64, "Height": 48}, stall_s=1.0,
                             live=VideoOptions(buffer=4, reconnect_min_s=0.5, reconnect_max_s=2.0))
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
                             packet_resend=False, live=VideoOptions(buffer=256, drop="none"))
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


def test_triggered_parts_under_packet_loss_each_get_one_frame_or_are_reported_missed(fake_camera):
    from winclip_edge.line.genicam import GenicamOptions, GenicamSource

    fake = fake_camera(lost_per_thousand=30)
    missed = []
    options = GenicamOptions(features={"Width": 256, "Height": 256, "TriggerMode": "On", "TriggerSource": "Software"},
                             packet_resend=False, live=VideoOptions(buffer=64, drop="none"))
    source = GenicamSource(fake.id, "cam", options, on_missed=missed.append)
    source.start()
    try:
        assert source.connected.wait(20)
        for i in range(12):
            source.trigger(f"p{i}")
            wait_for(lambda: source.captured == i + 1, 10, f"the buffer of trigger {i}")
    finally:
        source.stop()
        source.join(10)
    frames = []
    while (frame := source.buffer.get()) is not None:
        frames.append(frame)
    assert source.incomplete == len(missed) and len(frames) + len(missed) == 12
    assert sorted([f.part_id for f in frames] + [m.part_id for m in missed], key=lambda p: int(p[1:])) == \
        [f"p{i}" for i in range(12)]
    # a lost packet mid-frame: missing-packets; a lost last packet: the frame times out
    assert all(("missing-packets" in m.reason or "timeout" in m.reason) for m in missed) and missed and frames


def test_a_camera_not_there_is_retried_and_a_bad_feature_refused_at_check(fake_camera):
    from winclip_edge.line.genicam import CameraError, GenicamOptions, GenicamSource

    fake = fake_camera()
    with pytest.raises(CameraError, match="no feature 'Gian'"):
        GenicamSource(fake.id, "cam", GenicamOptions(features={"Gian": 1})).check()
    absent = GenicamSource("NOPE-0", "nope", GenicamOptions(live=VideoOptions(reconnect_min_s=0.2, reconnect_max_s=0.4)))
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
