"""``winclip-edge serve`` as users run it: real processes (SIGKILL, SIGTERM), a real MQTT broker (Debian's
mosquitto on a loopback port), a video written with OpenCV, a hot folder filled while it runs, a webhook
receiver on loopback."""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from winclip_edge.inspector import Inspector
from conftest import Serve, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
needs_broker = pytest.mark.skipif(not Path(MOSQUITTO).is_file(), reason="Debian mosquitto not installed (.ci/run installs it)")


class Broker:
    """mosquitto on a free loopback port; ``persistence`` keeps sessions across a stop/start (as a real line broker)."""

    def __init__(self, tmp: Path, persistence: bool = False, secure: tuple[Path, Path, Path] | None = None):
        """``secure`` = (certificate, key, password file): TLS and users only, no anonymous clients."""
        self.port = free_port()
        self.dir = tmp / f"broker-{self.port}"
        self.dir.mkdir()
        # `user`: started as root, mosquitto would switch to the mosquitto user, which cannot read the test's folders
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {str(secure is None).lower()}",
                 f"persistence {str(persistence).lower()}", f"user {getpass.getuser()}"]
        if persistence:
            lines.append(f"persistence_location {self.dir}/")
        if secure is not None:
            lines += [f"certfile {secure[0]}", f"keyfile {secure[1]}", f"password_file {secure[2]}"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "log.txt", "ab"))

        def listening():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(listening, 20, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


class Subscriber:
    """A QoS 1 subscriber with a persistent session that records every message's payload."""

    def __init__(self, port: int, topic: str, ca: Path | None = None, user: tuple[str, str] | None = None):
        import paho.mqtt.client as mqtt

        self.messages: list[dict] = []
        self.subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}", clean_session=False)
        if ca is not None:
            client.tls_set(ca_certs=str(ca))
        if user is not None:
            client.username_pw_set(*user)
        client.on_connect = lambda c, u, f, r, p=None: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *a: self.subscribed.set()
        client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        client.reconnect_delay_set(0.1, 0.5)
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self.subscribed.wait(20)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def textile_images() -> list[Path]:
    from winclip_edge.evaluation.datasets import textile_root

    root = textile_root()
    return sorted((root / "nominal").glob("*"))[:20] + sorted((root / "local").glob("*"))[:6]


def write_video(path: Path, n: int, size=(96, 128)) -> None:
    """An MJPG video of the textile images (nominal and local defects), ``size`` = (H, W)."""
    images = textile_images()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.resize(cv2.imread(str(images[(i * 7) % len(images)])), (size[1], size[0])))
    writer.release()


