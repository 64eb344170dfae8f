"""The HTTP face end to end: `winclip-edge serve --http` started as users start it (a subprocess with uvicorn inside),
every endpoint, the error statuses, auth, concurrent requests against `infer`, reload in flight, metrics, Chromium."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import free_port, terminate, textured_part, wait_http_ready

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

PRODUCTS = ("widget", "gadget")
READY_TIMEOUT_S = 120
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "winclip_edge.cli", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"winclip-edge {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


class Station:
    """A `winclip-edge serve --http` subprocess on a free loopback port."""

    def __init__(self, bundle: Path, out: Path, *extra: str, token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = out.with_suffix(".log")
        out.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "winclip_edge.cli", "serve", "--http", f"127.0.0.1:{self.port}",
                "--bundle", str(bundle), *(a for p in PRODUCTS for a in ("--product", p)), "--out", str(out),
                "--station", "test-station", "--max-batch", "8", "--max-wait-ms", "150", *extra]
        env = {**os.environ, "WINCLIP_TOKEN": token} if token else {k: v for k, v in os.environ.items() if k != "WINCLIP_TOKEN"}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=120)
        wait_http_ready(self.proc, self.client, self.log.read_text, READY_TIMEOUT_S, self.stop)

    def stop(self) -> int:
        self.client.close()
        return terminate(self.proc)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts label names
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def jpg_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def bundle(make_bundle, tmp_path_factory) -> Path:
    """A private copy (reload tests register/calibrate into it) of a tiny bundle with two products."""
    dst = tmp_path_factory.mktemp("service") / "bundle"
    shutil.copytree(make_bundle(products=PRODUCTS), dst)
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Parts of several sizes and formats on disk: name -> path."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    for i in range(12):
        image = textured_part((180 + 10 * i, 240 - 5 * i), seed=i, defect=(40, 50, 35, 35) if i % 3 == 0 else None)
        path = folder / (f"part{i:02d}.png" if i % 2 else f"part{i:02d}.jpg")
        path.write_bytes(png_bytes(image) if i % 2 else jpg_bytes(image))
        files[path.name] = path
    return files


def infer_scores(bundle: Path, product: str, paths: list[Path], out: Path) -> dict[str, dict]:
    """What `winclip-edge infer` writes for ``paths``: file name -> results.jsonl row."""
    cli("infer", "--bundle", str(bundle), "--product", product, "--out", str(out), "--batch", "1", *map(str, paths))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {Path(r["file"]).name: r for r in rows}


@pytest.fixture(scope="module")
def expected(bundle, images, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """infer's rows for every image, per product (zero-shot: the bundle as exported)."""
    root = tmp_path_factory.mktemp("infer")
    return {p: infer_scores(bundle, p, list(images.values()), root / p) for p in PRODUCTS}


@pytest.fixture(scope="module")
def station(bundle, expected, tmp_path_factory):
    s = Station(bundle, tmp_path_factory.mktemp("station") / "out")
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def post(s: Station, path: Path, product: str, multipart: bool = True) -> httpx.Response:
    data = path.read_bytes()
    if multipart:
        return s.client.post("/v1/inspect", params={"product": product}, files={"image": (path.name, data)})
    return s.client.post("/v1/inspect", params={"product": product, "name": path.name}, content=data)


