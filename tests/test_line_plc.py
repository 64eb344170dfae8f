"""A line controller against real ``winclip-edge serve`` processes on loopback (docs/line.md): asyncua's own client
browses the OPC UA face, prepares a recipe, triggers parts and subscribes to their result events; pymodbus' server
is the PLC, stopped and restarted mid-run; the station is SIGKILLed and restarted; MQTT triggers over a real broker;
HTTP triggers and uploads with part ids. Every acknowledged part gets exactly one live verdict."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import cv2
import httpx
import pytest

pytest.importorskip("asyncua")
pytest.importorskip("pymodbus")
pytest.importorskip("watchdog")

from asyncua import Client, ua  # noqa: E402

from conftest import free_port, textured_part, wait_for  # noqa: E402
from test_modbus import Plc  # noqa: E402
from test_serve import Broker, Serve, needs_broker  # noqa: E402
from winclip_edge.inspector import Inspector  # noqa: E402
from winclip_edge.line.opcua.server import NAMESPACE, OK  # noqa: E402

EMPTY = ua.Variant([], ua.VariantType.Variant)


@pytest.fixture(scope="module")
def calibrated(make_bundle, tmp_path_factory) -> Path:
    """The two-product tiny bundle with a threshold per product: every row has a pass/fail decision."""
    from winclip_edge.calibration import calibrate
    from winclip_edge.products import save_threshold

    folder = tmp_path_factory.mktemp("plc") / "bundle"
    shutil.copytree(make_bundle(products=("widget", "bolt")), folder)
    for product in ("widget", "bolt"):
        inspector = Inspector(folder, product)
        save_threshold(inspector.bundle, product, calibrate(inspector, [textured_part(seed=s) for s in range(6)])[0])
        inspector.close()
    return folder


def drop(inbox: Path, part: str, seed: int) -> Path:
    image = textured_part((96, 128), seed=seed, defect=(20, 30, 40, 40) if seed % 3 == 0 else None)
    tmp = inbox.parent / f".{part}.png"
    cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    os.replace(tmp, inbox / f"{part}.png")
    return inbox / f"{part}.png"


def rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def live_rows(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for r in rows(out):
        if r.get("part_id") is not None and r.get("late_for") is None:
            found.setdefault(r["part_id"], []).append(r)
    return found


class Events:
    def __init__(self):
        self.received = []

    def event_notification(self, event):
        self.received.append(event)


async def until(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def connect(endpoint: str, timeout: float = 120.0) -> Client:
    """A client once the station's OPC UA face answers (it starts before the engine loads)."""
    deadline = time.monotonic() + timeout
    while True:
        client = Client(endpoint, timeout=10)
        try:
            await client.connect()
            return client
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