def decoded_frames(path: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@needs_broker
def test_video_to_results_mqtt_and_webhook_with_the_scores_of_inspect(tiny_bundle, tmp_path):
    video = tmp_path / "line.avi"
    write_video(video, 8)
    broker = Broker(tmp_path).start()
    hook_port = free_port()
    Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", hook_port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    subscriber = Subscriber(broker.port, "winclip/st1/widget/result")
    try:
        serve = Serve(tmp_path, "--bundle", str(tiny_bundle), "--product", "widget", "--source", f"cam={video}",
                      "--out", "out", "--max-batch", "1", "--save", "all", "--station", "st1",
                      "--mqtt", f"127.0.0.1:{broker.port}", "--webhook", f"http://127.0.0.1:{hook_port}/hook")
        assert serve.wait() == 0, serve.text()
        wait_for(lambda: len(subscriber.messages) == 8, 20, "MQTT messages")
    finally:
        subscriber.close()
        broker.stop()
        server.shutdown()
        server.server_close()
    got = rows(tmp_path / "out")
    assert [r["frame"] for r in got] == list(range(8)) and {r["source"] for r in got} == {"cam"}
    expected = Inspector(tiny_bundle, "widget").inspect(decoded_frames(video), batch_size=1)
    assert [r["score"] for r in got] == [e.score for e in expected]  # the same decoded frames, bit for bit
    assert all(Path(r["overlay"]).is_file() and Path(r["map"]).is_file() and r["latency_ms"] > 0 for r in got)
    ids = [r["id"] for r in got]
    assert [m["id"] for m in subscriber.messages] == ids and [m["id"] for m in Hook.received] == ids
    assert subscriber.messages[0]["schema"] == got[0]["schema"] and subscriber.messages[0]["station"] == "st1"
    assert not list((tmp_path / "out" / "spool").rglob("*.json"))


@needs_broker
def test_broker_stopped_mid_run_every_decision_arrives_in_order(tiny_bundle, tmp_path):
    n = 40
    video = tmp_path / "line.avi"
    write_video(video, n, size=(48, 64))
    broker = Broker(tmp_path, persistence=True).start()
    subscriber = Subscriber(broker.port, "line/results")
    try:
        serve = Serve(tmp_path, "--bundle", str(tiny_bundle), "--product", "widget", "--source", str(video),
                      "--out", "out", "--fps-limit", "8", "--save", "none", "--mqtt", f"127.0.0.1:{broker.port}",
                      "--mqtt-topic", "line/results", "--flush-timeout", "60", "--status-every", "0.5")
        wait_for(lambda: len(subscriber.messages) >= 4, 60, "first messages")
        broker.stop()
        down_at = len(rows(tmp_path / "out"))
        wait_for(lambda: "sink mqtt down" in serve.text() and len(rows(tmp_path / "out")) >= down_at + 8, 30,
                 "decisions while the broker is down")
        broker.start()
        assert serve.wait() == 0, serve.text()
        wait_for(lambda: len(subscriber.messages) >= n, 30, "every message")
        time.sleep(0.5)  # a duplicate would arrive now
    finally:
        subscriber.close()
        broker.stop()
    log = serve.text()
    assert "sink mqtt down" in log and "sink mqtt is back" in log and re.search(r"mqtt spool [1-9]", log)  # status lines show the spool
    # MQTT QoS 1 is at-least-once (docs/line.md): a publish in flight when the broker stops may be delivered again.
    # Consumers drop repeats by id; after that, every decision arrives once, in order, and at most a few repeat.
    unique = list({m["id"]: m for m in subscriber.messages}.values())
    assert [m["frame"] for m in unique] == list(range(n))  # each decision, in order
    assert [m["id"] for m in unique] == [r["id"] for r in rows(tmp_path / "out")]
    assert len(subscriber.messages) - len(unique) <= 2, "more repeats than the messages in flight at the outage"


@needs_broker
def test_mqtt_over_tls_with_the_user_from_the_environment(tiny_bundle, tmp_path):
    cert, key, passwords = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "passwd"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "line1", "s3cret"], check=True, capture_output=True)
    video = tmp_path / "line.avi"
    write_video(video, 3, size=(48, 64))
    broker = Broker(tmp_path, secure=(cert, key, passwords)).start()
    subscriber = Subscriber(broker.port, "#", ca=cert, user=("line1", "s3cret"))
    try:
        serve = Serve(tmp_path, "--bundle", str(tiny_bundle), "--product", "widget", "--source", str(video),
                      "--out", "out", "--save", "none", "--mqtt", f"127.0.0.1:{broker.port}", "--mqtt-tls",
                      "--mqtt-ca", str(cert), env={"WINCLIP_MQTT_USERNAME": "line1", "WINCLIP_MQTT_PASSWORD": "s3cret"})
        assert serve.wait() == 0, serve.text()
        wait_for(lambda: len(subscriber.messages) == 3, 20, "messages over TLS")
    finally:
        subscriber.close()
        broker.stop()
    assert [m["frame"] for m in subscriber.messages] == [0, 1, 2] and "s3cret" not in serve.text()


def drop_file(inbox: Path, name: str, source: Path, moved_in: bool = True) -> None:
    data = source.read_bytes()
    if moved_in:  # the safe way for a camera: write elsewhere, rename in
        tmp = inbox.parent / f".{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, inbox / name)
    else:  # written in place: taken once its size stopped changing
        (inbox / name).write_bytes(data)