# ---------------------------------------------------------------- inspect
def test_inspect_equals_infer_multipart_and_raw(station, images, expected):
    for i, (name, path) in enumerate(list(images.items())[:4]):
        r = post(station, path, "widget", multipart=i % 2 == 0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["schema"] == "winclip-edge/result/2" and body["product"] == "widget" and body["source"] == "http"
        assert body["file"] == name and body["station"] == "test-station" and body["error"] is None
        assert body["score"] == pytest.approx(expected["widget"][name]["score"], abs=1e-5)
        assert body["mode"] == expected["widget"][name]["mode"] and body["anomalous"] is None  # no threshold yet
        assert body["overlay"] == body["urls"]["overlay"] and body["map"] == body["urls"]["map"]


def test_concurrent_requests_get_their_own_results(station, images, expected):
    """24 requests at once over two products: each answer is infer's for that image and product; engine calls batch."""
    batches_before = station.metric("winclip_engine_batch_size_count", product="widget")
    images_before = station.metric("winclip_engine_batch_size_sum", product="widget")
    for p in PRODUCTS:  # distinct answers (scores further apart than twice the tolerance, sizes), so a mix-up shows
        scores = sorted(row["score"] for row in expected[p].values())
        assert min(np.diff(scores)) > 2e-5
    jobs = [(path, p) for p in PRODUCTS for path in images.values()]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: post(station, job[0], job[1], multipart=hash(job[0].name) % 2 == 0), jobs))
    for (path, product), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["file"], body["product"]) == (path.name, product)
        assert body["score"] == pytest.approx(expected[product][path.name]["score"], abs=1e-5), (path.name, product)
        anomaly_map = np.load(io.BytesIO(station.client.get(body["urls"]["map"]).content))
        assert list(anomaly_map.shape) == expected[product][path.name]["image_size"]  # each image is a different size
    batches = station.metric("winclip_engine_batch_size_count", product="widget") - batches_before
    inspected = station.metric("winclip_engine_batch_size_sum", product="widget") - images_before
    assert inspected == len(images) and batches < inspected  # concurrent requests shared engine calls