class Line:
    """The PLC's OPC UA side: the nodes it uses, found by browse name."""

    def __init__(self, client: Client):
        self.client = client

    async def setup(self) -> "Line":
        c = self.client
        self.idx = await c.get_namespace_index(NAMESPACE)
        i = self.idx
        self.system = await c.nodes.objects.get_child([f"{i}:VisionSystem"])
        self.machine = await self.system.get_child([f"{i}:VisionStateMachine"])
        self.auto = await self.machine.get_child([f"{i}:AutomaticModeStateMachine"])
        self.recipes = await self.system.get_child([f"{i}:RecipeManagement"])
        self.events = Events()
        event_type = await c.nodes.base_event_type.get_child([f"{i}:ResultReadyEventType"])
        subscription = await c.create_subscription(20, self.events)
        await subscription.subscribe_events(self.system, event_type)
        return self

    async def state(self) -> tuple[str, str]:
        top = (await (await self.machine.get_child(["0:CurrentState"])).read_value()).Text
        auto = (await (await self.auto.get_child(["0:CurrentState"])).read_value()).Text
        return top, auto

    async def until_state(self, wanted: tuple[str, str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.state() != wanted:
            assert time.monotonic() < deadline, f"state {await self.state()}, wanted {wanted}"
            await asyncio.sleep(0.1)

    async def trigger(self, part: str, recipe: str = "") -> str:
        job_id, error = await self.auto.call_method(f"{self.idx}:StartSingleJob", f"m-{part}", part, recipe, "", EMPTY)
        assert error == OK, (part, error)
        return job_id

    def parts(self) -> list[str]:
        return [e.PartId for e in self.events.received]


def serve_args(bundle: Path, inbox: Path, out: Path, opcua_port: int, *extra: str) -> list[str]:
    return ["--bundle", str(bundle), "--product", "widget", "--product", "bolt", "--station", "line1",
            "--source", f"inbox=folder:{inbox}", "--settle-s", "0.1", "--triggered", "--out", str(out),
            "--save", "none", "--status-every", "0", "--max-batch", "1", "--opcua", f"127.0.0.1:{opcua_port}", *extra]


def test_a_plc_selects_a_recipe_triggers_parts_and_gets_one_verdict_each_through_outages_and_a_sigkill(
        calibrated, tmp_path):
    """The issue's "done": select a recipe, trigger part ids, exactly one verdict per id within the deadline over
    OPC UA events and Modbus, through a PLC outage and a station SIGKILL, nothing lost."""
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    plc = Plc(free_port()).start()
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    args = serve_args(calibrated, inbox, out, port, "--modbus", f"127.0.0.1:{plc.port}", "--deadline-ms", "60000")
    first = Serve(tmp_path, *args)
    jobs: dict[str, str] = {}
    first_events: list = []
    second_events: list = []

    async def before_the_kill() -> None:
        client = await connect(endpoint)
        try:
            line = await Line(client).setup()
            i = line.idx
            assert (await client.get_node(await line.system.read_type_definition()).read_browse_name()).Name == \
                "VisionSystemType"
            assert {(await n.read_browse_name()).Name for n in await line.system.get_children()} == \
                {"VisionStateMachine", "RecipeManagement", "ResultManagement"}
            await line.until_state(("Operational", "Ready"))  # triggered only: Ready between parts
            assert await line.recipes.call_method(f"{i}:PrepareRecipe", "bolt", "") == ["bolt", True, OK]
            bolt = await line.recipes.get_child([f"{i}:Recipes", f"{i}:bolt"])
            assert await (await bolt.get_child([f"{i}:IsPrepared"])).read_value() is True
            for n in range(1, 5):
                jobs[str(n)] = await line.trigger(str(n))
                drop(inbox, str(n), n)
            await until(lambda: len(line.events.received) == 4, 120, "four result events")
            plc.stop()  # the PLC goes down mid-run: its verdicts wait in the spool
            for n in range(5, 8):
                jobs[str(n)] = await line.trigger(str(n), recipe="widget" if n == 6 else "")
                drop(inbox, str(n), n)
            await until(lambda: len(line.events.received) == 7, 120, "events while the PLC is down")
            plc.start()
            for n in (8, 9):  # acknowledged, then the station dies before their files come
                jobs[str(n)] = await line.trigger(str(n))
            assert line.parts() == [str(n) for n in range(1, 8)]
            first_events.extend(line.events.received)
        finally:
            await client.disconnect()

    asyncio.run(asyncio.wait_for(before_the_kill(), 300))
    first.signal(signal.SIGKILL)
    first.wait()
    second = Serve(tmp_path, *args)

    async def after_the_restart() -> None:
        client = await connect(endpoint)
        try:
            line = await Line(client).setup()
            drop(inbox, "8", 8)  # the parts in flight at the kill wait again for their files (deadline not passed)
            drop(inbox, "9", 9)
            await until(lambda: len(line.events.received) == 2, 120, "the parts in flight at the kill")
            await line.until_state(("Operational", "Ready"))
            widget = await line.recipes.get_child([f"{line.idx}:Recipes", f"{line.idx}:widget"])
            prepared = await widget.get_child([f"{line.idx}:IsPrepared"])
            assert await prepared.read_value() is True  # a restart starts with the first product
            jobs["10"] = await line.trigger("10")
            drop(inbox, "10", 10)
            await until(lambda: len(line.events.received) == 3, 120, "the events after the restart")
            assert sorted(line.parts()) == ["10", "8", "9"]
            second_events.extend(line.events.received)
        finally:
            await client.disconnect()

    try:
        asyncio.run(asyncio.wait_for(after_the_restart(), 300))
        wait_for(lambda: len(plc.verdicts()) >= 10, 60, "every verdict at the PLC")
        second.signal(signal.SIGTERM)
        assert second.wait() == 0, second.text()
    finally:
        plc.stop()
        for s in (first, second):
            if s.proc.poll() is None:
                s.proc.kill()
    live = live_rows(out)
    assert sorted(live, key=int) == [str(n) for n in range(1, 11)]
    assert all(len(v) == 1 for v in live.values()), {k: len(v) for k, v in live.items() if len(v) != 1}
    assert all(r["decision"] in ("pass", "fail") for [r] in live.values())  # within the deadline: real verdicts
    assert [live[str(n)][0]["product"] for n in range(1, 8)] == ["bolt"] * 5 + ["widget", "bolt"]
    assert all(live[p][0]["job_id"] == jobs[p] for p in live)
    events = {e.PartId: e for e in first_events + second_events}
    assert len(first_events) + len(second_events) == len(events) == 10  # one event per part, none twice
    for part, [row] in live.items():
        event = events[part]
        assert (event.ResultId, event.JobId, event.Decision) == (row["id"], row["job_id"], row["decision"])
        assert event.Score == row["score"] and event.ResultState == 1
    seen = plc.verdicts()  # the PLC: each verdict once, in the station's order, through its outage and the kill
    assert [str(s["part"]) for s in seen] == [r["part_id"] for r in rows(out) if r.get("late_for") is None]
    assert len({s["sequence"] for s in seen}) == len(seen) == 10
    for s in seen:
        row = live[str(s["part"])][0]
        assert s["result"] == {"pass": 1, "fail": 2}[row["decision"]] and s["coils"][0] is (row["decision"] == "pass")
    inspected = Inspector(calibrated, "bolt").inspect([str(inbox / "done" / "1.png")], batch_size=1)[0]
    assert live["1"][0]["score"] == inspected.score  # the part's score is infer's on its image


def test_deadlines_over_opcua_a_fail_safe_event_and_a_late_one_and_unsafe_binds_refused(calibrated, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    port = free_port()
    serve = Serve(tmp_path, *serve_args(calibrated, inbox, out, port, "--deadline-ms", "1000"))

    async def main() -> None:
        client = await connect(f"opc.tcp://127.0.0.1:{port}")
        try:
            line = await Line(client).setup()
            await line.until_state(("Operational", "Ready"))
            await line.trigger("slow")  # its file comes after the deadline
            await until(lambda: len(line.events.received) == 1, 30, "the fail-safe event")
            drop(inbox, "slow", 1)
            await until(lambda: len(line.events.received) == 2, 60, "the late result")
            timeout, late = line.events.received
            assert (timeout.PartId, timeout.Decision, timeout.ResultState) == ("slow", "timeout", 3)  # Aborted
            assert (late.PartId, late.LateFor) == ("slow", timeout.ResultId) and late.Decision in ("pass", "fail")
            _, error = await line.auto.call_method(f"{line.idx}:StartSingleJob", "", "slow", "", "", EMPTY)
            assert error == -3  # a part is inspected once: refused
        finally:
            await client.disconnect()

    try:
        asyncio.run(asyncio.wait_for(main(), 300))
        serve.signal(signal.SIGTERM)
        assert serve.wait() == 0, serve.text()
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
    [timeout] = [r for r in rows(out) if r["decision"] == "timeout"]
    assert abs(_ms(timeout["decided_at"]) - _ms(timeout["triggered_at"]) - 1000) <= 50

    from winclip_edge.cli import main as cli

    base = ["serve", "--bundle", str(calibrated), "--product", "widget", "--out", str(tmp_path / "o2"),
            "--source", f"folder:{inbox}"]
    unsafe = Serve(tmp_path, *base[1:], "--opcua", f"0.0.0.0:{free_port()}")
    assert unsafe.wait(60) == 2
    message = unsafe.text().strip()
    assert "reachable from other machines" in message and len(message.splitlines()) == 1, message
    assert cli(base + ["--opcua", "127.0.0.1:nope"]) == 2


def _ms(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e3


def test_http_triggers_survive_a_sigkill_each_acknowledged_part_gets_one_row(calibrated, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    http = free_port()
    args = ["--bundle", str(calibrated), "--product", "widget", "--source", f"inbox=folder:{inbox}", "--settle-s",
            "0.1", "--triggered", "--out", str(out), "--save", "none", "--status-every", "0", "--deadline-ms", "1500",
            "--http", f"127.0.0.1:{http}"]
    first = Serve(tmp_path, *args)
    client = httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=60)

    def ready() -> bool:
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 120, "the HTTP face")
        acknowledged = []
        for part in ("a1", "a3", "a4"):
            r = client.post("/v1/trigger", json={"part_id": part})
            assert r.status_code == 202, r.text
            acknowledged.append(part)
        assert client.post("/v1/trigger", json={"part_id": "a1"}).status_code == 409  # in flight already
        assert client.post("/v1/trigger", json={"part_id": "b", "product": "nut"}).status_code == 404
        drop(inbox, "a1", 1)
        upload = client.post("/v1/inspect", params={"product": "widget", "part_id": "a2"},
                             files={"image": ("a2.png", cv2.imencode(".png", textured_part(seed=2))[1].tobytes())})
        assert upload.status_code == 200, upload.text  # an upload with a part id is that part, decided at once
        assert (upload.json()["part_id"], upload.json()["triggered_by"]) == ("a2", "http")
        assert client.post("/v1/inspect", params={"product": "widget", "part_id": "a3"},
                           files={"image": ("a3.png", cv2.imencode(".png", textured_part(seed=3))[1].tobytes())}
                           ).status_code == 409  # a3 waits for its hot-folder view, not for an upload
        wait_for(lambda: set(live_rows(out)) >= {"a1"}, 60, "a1's row")
        first.signal(signal.SIGKILL)  # a3 and a4 were acknowledged and are in flight
        first.wait()
        drop(inbox, "a4", 4)  # arrives while the station is down
        time.sleep(1.6)  # their deadline passes while it is down
        second = Serve(tmp_path, *args)
        wait_for(ready, 120, "the HTTP face after the restart")
        wait_for(lambda: set(live_rows(out)) >= set(acknowledged) and not list(inbox.glob("*.png")), 60, "every part")
        assert client.post("/v1/trigger", json={"part_id": "a3"}).status_code == 409  # decided: never twice
        one = client.post("/v1/inspect", params={"product": "widget", "part_id": "u1"},
                          files={"image": ("u.png", cv2.imencode(".png", textured_part(seed=9))[1].tobytes())})
        assert one.status_code == 200 and one.json()["score"] is not None
        overlay = client.get(one.json()["overlay_url"])  # the row names its overlay on the HTTP face
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        assert one.json()["overlay_url"] == f"http://127.0.0.1:{http}/v1/results/{one.json()['id']}/overlay.png"
        second.signal(signal.SIGTERM)
        assert second.wait() == 0, second.text()
    finally:
        client.close()
        for s in (first, locals().get("second")):
            if s is not None and s.proc.poll() is None:
                s.proc.kill()
    live = live_rows(out)
    assert sorted(live) == ["a1", "a2", "a3", "a4", "u1"] and all(len(v) == 1 for v in live.values())
    for part in ("a3", "a4"):  # in flight at the kill, their deadline passed during the restart: the fail-safe
        assert live[part][0]["decision"] == "timeout" and "restarted" in live[part][0]["error"]
    [late] = [r for r in rows(out) if r.get("late_for")]  # a4's file: recorded, linked, not a second verdict
    assert (late["part_id"], late["late_for"]) == ("a4", live["a4"][0]["id"])


@needs_broker
def test_mqtt_triggers_bad_payloads_counted_and_a_broker_outage(calibrated, tmp_path):
    import paho.mqtt.client as mqtt

    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    broker = Broker(tmp_path, persistence=True).start()
    serve = Serve(tmp_path, "--bundle", str(calibrated), "--product", "widget", "--source", f"inbox=folder:{inbox}",
                  "--settle-s", "0.1", "--triggered", "--out", str(out), "--save", "none", "--status-every", "0.5",
                  "--station", "st1", "--mqtt", f"127.0.0.1:{broker.port}", "--view", "inbox")
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    publisher.reconnect_delay_set(0.1, 1)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        wait_for(lambda: "triggers on winclip/st1/trigger" in serve.text() and "status:" in serve.text(), 120,
                 "the trigger subscriber")
        time.sleep(1.0)  # its subscription is made right after the connection
        for payload in (b"not json", b'{"product": "widget"}', b'{"part_id": true}', b"[1, 2]",
                        json.dumps({"part_id": 77, "product": "widget"}).encode()):
            publisher.publish("winclip/st1/trigger", payload, qos=1).wait_for_publish(10)
        wait_for(lambda: serve.text().count("mqtt trigger on winclip/st1/trigger ignored") == 4, 30, "bad payloads")
        drop(inbox, "77", 7)
        wait_for(lambda: "77" in live_rows(out), 60, "part 77")
        broker.stop()  # the broker goes away and comes back: the subscriber is back too
        broker.start()
        journal = out / "parts.journal.jsonl"
        deadline = time.monotonic() + 60
        while '"part_id": "78"' not in journal.read_text():  # acknowledged: in the journal
            assert time.monotonic() < deadline, serve.text()[-3000:]
            publisher.publish("winclip/st1/trigger", json.dumps({"part_id": "78"}).encode(), qos=1)
            time.sleep(1.0)
        drop(inbox, "78", 8)
        wait_for(lambda: "78" in live_rows(out), 60, "part 78")
        serve.signal(signal.SIGTERM)
        assert serve.wait() == 0, serve.text()
    finally:
        publisher.loop_stop()
        broker.stop()
        if serve.proc.poll() is None:
            serve.proc.kill()
    live = live_rows(out)
    assert sorted(live) == ["77", "78"] and all(len(v) == 1 for v in live.values())
    assert [live[p][0]["triggered_by"] for p in ("77", "78")] == ["mqtt", "mqtt"]