@needs_broker
def test_hot_folder_sigkill_and_restart_every_file_exactly_one_row(tiny_bundle, tmp_path):
    images = textile_images()
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    broker = Broker(tmp_path).start()
    subscriber = Subscriber(broker.port, "winclip/+/widget/result")
    args = ("--bundle", str(tiny_bundle), "--product", "widget", "--source", f"folder:{inbox}", "--out", str(out),
            "--settle-s", "0.3", "--max-batch", "2", "--save", "none", "--status-every", "0",
            "--mqtt", f"127.0.0.1:{broker.port}")
    for i in range(4):  # already there at start
        drop_file(inbox, f"early{i}.jpg", images[i])
    first = Serve(tmp_path, *args)

    def wave1():  # arrives while serve runs, is killed, and is down
        (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # header only: an error row
        for i in range(16):
            drop_file(inbox, f"wave1-{i:02d}.jpg", images[4 + i], moved_in=i % 4 != 0)
            time.sleep(0.1)

    dropper = threading.Thread(target=wave1)
    dropper.start()
    wait_for(lambda: len(rows(out)) >= 3, 90, "first rows")
    first.signal(signal.SIGKILL)
    first.wait()
    dropper.join()
    assert list(inbox.glob("*.*")), "nothing left for the restart"
    second = Serve(tmp_path, *args)
    for i in range(6):
        drop_file(inbox, f"wave2-{i}.jpg", images[20 + i])
    names = {f"early{i}.jpg" for i in range(4)} | {f"wave1-{i:02d}.jpg" for i in range(16)} | \
            {f"wave2-{i}.jpg" for i in range(6)} | {"broken.png"}
    try:
        wait_for(lambda: {Path(r["file"]).name for r in rows(out)} >= names and not list(inbox.glob("*.*")), 90,
                 "every file")
        second.signal(signal.SIGTERM)
        assert second.wait() == 0, second.text()
        wait_for(lambda: {m["id"] for m in subscriber.messages} >= {r["id"] for r in rows(out)}, 30, "MQTT")
    finally:
        subscriber.close()
        broker.stop()
    got = rows(out)
    per_file = {}
    for r in got:
        per_file.setdefault(Path(r["file"]).name, []).append(r)
    assert sorted(per_file) == sorted(names)
    assert all(len(v) == 1 for v in per_file.values()), {k: len(v) for k, v in per_file.items() if len(v) != 1}
    for name, [r] in per_file.items():
        assert Path(r["moved_to"]).is_file() and Path(r["moved_to"]).name == name
        assert (r["error"] is not None) == (name == "broken.png")
        assert Path(r["moved_to"]).parent.name == ("failed" if name == "broken.png" else "done")
        assert r["file_sha256"] and r["frame"] is None
    # MQTT got every decision, those spooled by the killed process included (at least once: a decision whose
    # process died between spooling and writing its row was inspected again, under a new id)
    assert {Path(m["file"]).name for m in subscriber.messages} == names


def test_sigterm_drains_what_was_captured(tiny_bundle, tmp_path):
    video = tmp_path / "line.avi"
    write_video(video, 200, size=(48, 64))
    serve = Serve(tmp_path, "--bundle", str(tiny_bundle), "--product", "widget", "--source", str(video),
                  "--out", "out", "--fps-limit", "20", "--max-batch", "8", "--max-wait-ms", "1000", "--save", "none")
    wait_for(lambda: len(rows(tmp_path / "out")) >= 8, 90, "first rows")
    serve.signal(signal.SIGTERM)
    assert serve.wait(60) == 0, serve.text()
    final = re.search(r"stopped: captured (\d+), decided (\d+)", serve.text())
    assert final, serve.text()
    captured, decided = int(final.group(1)), int(final.group(2))
    got = rows(tmp_path / "out")
    assert captured == decided == len(got) < 200  # everything captured before the signal was decided
    assert [r["frame"] for r in got] == list(range(len(got)))


def test_bad_arguments_exit_2_with_one_line(tiny_bundle, tmp_path, capsys):
    from winclip_edge.cli import main

    base = ["serve", "--bundle", str(tiny_bundle), "--product", "widget", "--out", str(tmp_path / "out")]
    cases = [([], "nothing to serve"), (["--source", str(tmp_path / "missing.avi")], "no such video file"),
             (["--source", f"folder:{tmp_path / 'nope'}"], "no such folder"),
             (["--source", "0", "--max-batch", "0"], "--max-batch must be >= 1"),
             (["--source", "0", "--mqtt", "host:port"], "expected HOST:PORT"),
             (["--source", "0", "--webhook", "ftp://x/y"], "http:// or https://")]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    bad_bundle = ["serve", "--bundle", str(tmp_path), "--product", "widget", "--out", str(tmp_path / "o"),
                  "--source", "0"]
    assert main(bad_bundle) == 2
    assert "manifest" in capsys.readouterr().err
