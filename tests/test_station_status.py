"""What the station says about itself is true: a sink that is back counts the decisions that waited for it, the
status line and /metrics count HTTP decisions with the live sources', the start line names every product."""
from __future__ import annotations

import logging
import re
import threading

import cv2
import pytest

from conftest import free_port, textured_part, wait_for
from winclip_edge.line.sinks import SinkUnavailable, SpooledSink
from winclip_edge.line.spool import Spool


class Logged(logging.Handler):
    """The messages of the station's logger, whatever the other tests did to its handlers."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger("winclip_edge.line")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "Logged":
        self.level_before = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


class Outage:
    """A sink that is down until ``back`` is set."""

    name = "plc"

    def __init__(self):
        self.back = threading.Event()
        self.got: list[bytes] = []

    def open(self) -> None:
        pass

    def deliver(self, key: int, message: bytes, timeout: float) -> None:
        if not self.back.is_set():
            raise SinkUnavailable("plc: no connection")
        self.got.append(message)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("waiting", [1, 3])
def test_a_sink_that_is_back_counts_the_decisions_that_waited(tmp_path, waiting):
    outage = Outage()
    with Logged() as log:
        sink = SpooledSink(outage, Spool(tmp_path / "spool"), retry_min_s=0.01, retry_max_s=0.05)
        for i in range(waiting):
            sink.put({"id": str(i)})
        wait_for(lambda: sink.failures >= 2, 30, "failed attempts")
        outage.back.set()
        wait_for(lambda: len(outage.got) == waiting, 30, "deliveries")
        sink.close(5)
    back = [line for line in log.lines if "is back" in line]
    assert back == [f"sink plc is back; delivering the spooled decisions ({waiting} waiting)"], log.lines


def test_status_line_and_metrics_count_http_decisions_and_the_start_line_names_every_product(make_bundle, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from winclip_edge.line import build_station
    from winclip_edge.line.spec import HttpSpec, OutputsSpec, SourceSpec, StationSpec

    products = ("widget", "gadget", "gizmo", "doohickey")
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(3):
        writer.write(cv2.cvtColor(textured_part((48, 64), seed=i), cv2.COLOR_RGB2BGR))
    writer.release()
    port = free_port()
    spec = StationSpec(station="honest", bundle=str(make_bundle(products=products)), products=products,
                       sources=(SourceSpec(str(video), "cam"),),
                       outputs=OutputsSpec(out=str(tmp_path / "out"), save="none", status_every=0),
                       http=HttpSpec(listen=f"127.0.0.1:{port}"))
    part = cv2.imencode(".png", textured_part((80, 80), seed=9))[1].tobytes()
    with Logged() as log:
        station = build_station(spec)
        stop = threading.Event()
        runner = threading.Thread(target=station.run, args=(stop,))
        runner.start()
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            wait_for(lambda: station.service is not None and client.get("/readyz").status_code == 200, 120, "ready")
            wait_for(lambda: station.station.stats().decided.get("cam") == 3, 60, "the video's frames")
            for product in ("widget", "widget", "gadget"):
                assert client.post("/v1/inspect", params={"product": product}, content=part).status_code == 200
            assert client.post("/v1/inspect", params={"product": "widget"}, content=b"GIF89a?").status_code == 422
            line = station.station.status_line()
            metrics = client.get("/metrics").text
            client.close()
        finally:
            stop.set()
            runner.join(120)
    assert not runner.is_alive()
    assert "decided 6 (0 errors, 3 over HTTP)" in line, line  # 3 frames + 3 answered uploads (the GIF was not one)
    assert station.station.stats().decided == {"cam": 3, "http": 3}
    verdicts = [float(v) for v in re.findall(r'^winclip_inspections_total\{[^}]*\} (\S+)$', metrics, re.M)]
    assert sum(verdicts) == 6, metrics
    [start] = [m for m in log.lines if m.startswith("station honest: ")]
    assert all(f"{p} (zero-shot)" in start for p in products) and "sources cam (video) -> widget" in start, start
    assert any(m.startswith("stopped: ") and "decided 6 " in m for m in log.lines), log.lines
