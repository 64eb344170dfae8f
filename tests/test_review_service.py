"""The review loop of a running station, end to end: `winclip-edge serve --http --token-file` started as users start
it. Operators' verdicts by named tokens (concurrent, surviving a SIGKILL), teach and rollback over HTTP while a
video runs (every frame scored once, by one version, its row naming it), drift alerts to MQTT with hysteresis, and
the review page driven through its own buttons in headless Chromium (DevTools protocol)."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from conftest import free_port, terminate, textured_part, wait_for, wait_http_ready
from winclip_edge import Inspector
from winclip_edge.bundle import Bundle
from winclip_edge.calibration import calibrate
from winclip_edge.drift import DriftLimits, Limit
from winclip_edge.line.drift_watch import ALERT_SCHEMA, DriftWatch
from winclip_edge.products import Threshold, save_threshold
from winclip_edge.registration import register
from winclip_edge.review import ReviewDB
from winclip_edge.scoring import ScoringOptions
from winclip_edge import versions

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]
DEFECT = (90, 90, 60, 60)
READY_TIMEOUT_S = 120
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKENS = {"alice": "tok-alice-" + "a" * 24, "bob": "tok-bob-" + "b" * 24}


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def product(bundle_copy, tmp_path) -> dict:
    """'widget' registered on 4 goods and calibrated leave-one-out; ``odd`` a good part the memory does not know
    (flagged: a false alarm to teach), ``defects`` parts with a defect, ``goods`` the references (they pass)."""
    refs = [write(tmp_path / "refs" / f"g{s}.png", textured_part(seed=s)) for s in range(4)]
    register(Inspector(bundle_copy, "widget", options=ScoringOptions(use_memory=False), with_threshold=False), refs)
    threshold, _ = calibrate(Inspector(bundle_copy, "widget", with_threshold=False))
    save_threshold(Bundle(bundle_copy), "widget", threshold)
    odd = write(tmp_path / "line" / "odd.png", textured_part(seed=50, defect=DEFECT))
    defects = [write(tmp_path / "line" / f"bad{s}.png", textured_part(seed=s, defect=DEFECT)) for s in range(60, 64)]
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    return {"bundle": bundle_copy, "goods": refs, "odd": odd, "defects": defects, "tokens": token_file}


class Serve:
    """`winclip-edge serve --http` on a free loopback port, product widget; ``token`` = the client's bearer token."""

    def __init__(self, bundle: Path, out: Path, *extra: str, token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log = out.with_suffix(f".{self.port}.log")
        args = [sys.executable, "-m", "winclip_edge.cli", "serve", "--http", f"127.0.0.1:{self.port}", "--bundle",
                str(bundle), "--product", "widget", "--out", str(out), "--station", "st1", "--max-batch", "4",
                "--max-wait-ms", "50", "--status-every", "0", *extra]
        env = {k: v for k, v in os.environ.items() if k not in ("WINCLIP_TOKEN", "WINCLIP_TOKENS")}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        self.client = self.session(token)
        wait_http_ready(self.proc, self.client, self.text, READY_TIMEOUT_S, self.stop)

    def session(self, token: str | None) -> "httpx.Client":
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"Authorization": f"Bearer {token}"} if token else {})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def inspect(self, path: Path) -> dict:
        r = self.client.post("/v1/inspect", params={"product": "widget"}, files={"image": (path.name, path.read_bytes())})
        assert r.status_code == 200, r.text
        return r.json()

    def metric(self, name: str, **labels: str) -> float | None:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(f"{name}{{{want}}} "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> int:
        self.client.close()
        return terminate(self.proc)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---------------------------------------------------------------- the station file and the tokens
def test_drift_and_token_file_settings_in_the_station_file_and_their_flags(tmp_path, capsys):
    from winclip_edge.cli import main
    from winclip_edge.cli.serve import spec_of
    from winclip_edge.line.spec import DriftSpec, HttpSpec, StationSpec, dump_spec, load_spec
    from winclip_edge.line.typed import SpecError

    spec = spec_of({"http": "127.0.0.1:8080", "token_file": "/etc/winclip/tokens", "drift_window": 50,
                    "drift_ks": None, "drift_share_above": (0.4, 0.3)}, StationSpec())
    assert spec.http == HttpSpec(listen="127.0.0.1:8080", token_file="/etc/winclip/tokens")
    assert spec.drift == DriftSpec(window=50, watch=("false_alarm_rate", "share_above"), share_above=0.4,
                                   share_above_clear=0.3)
    limits = spec.drift.limits()
    assert limits.ks is None and (limits.share_above.on, limits.share_above.off) == (0.4, 0.3)
    file = tmp_path / "s.toml"
    file.write_text(dump_spec(spec))
    assert load_spec(file) == spec and "[drift]" in file.read_text() and 'token_file = "/etc/winclip/tokens"' in \
        file.read_text()
    again = spec_of({"drift_ks": (0.5, 0.25)}, spec).drift  # a limit flag puts its statistic back on the watch
    assert again.watch == ("false_alarm_rate", "share_above", "ks") and (again.ks, again.ks_clear) == (0.5, 0.25)
    file.write_text(file.read_text().replace("ks_clear = 0.2", "ks_clear = 0.9"))
    with pytest.raises(SpecError, match=r"drift.ks_clear: must be in \[0, ks\]"):
        load_spec(file)
    with pytest.raises(SpecError, match="watch: must name each of"):
        DriftSpec(watch=("ks", "ks"))
    base = ["serve", "--bundle", "b", "--product", "w", "--out", str(tmp_path / "o"), "--source", "0"]
    for extra, message in ((["--drift-ks", "0.2:0.5"], "--drift-ks must be in [0, ks]"),
                           (["--drift-window", "0"], "--drift-window must be >= 1"),
                           (["--token-file", "t"], "--token/--token-file/--insecure need --http")):
        assert main(base + extra + ["--print-config"]) == 2
        assert message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal of the flag's value
        main(base + ["--drift-ks", "lots", "--print-config"])
    assert exit_.value.code == 2 and "expected ON[:OFF]" in capsys.readouterr().err
    assert main(base + ["--drift-ks", "0.5", "--print-config"]) == 0  # OFF defaults to 0.6 x ON
    assert "ks_clear = 0.3" in capsys.readouterr().out


def test_http_config_names_every_token_once(tmp_path):
    from winclip_edge.line.build import http_config
    from winclip_edge.line.spec import HttpSpec
    from winclip_edge.service.config import ServiceError

    tokens = tmp_path / "tokens"
    tokens.write_text("alice:tok-a\nbob:tok-b\n")
    config = http_config(HttpSpec(listen="0.0.0.0:8080", token_file=str(tokens)), {"WINCLIP_TOKENS": "carol:tok-c"})
    assert [t.name for t in config.tokens] == ["alice", "bob", "carol"] and config.token is None and config.auth
    config = http_config(HttpSpec(token_file=str(tokens)), {"WINCLIP_TOKEN": "tok-d"})
    assert config.token == "tok-d" and len(config.tokens) == 2
    for environ, message in (({"WINCLIP_TOKENS": "alice:tok-x"}, "'alice' is given twice"),
                             ({"WINCLIP_TOKENS": "dave:tok-a"}, "share one token"),
                             ({"WINCLIP_TOKEN": "tok-b"}, "share one token")):
        with pytest.raises(ServiceError, match=message):
            http_config(HttpSpec(token_file=str(tokens)), environ)
    with pytest.raises(ServiceError, match="cannot be read"):
        http_config(HttpSpec(token_file=str(tmp_path / "missing")), {})
    with pytest.raises(ServiceError, match="--token-file"):
        http_config(HttpSpec(listen="0.0.0.0:8080"), {})  # reachable from outside: a token, a token file or --insecure


# ---------------------------------------------------------------- the drift watch (no process)
def test_the_drift_watch_follows_the_version_served_and_replays_its_history():
    def inspector(version, value=0.5):
        return SimpleNamespace(version=version, threshold=Threshold(value, 0.0, 0.0, 4, "few-shot", "", {},
                                                                      scores=[0.1, 0.2, 0.3, 0.4]))

    served = {"widget": inspector(1)}
    catalog = SimpleNamespace(products=["widget"], get=lambda p: served[p])
    limits = DriftLimits(false_alarm_rate=Limit(0.5, 0.2), ks=None, share_above=Limit(0.5, 0.2), min_samples=2)
    watch = DriftWatch(catalog, window=4, limits=limits, station="st1")
    alerts: list[dict] = []
    watch.on_alert.append(alerts.append)
    watch.on_alert.insert(0, lambda alert: 1 / 0)  # a failing face: logged, the others still get the alert
    for score in (0.9, 0.8):  # both above 0.5: share 1.0 > 0.5
        watch.observe({"product": "widget", "version": 1, "score": score, "error": None})
    assert [(a["statistic"], a["active"], a["version"], a["reason"]) for a in alerts] == \
        [("share_above", True, 1, "limit")]
    assert alerts[0]["schema"] == ALERT_SCHEMA and alerts[0]["station"] == "st1" and alerts[0]["value"] == 1.0
    watch.observe({"product": "widget", "version": 2, "score": 0.1, "error": None})  # another version: not counted
    watch.observe({"product": "widget", "version": 1, "score": None, "error": "unreadable"})
    assert watch.snapshot()["widget"]["scores"] == 2
    watch.observe({"product": "widget", "version": 1, "score": 0.4, "error": None})  # 2/3 above: still raised
    assert len(alerts) == 1  # hysteresis: between the levels nothing changes
    watch.verdict("widget", 1, "good", True)
    watch.verdict("widget", 1, "good", True)  # two flagged goods: false-alarm rate 1.0
    assert alerts[-1]["statistic"] == "false_alarm_rate" and alerts[-1]["active"] is True

    # teach: another Inspector serves; the raised alerts clear ("version") and the new tracker replays version 2
    watch.history = lambda product, version: ([0.9, 0.95, 0.1] if version == 2 else [], [("good", False)])
    served["widget"] = inspector(2, value=0.6)
    state = watch.snapshot()["widget"]
    cleared = alerts[2:4]
    assert sorted((a["statistic"], a["active"], a["reason"], a["version"]) for a in cleared) == \
        [("false_alarm_rate", False, "version", 1), ("share_above", False, "version", 1)]
    assert (alerts[4]["statistic"], alerts[4]["active"], alerts[4]["version"]) == ("share_above", True, 2)
    assert len(alerts) == 5  # the replayed history's end state, once
    assert state["version"] == 2 and state["scores"] == 3 and state["reviewed_goods"] == 1
    assert state["values"]["share_above"] == pytest.approx(2 / 3) and state["values"]["false_alarm_rate"] is None
    assert state["limits"]["ks"] is None and state["limits"]["share_above"] == {"on": 0.5, "off": 0.2}
    served["widget"] = SimpleNamespace(version=3, threshold=None)  # nothing to judge against: not watched
    assert watch.snapshot()["widget"]["calibrated"] is False and alerts[-1]["active"] is False


# ---------------------------------------------------------------- verdicts
def test_named_tokens_give_verdicts_concurrently_and_every_acknowledged_one_survives_a_sigkill(product, tmp_path):
    out = tmp_path / "out"
    s = Serve(product["bundle"], out, "--token-file", str(product["tokens"]), token=TOKENS["alice"])
    clients = {name: s.session(token) for name, token in TOKENS.items()}
    try:
        results = [s.inspect(p) for p in [product["odd"], *product["goods"][:2], *product["defects"][:2]]]
        ids = [r["id"] for r in results]
        odd = results[0]
        assert odd["anomalous"] is True and odd["version"] is None
        # the errors: no token, an unknown id, a malformed id or body
        anonymous = s.session(None)
        assert anonymous.post(f"/v1/results/{odd['id']}/verdict", json={"verdict": "good"}).status_code == 401
        assert anonymous.get("/v1/review/queue").status_code == 401
        wrong = s.session("tok-nobody")
        assert wrong.post(f"/v1/results/{odd['id']}/verdict", json={"verdict": "good"}).status_code == 401
        r = s.client.post(f"/v1/results/{'f' * 32}/verdict", json={"verdict": "good"})
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = s.client.post("/v1/results/not-an-id/verdict", json={"verdict": "good"})
        assert r.status_code == 422 and r.json()["error"] == "bad_id"
        for bad in ({"verdict": "maybe"}, {}, {"verdict": "good", "extra": 1}, {"verdict": "good", "note": "x" * 2001},
                    {"verdict": "good", "note": 5}):
            r = s.client.post(f"/v1/results/{odd['id']}/verdict", json=bad)
            assert r.status_code == 422 and r.json()["error"] == "bad_request", (bad, r.text)
        r = s.client.post(f"/v1/results/{odd['id']}/verdict", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"] == "bad_request"
        queue = s.client.get("/v1/review/queue").json()
        assert odd["id"] in [q["id"] for q in queue["queue"]] and queue["counts"]["widget"]["reviewed"] == 0
        anonymous.close(), wrong.close()

        # two named tokens at once: every verdict 200, recorded with its name
        answers: dict[str, list[dict]] = {name: [] for name in TOKENS}

        def give(name: str, n: int) -> None:
            for i in range(n):
                r = clients[name].post(f"/v1/results/{ids[i % len(ids)]}/verdict",
                                       json={"verdict": ("good", "defect")[i % 2], "note": f"{name}-{i}"})
                assert r.status_code == 200, r.text
                answers[name].append(r.json())

        threads = [threading.Thread(target=give, args=(name, 12)) for name in TOKENS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, given in answers.items():
            assert len(given) == 12 and {a["operator"] for a in given} == {name}
            assert all(a["note"] == f"{name}-{i}" for i, a in enumerate(given))
        history = s.client.get(f"/v1/results/{ids[0]}/verdicts").json()["verdicts"]
        assert {v["operator"] for v in history} == {"alice", "bob"} and len(history) == 6
        listed = {r["id"]: r for r in s.client.get("/v1/results").json()["results"]}
        assert listed[ids[0]]["review"]["operator"] in TOKENS  # the verdict that counts: the newest
        assert s.client.get("/v1/review/queue").json()["waiting"] == 0  # every flagged result is reviewed
        assert s.metric("winclip_verdicts_total", product="widget", verdict="good") == 12

        # killed mid-write: every verdict answered 200 is in the file
        acked: list[tuple[int, str, str]] = []
        stop = threading.Event()

        def hammer(name: str) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = clients[name].post(f"/v1/results/{ids[i % len(ids)]}/verdict",
                                           json={"verdict": "defect", "note": f"kill-{name}-{i}"})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked.append((r.json()["seq"], name, f"kill-{name}-{i}"))
                i += 1

        threads = [threading.Thread(target=hammer, args=(name,)) for name in TOKENS]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) >= 30, 120, "30 acknowledged verdicts")
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        for c in clients.values():
            c.close()
        s.stop()
    db_path = out / "review" / "verdicts.sqlite"
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob("verdicts.sqlite*") if p.is_file())
    assert all(token.encode() not in raw for token in TOKENS.values())  # names, never tokens
    with ReviewDB(db_path) as db:
        assert db.integrity() == "ok"
        kept = {(v.seq, v.operator, v.note) for v in db.verdicts(all_rows=True)}
    assert set(acked) <= kept and len(acked) >= 30
    # the station starts again on the same folder and serves the history
    again = Serve(product["bundle"], out, "--token-file", str(product["tokens"]), token=TOKENS["bob"])
    try:
        notes = {v["note"] for v in again.client.get(f"/v1/results/{ids[0]}/verdicts").json()["verdicts"]}
        assert {note for _, _, note in acked if int(note.rsplit("-", 1)[1]) % len(ids) == 0} <= notes
    finally:
        assert again.stop() == 0