# ---------------------------------------------------------------- results
def test_results_list_get_and_files(station, images, expected):
    path = images["part03.png"]
    body = post(station, path, "gadget").json()
    listing = station.client.get("/v1/results", params={"limit": 3}).json()
    assert len(listing["results"]) == 3 and listing["results"][0]["id"] == body["id"]  # newest first
    assert all(r["product"] == "gadget" for r in station.client.get("/v1/results", params={"product": "gadget"}).json()["results"])
    assert station.client.get("/v1/results", params={"anomalous": "true"}).json()["results"] == []  # no threshold: none
    one = station.client.get(f"/v1/results/{body['id']}")
    assert one.status_code == 200 and one.json()["score"] == body["score"]
    overlay = cv2.imdecode(np.frombuffer(station.client.get(body["urls"]["overlay"]).content, np.uint8), cv2.IMREAD_COLOR)
    source = cv2.imread(str(path))
    assert overlay.shape[1] == source.shape[1] and overlay.shape[0] > source.shape[0]  # the image plus its banner
    r = station.client.get(body["urls"]["map"])
    assert r.status_code == 200
    anomaly_map = np.load(io.BytesIO(r.content))
    infer_map = np.load(expected["gadget"]["part03.png"]["map"])
    assert anomaly_map.shape == source.shape[:2] and np.allclose(anomaly_map, infer_map, atol=1e-5)
    picture = cv2.imdecode(np.frombuffer(station.client.get(body["urls"]["image"]).content, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == source.shape


def test_bad_requests_get_their_status_and_the_service_goes_on(station, images, expected):
    c = station.client
    r = post(station, images["part01.png"], "bolt")
    assert r.status_code == 404 and r.json()["error"] == "unknown_product" and "widget" in r.json()["detail"]
    r = c.post("/v1/inspect", params={"product": "widget"}, content=b"%PDF-1.4 not an image")
    assert r.status_code == 422 and r.json()["error"] == "bad_image" and "not an image" in r.json()["detail"]
    whole = images["part01.png"].read_bytes()
    r = c.post("/v1/inspect", params={"product": "widget"}, files={"image": ("cut.png", whole[: len(whole) // 2])})
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    r = c.post("/v1/inspect", params={"product": "widget"}, files={"other": ("a.png", whole)})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]
    r = c.post("/v1/inspect", params={"product": "widget"}, content=b"")
    assert r.status_code == 422
    for bad in ("zz", "0" * 31, "../../etc/passwd", "..%2F..%2Fmanifest.json", "A" * 32):
        r = c.get(f"/v1/results/{bad}")
        assert r.status_code in (404, 422) and r.headers["content-type"].startswith("application/json"), bad
    assert c.get(f"/v1/results/{'0' * 32}").status_code == 404
    assert c.get(f"/v1/results/{'0' * 32}/overlay.png").status_code == 404
    assert c.post("/v1/products/bolt/reload").status_code == 404
    good = post(station, images["part01.png"], "widget")  # after all of that, a good request is still exact
    assert good.status_code == 200 and good.json()["score"] == pytest.approx(expected["widget"]["part01.png"]["score"], abs=1e-5)


def _raw_http(port: int, head: bytes, chunks=(), read_after: int = 0) -> bytes:
    """Send a request by hand (a declared length that never comes, or chunks); return what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending: expected for 413
            pass
        answer = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except OSError:
            pass
        return answer


def test_oversized_uploads_get_413_before_the_body_is_read(bundle, images, tmp_path):
    s = Station(bundle, tmp_path / "out", "--max-upload-mb", "1", "--request-timeout", "0.001")
    try:
        # Declared 200 MB and not one byte of body sent: the answer must come anyway.
        head = (f"POST /v1/inspect?product=widget HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {200 * 2**20}\r\n\r\n").encode()
        answer = _raw_http(s.port, head)
        assert answer.startswith(b"HTTP/1.1 413") and b"too_large" in answer
        # No length declared (chunked): counted while it arrives, refused once over 1 MiB.
        head = (b"POST /v1/inspect?product=widget HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 2**18
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        answer = _raw_http(s.port, head, [chunk] * 8 + [b"0\r\n\r\n"])
        assert answer.startswith(b"HTTP/1.1 413") and b"too_large" in answer
        # The same through multipart; a small upload passes the limit (and then outlives --request-timeout: 504).
        r = s.client.post("/v1/inspect", params={"product": "widget"}, files={"image": ("big.png", b"\x89PNG" + b"0" * 2**21)})
        assert r.status_code == 413
        assert s.metric("winclip_errors_total", kind="too_large") == 3
        r = post(s, images["part01.png"], "widget")
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert s.client.get("/healthz").status_code == 200
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- products, reload
def test_products_and_reload_while_requests_are_in_flight(station, bundle, images, expected, tmp_path):
    before = {p["product"]: p for p in station.client.get("/v1/products").json()["products"]}
    assert set(before) == set(PRODUCTS) and before["widget"]["mode"] == "zero-shot" and before["widget"]["threshold"] is None
    assert before["widget"]["model"] and before["widget"]["memory_size"] == 0
    # register + calibrate beside the running service (separate processes, as users do)
    refs = [images[n] for n in ("part01.png", "part05.png", "part07.png")]
    cli("register", "--bundle", str(bundle), "--product", "widget", *map(str, refs))
    cli("calibrate", "--bundle", str(bundle), "--product", "widget")
    probe = images["part06.jpg"]
    old = expected["widget"][probe.name]["score"]
    new = infer_scores(bundle, "widget", [probe], tmp_path / "new")[probe.name]
    assert abs(new["score"] - old) > 1e-3  # the reload must be visible
    r = post(station, probe, "widget")
    assert r.json()["score"] == pytest.approx(old, abs=1e-5)  # not loaded until reload
    # requests in flight while the reload happens: each is entirely old or entirely new
    stop = threading.Event()
    answers: list[dict] = []

    def hammer():
        while not stop.is_set():
            answers.append(post(station, probe, "widget").json())

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    reloaded = station.client.post("/v1/products/widget/reload")
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert reloaded.status_code == 200, reloaded.text
    info = reloaded.json()
    assert info["mode"] == "few-shot (K=3)" and info["memory_size"] == 3 and info["generation"] == 2
    assert info["threshold"] is not None and info["calibrated_at"]
    assert answers and all(a["score"] == pytest.approx(old, abs=1e-5) or
                           (a["score"] == pytest.approx(new["score"], abs=1e-5) and a["anomalous"] is not None)
                           for a in answers)
    after = post(station, probe, "widget").json()
    assert after["score"] == pytest.approx(new["score"], abs=1e-5) and after["anomalous"] == new["anomalous"]
    assert after["memory_id"] == info["memory_sha256"] and after["threshold"] == pytest.approx(info["threshold"])
    # a damaged file: reload refused, the loaded product stays in use
    threshold = bundle / "products" / "widget" / "threshold.json"
    saved = threshold.read_bytes()
    threshold.write_text(threshold.read_text().replace('"value": ', '"value": 1'))
    try:
        r = station.client.post("/v1/products/widget/reload")
        assert r.status_code == 409 and "sha256" in r.json()["detail"]
    finally:
        threshold.write_bytes(saved)
    assert post(station, probe, "widget").json()["score"] == pytest.approx(new["score"], abs=1e-5)
    assert station.metric("winclip_product_reloads_total", product="widget", outcome="failed") == 1


# ---------------------------------------------------------------- health, metrics
def test_health_ready_and_metrics_move(station, images):
    assert station.client.get("/healthz").json() == {"status": "ok"}
    assert station.client.get("/readyz").json()["products"] == list(PRODUCTS)
    seen = station.metric("winclip_inspections_total", product="gadget", verdict="undecided")
    latency = station.metric("winclip_inspection_latency_seconds_count", product="gadget", source="http")
    bad = station.metric("winclip_errors_total", kind="bad_image")
    post(station, images["part02.jpg"], "gadget")
    station.client.post("/v1/inspect", params={"product": "gadget"}, content=b"GIF89a?")
    assert station.metric("winclip_inspections_total", product="gadget", verdict="undecided") == seen + 1
    assert station.metric("winclip_inspection_latency_seconds_count", product="gadget", source="http") == latency + 1
    assert station.metric("winclip_errors_total", kind="bad_image") == bad + 1
    text = station.client.get("/metrics").text
    for name in ("winclip_stage_latency_seconds_bucket", 'winclip_queue_depth{product="gadget"}',
                 "winclip_engine_batch_size_bucket", "winclip_http_requests_total"):
        assert name in text, name
    assert station.client.get("/docs").status_code == 200 and "/v1/inspect" in station.client.get("/openapi.json").text


# ---------------------------------------------------------------- auth
def test_auth_token_and_safe_bind(bundle, images, tmp_path):
    token = "s3cret-" + "x" * 24
    s = Station(bundle, tmp_path / "out", token=token)
    try:
        anonymous = httpx.Client(base_url=s.url, timeout=30)
        wrong = httpx.Client(base_url=s.url, timeout=30, headers={"Authorization": "Bearer nope"})
        assert anonymous.get("/healthz").status_code == 200
        for c in (anonymous, wrong):
            for path in ("/readyz", "/v1/results", "/v1/products", "/metrics", "/docs", "/static/app.js",
                         f"/v1/results/{'0' * 32}/overlay.png"):
                assert c.get(path).status_code == 401, path
            assert c.post("/v1/inspect", params={"product": "widget"}, content=b"x").status_code == 401
            assert c.post("/v1/products/widget/reload").status_code == 401
        page = anonymous.get("/")
        assert page.status_code == 401 and "token" in page.text  # the small form that sets the cookie
        assert httpx.get(s.url + "/v1/results", cookies={"winclip_token": token}).status_code == 200
        assert post(s, images["part01.png"], "widget").status_code == 200
        assert s.metric("winclip_errors_total", kind="unauthorized") >= 18
        anonymous.close(), wrong.close()
    finally:
        assert s.stop() == 0
    # a non-loopback bind without --token/--insecure is refused before anything loads
    proc = cli("serve", "--http", f"0.0.0.0:{free_port()}", "--bundle", str(bundle), "--product", "widget",
               "--out", str(tmp_path / "o2"), check=False)
    assert proc.returncode == 2 and "--token" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_live_source_results_reach_the_store_and_the_page(bundle, images, tmp_path):
    """One process serves a hot folder and HTTP: the folder's decisions are listed beside the uploads."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    names = ("part04.jpg", "part05.png")
    for name in names:
        shutil.copy(images[name], incoming / name)
    want = infer_scores(bundle, "widget", [images[n] for n in names], tmp_path / "infer")  # the bundle as it is now
    s = Station(bundle, tmp_path / "out", "--source", f"line1=folder:{incoming}", "--save", "all", "--settle-s", "0.2")
    try:
        deadline = time.monotonic() + 60
        while True:
            live = [r for r in s.client.get("/v1/results").json()["results"] if r["source"] == "line1"]
            if len(live) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert sorted(Path(r["file"]).name for r in live) == ["part04.jpg", "part05.png"]
        for r in live:
            assert r["product"] == "widget" and r["score"] == pytest.approx(want[Path(r["file"]).name]["score"], abs=1e-5)
            assert s.client.get(r["urls"]["overlay"]).status_code == 200
        jsonl = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
        assert {r["id"] for r in live} <= {row["id"] for row in jsonl}  # the same ids as the sinks
        verdicts = ("anomalous", "normal", "undecided")
        assert sum(s.metric("winclip_inspections_total", product="widget", verdict=v) for v in verdicts) == 2
        text = s.client.get("/metrics").text  # the station's own counters, read at scrape time
        assert 'winclip_dropped_frames_total{source="line1"} 0.0' in text and 'winclip_source_reconnects_total{source="line1"}' in text
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- the review page
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_review_page_renders_the_results_in_chromium(station, images, tmp_path):
    for name in ("part00.jpg", "part09.png"):
        assert post(station, images[name], "gadget").status_code == 200
    newest = station.client.get("/v1/results", params={"limit": 60}).json()["results"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", station.url + "/"], capture_output=True, text=True,
                         timeout=120).stdout
    for r in newest:
        assert f'data-id="{r["id"]}"' in dom, r["id"]  # every result the API lists is a card on the page
    assert dom.count('class="card ') == len(newest) and "part09.png" in dom and "gadget" in dom
    one = newest[0]  # the detail view, opened by its address
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", f"{station.url}/#result={one['id']}"], capture_output=True,
                         text=True, timeout=120).stdout
    assert re.search(r'<dialog id="detail" open', dom) and f'src="/v1/results/{one["id"]}/image.jpg"' in dom
    assert f'src="/v1/results/{one["id"]}/overlay.png"' in dom and f"{one['score']:.6f}" in dom
    shot = tmp_path / "review.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,900", station.url + "/"],
                   capture_output=True, timeout=120)
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (900, 1280) and picture.std() > 10


def test_tiling_and_roi_flags_of_serve_equal_infer_with_the_same_flags(make_bundle, images, tmp_path):
    """serve takes infer's --tile/--roi flags (over the product's setting): the HTTP score and map equal infer's."""
    bundle = tmp_path / "bundle"  # as exported: the module's bundle gets memories and thresholds from other tests
    shutil.copytree(make_bundle(products=PRODUCTS), bundle)
    flags = ["--tile", "120", "--tile-overlap", "0.3", "--roi", "10,10,150,150"]
    paths = list(images.values())[:2]
    cli("infer", "--bundle", str(bundle), "--product", "widget", "--out", str(tmp_path / "infer"), "--batch", "1",
        *flags, *map(str, paths))
    want = {Path(r["file"]).name: r for r in
            map(json.loads, (tmp_path / "infer" / "results.jsonl").read_text().splitlines())}
    plain = infer_scores(bundle, "widget", paths, tmp_path / "plain")
    s = Station(bundle, tmp_path / "out", *flags)
    try:
        for path in paths:
            r = post(s, path, "widget")
            assert r.status_code == 200, r.text
            body = r.json()
            assert abs(body["score"] - want[path.name]["score"]) < 1e-6
            served = np.load(io.BytesIO(s.client.get(f"/v1/results/{body['id']}/map.npy").content))
            assert np.abs(served - np.load(want[path.name]["map"])).max() < 1e-5
            assert np.abs(served - np.load(plain[path.name]["map"])).max() > 1e-3, "the flags changed nothing"
            assert served[:10].max() == 0 and served[:, :10].max() == 0, "outside the ROI"
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]
    bad = cli("serve", "--bundle", str(bundle), "--product", "widget", "--out", str(tmp_path / "bad"),
              "--http", f"127.0.0.1:{free_port()}", "--tile-overlap", "0.3", check=False)
    assert bad.returncode == 2 and "--tile" in bad.stderr