# ---------------------------------------------------------------- teach and rollback while a video runs
def write_video(path: Path, n: int) -> list[np.ndarray]:
    """An MJPG video of textured parts (every third with a defect); returns the frames as OpenCV decodes them."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (240, 240))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.cvtColor(textured_part(seed=100 + i, defect=DEFECT if i % 3 == 0 else None), cv2.COLOR_RGB2BGR))
    writer.release()
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(frames) == n
    return frames


def version_view(bundle: Path, version: int | None) -> Bundle:
    """The bundle with widget pinned to ``version`` (None: its unversioned files)."""
    b = Bundle(bundle)
    folder = b.product_dir("widget") if version is None else versions.versions_dir(b, "widget") / str(version)
    return b.with_product_folder("widget", folder)


def test_teach_and_rollback_over_http_while_a_video_runs_every_frame_once_by_one_version(product, tmp_path):
    bundle, out = product["bundle"], tmp_path / "out"
    frames = write_video(tmp_path / "line.avi", 12)
    s = Serve(bundle, out, "--source", f"line={tmp_path / 'line.avi'}", "--loop", "--fps-limit", "8", "--save", "none")
    line = lambda: [r for r in jsonl(out / "results.jsonl") if r["source"] == "line"]  # noqa: E731
    try:
        wait_for(lambda: len(line()) >= 6, 120, "frames decided by the first version")
        before = s.inspect(product["odd"])
        assert before["anomalous"] is True and before["version"] is None
        r = s.client.post(f"/v1/results/{before['id']}/verdict", json={"verdict": "good", "note": "dust, not a defect"})
        assert r.status_code == 200 and r.json()["teachable"] is True and r.json()["operator"] == "anonymous"
        taught = s.client.post("/v1/products/widget/teach", json={"note": "night shift"})
        assert taught.status_code == 200, taught.text
        t = taught.json()
        assert (t["version"], t["parent"], t["added"], t["results"], t["who"]) == (2, 1, 1, [before["id"]], "anonymous")
        assert t["references"] == 5 and t["previous_threshold"] == before["threshold"]
        again = s.client.post("/v1/products/widget/teach")
        assert again.status_code == 409 and again.json()["error"] == "nothing_to_teach"
        after = s.inspect(product["odd"])  # a reference now: its patch distances to the memory are zero
        assert after["version"] == 2 and after["score"] < before["score"] and after["anomalous"] is False
        assert after["score"] == pytest.approx(after["zero_shot_score"] / 2, abs=1e-6)
        assert after["threshold"] == t["threshold"] and after["memory_id"] != before["memory_id"]
        products = s.client.get("/v1/products").json()["products"]
        assert products[0]["version"] == 2 and products[0]["memory_size"] == 5
        listing = s.client.get("/v1/products/widget/versions").json()
        assert listing["serving"] == 2 and [(v["version"], v["action"], v["live"]) for v in listing["versions"]] == \
            [(1, "import", False), (2, "teach", True)]
        assert s.metric("winclip_product_version", product="widget") == 2.0
        assert s.metric("winclip_drift_samples", product="widget", kind="scores") is not None
        wait_for(lambda: sum(r["version"] == 2 for r in line()) >= 6, 120, "frames decided by version 2")
        expected = {v: Inspector(version_view(bundle, v), "widget").inspect(frames) for v in (None, 2)}

        back = s.client.post("/v1/products/widget/rollback", json={"version": 1})
        assert back.status_code == 200 and (back.json()["version"], back.json()["previous"]) == (1, 2)
        restored = s.inspect(product["odd"])
        assert restored["version"] == 1 and restored["score"] == before["score"]  # bit for bit
        assert restored["anomalous"] is True and restored["threshold"] == before["threshold"]
        # a damaged version is refused by number; the served one goes on
        memory = versions.versions_dir(Bundle(bundle), "widget") / "2" / "memory.npz"
        data = bytearray(memory.read_bytes())
        data[len(data) // 2] ^= 0xFF
        memory.write_bytes(bytes(data))
        r = s.client.post("/v1/products/widget/rollback", json={"version": 2})
        assert r.status_code == 409 and r.json()["error"] == "damaged_version" and "version 2 of product 'widget'" \
            in r.json()["detail"]
        r = s.client.post("/v1/products/widget/rollback", json={"version": 7})
        assert r.status_code == 409 and r.json()["error"] == "unknown_version"
        assert s.client.post("/v1/products/widget/rollback", json={"version": "two"}).status_code == 422
        assert s.client.post("/v1/products/nope/rollback", json={"version": 1}).status_code == 404
        assert s.inspect(product["odd"])["score"] == before["score"]
        listing = s.client.get("/v1/products/widget/versions").json()
        assert listing["serving"] == 1 and "memory.npz fails its sha256" in listing["versions"][1]["error"]
        wait_for(lambda: sum(r["version"] == 1 for r in line()) >= 4, 120, "frames decided by version 1 again")
    finally:
        assert s.stop() == 0, s.text()[-3000:]
    expected[1] = expected[None]  # version 1 is the import of the unversioned files: the same scores
    ids = {None: before, 2: after, 1: restored}
    rows = line()
    assert sorted(r["frame"] for r in rows) == list(range(len(rows)))  # every frame once, none lost
    assert {r["version"] for r in rows} == {None, 2, 1}
    changed = 0
    for r in rows:
        want = expected[r["version"]][r["frame"] % len(frames)]
        assert r["threshold"] == ids[r["version"]]["threshold"] and r["memory_id"] == ids[r["version"]]["memory_id"]
        assert r["threshold_id"] == ids[r["version"]]["threshold_id"] and r["error"] is None
        assert abs(r["score"] - want.score) < 1e-5, (r["frame"], r["version"])  # scored by that version alone
        changed += abs(expected[None][r["frame"] % len(frames)].score - expected[2][r["frame"] % len(frames)].score) > 1e-4
    assert changed >= 3, "the versions must score the frames differently for this test to tell them apart"
    versions_in_order = [r["version"] for r in sorted(rows, key=lambda r: r["frame"])]
    switches = [a for a, b in zip(versions_in_order, versions_in_order[1:]) if a != b]
    assert len(switches) == 2  # None ... None, 2 ... 2, 1 ... 1: one switch each, no frame of the old one after


# ---------------------------------------------------------------- drift alerts to MQTT
def test_drift_alerts_go_to_the_mqtt_alert_topic_with_hysteresis(product, tmp_path):
    from test_serve import MOSQUITTO, Broker, Subscriber

    if not Path(MOSQUITTO).is_file():
        pytest.skip("Debian mosquitto not installed (.ci/run installs it)")
    broker = Broker(tmp_path).start()
    sub = Subscriber(broker.port, "winclip/st1/widget/alert")
    s = Serve(product["bundle"], tmp_path / "out", "--mqtt", f"127.0.0.1:{broker.port}", "--drift-window", "4",
              "--drift-min-samples", "4", "--drift-share-above", "0.5:0.2", "--drift-ks", "none",
              "--drift-false-alarm-rate", "none")
    try:
        flagged = [s.inspect(p) for p in product["defects"]]
        assert all(r["anomalous"] for r in flagged), "the test needs flagged parts"
        wait_for(lambda: len(sub.messages) == 1, 30, "the alert")
        alert = sub.messages[0]
        assert (alert["schema"], alert["kind"], alert["station"], alert["product"], alert["statistic"],
                alert["active"], alert["value"], alert["limit"]) == (ALERT_SCHEMA, "drift", "st1", "widget",
                                                                      "share_above", True, 1.0, 0.5)
        assert s.metric("winclip_drift_alert", product="widget", statistic="share_above") == 1.0
        assert s.metric("winclip_drift", product="widget", statistic="share_above") == 1.0
        for p in product["goods"][:2]:  # share 0.75, then 0.5: between the levels, the alert stays
            assert s.inspect(p)["anomalous"] is False
        time.sleep(1.0)
        assert len(sub.messages) == 1
        for p in product["goods"][2:4]:  # 0.25, then 0.0 < 0.2: cleared
            s.inspect(p)
        wait_for(lambda: len(sub.messages) == 2, 30, "the clearing message")
        assert (sub.messages[1]["active"], sub.messages[1]["value"], sub.messages[1]["limit"]) == (False, 0.0, 0.2)
        assert s.metric("winclip_drift_alert", product="widget", statistic="share_above") == 0.0
        drift = s.client.get("/v1/products/widget/drift").json()
        assert drift["watched"] and drift["active"]["share_above"] is False and drift["limits"]["ks"] is None
    finally:
        code = s.stop()
        sub.close()
        broker.stop()
    assert code == 0, s.text()[-3000:]
    assert "drift ALERT: product widget" in s.text()


# ---------------------------------------------------------------- the review page in Chromium
class Page:
    """One headless Chromium tab driven over the DevTools protocol (a websocket)."""

    def __init__(self, profile: Path, url: str):
        from websockets.sync.client import connect

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000"]
        self.proc = subprocess.Popen([CHROMIUM, *flags, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 60, "Chromium's DevTools port")
        port = int(port_file.read_text().splitlines()[0])

        def page_target():
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            except httpx.TransportError:
                return None
            return next((t for t in targets if t["type"] == "page"), None)

        wait_for(page_target, 60, "Chromium's page")
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(page_target()["webSocketDebuggerUrl"], max_size=2**26,
                                                    open_timeout=30))
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 60.0):
        def holds():
            try:
                return self.js(expression)
            except AssertionError:  # the page is loading: no context to evaluate in yet
                return False

        wait_for(holds, timeout, what)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drive_review_page(s: Serve, product: dict, profile: Path, shot: Path) -> dict:
    """Through the page's own controls: log in, open the flagged false alarm from the queue, mark it good with a
    note, teach, then roll back; returns what the API answered for the part before, after teach and after rollback."""
    others = [s.inspect(p) for p in (*product["defects"][:2], *product["goods"][:2])]
    before = s.inspect(product["odd"])
    assert before["anomalous"] is True
    page = Page(profile, s.url + "/")
    try:
        page.wait("document.getElementById('t') !== null", "the token form")
        page.js(f"document.getElementById('t').value = {json.dumps(TOKENS['alice'])};"
                "document.getElementById('f').requestSubmit(); true")
        card = f"#queue .card[data-id='{before['id']}']"
        page.wait(f"document.querySelector(\"{card}\") !== null", "the false alarm in the queue")
        assert page.js("Number(document.getElementById('queue-count').textContent)") == 3  # odd + 2 defects
        page.js(f"document.querySelector(\"{card}\").click(); true")
        page.wait("document.getElementById('detail').open && document.getElementById('verdict-current').textContent"
                  " === 'not reviewed'", "the detail view")
        page.js("document.getElementById('verdict-note').value = 'dust on the lens'; "
                "document.getElementById('verdict-good').click(); true")
        page.wait("document.getElementById('verdict-status').dataset.outcome === 'recorded'", "the verdict")
        assert "recorded by alice" in page.js("document.getElementById('verdict-status').textContent")
        page.js("document.querySelector('#detail form[method=dialog] button').click(); true")
        page.wait(f"document.querySelector(\"{card}\") === null && "
                  "document.getElementById('queue-count').textContent === '2'", "the queue without it")
        page.wait("document.querySelector(\"button.teach[data-product='widget']\") !== null", "the teach button")
        page.js("document.querySelector(\"button.teach[data-product='widget']\").click(); true")
        page.wait("(document.querySelector(\".message[data-product='widget']\") || {}).textContent"
                  "?.startsWith('version 2 is served')", "the teach", timeout=120)
        after = s.inspect(product["odd"])
        page.wait("document.querySelector(\".versions tr.serving[data-version='2']\") !== null", "version 2 listed")
        page.screenshot(shot)
        page.js("document.querySelector(\"button.rollback[data-product='widget'][data-version='1']\").click(); true")
        page.wait("(document.querySelector(\".message[data-product='widget']\") || {}).textContent"
                  "?.startsWith('version 1 is served')", "the rollback", timeout=120)
        restored = s.inspect(product["odd"])
        page.wait("document.getElementById('counts').textContent.includes('1 taught')", "the counts")
        counts = page.js("document.getElementById('counts').textContent")
    finally:
        page.close()
    return {"before": before, "after": after, "restored": restored, "others": others, "counts": counts}


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_the_review_page_marks_a_false_alarm_good_teaches_and_rolls_back_in_chromium(product, tmp_path):
    pytest.importorskip("websockets.sync.client")
    s = Serve(product["bundle"], tmp_path / "out", "--token-file", str(product["tokens"]), token=TOKENS["bob"])
    try:
        seen = drive_review_page(s, product, tmp_path / "profile", tmp_path / "queue.png")
        review = s.client.get(f"/v1/results/{seen['before']['id']}").json()["review"]
        events = ReviewDB(tmp_path / "out" / "review" / "verdicts.sqlite").events("widget")
    finally:
        assert s.stop() == 0, s.text()[-3000:]
    before, after, restored = seen["before"], seen["after"], seen["restored"]
    assert review == {"verdict": "good", "operator": "alice", "at": review["at"], "note": "dust on the lens"}
    assert after["version"] == 2 and after["score"] < before["score"] and after["anomalous"] is False
    assert after["score"] == pytest.approx(after["zero_shot_score"] / 2, abs=1e-6)  # zero distances to the memory
    assert restored["version"] == 1 and restored["score"] == before["score"] and restored["anomalous"] is True
    assert [(e["action"], e["operator"], e["version"]) for e in reversed(events)] == [("teach", "alice", 2),
                                                                                      ("rollback", "alice", 1)]
    assert re.search(r"widget: 1 reviewed \(1 good, 0 defect\), 1 false alarms, 1 taught", seen["counts"])
    picture = cv2.imread(str(tmp_path / "queue.png"))
    assert picture is not None and picture.shape[1] == 1280 and picture.std() > 10
