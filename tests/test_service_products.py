"""`POST /v1/products` on `serve --http`: a product named over HTTP is encoded by the bundle's text encoder (no torch)
and served at once; its scores equal `infer` with the same product; errors get their status and the station goes on."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import textured_part

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_service import PRODUCTS, Station, infer_scores, png_bytes  # noqa: E402  (the same station as users start)


@pytest.fixture(scope="module")
def station(make_bundle, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("products") / "bundle"
    shutil.copytree(make_bundle(products=PRODUCTS, with_text_encoder=True), bundle)
    s = Station(bundle, tmp_path_factory.mktemp("station") / "out")
    s.bundle = bundle
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def test_a_product_named_over_http_is_served_like_infer(station, tmp_path):
    from winclip_edge.bundle import Bundle
    from winclip_edge.products import load_text

    r = station.client.post("/v1/products", json={"name": "cable", "normal_states": ["{o} with clean insulation"]})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["product"] == "cable" and body["prompts"] == {"normal": 8 * 22, "anomalous": 4 * 22}
    assert body["encoder"] == {"source": "text.onnx", "precision": "fp32"}
    assert "cable" in [p["product"] for p in station.client.get("/v1/products").json()["products"]]
    assert load_text(Bundle(station.bundle), "cable").normal_prompts[-1].endswith("cable with clean insulation for anomaly detection.")

    path = tmp_path / "part.png"
    path.write_bytes(png_bytes(textured_part(seed=5, defect=(40, 40, 50, 50))))
    r = station.client.post("/v1/inspect", params={"product": "cable"}, files={"image": (path.name, path.read_bytes())})
    assert r.status_code == 200, r.text
    expected = infer_scores(station.bundle, "cable", [path], tmp_path / "infer")[path.name]
    other = infer_scores(station.bundle, "widget", [path], tmp_path / "infer_widget")[path.name]
    assert abs(r.json()["score"] - expected["score"]) < 1e-6
    assert abs(expected["score"] - other["score"]) > 1e-6  # the new product's prototypes decided it


def test_refusals_get_their_status_and_the_station_goes_on(station, tmp_path):
    assert station.client.post("/v1/products", json={"name": "widget"}).status_code == 409  # exists, no force
    r = station.client.post("/v1/products", json={"name": "gear", "normal_states": ["no placeholder"]})
    assert r.status_code == 422 and r.json()["error"] == "bad_prompt"
    from winclip_edge.names import NAME_RULE

    for bad in ("../evil", "a+b", "a#b", "metal nut", "x;rm", "ünï"):  # the one rule, the one message
        r = station.client.post("/v1/products", json={"name": bad})
        assert r.status_code == 422 and r.json()["error"] == "bad_name" and NAME_RULE in r.json()["detail"], r.text
    r = station.client.post("/v1/products", json={"name": "Widget"})
    assert r.status_code == 409 and r.json()["error"] == "name_clash" and "only in case" in r.json()["detail"]
    assert not (station.bundle / "products" / "Widget").exists()
    assert station.client.post("/v1/products", json={}).status_code == 422  # no name

    r = station.client.post("/v1/products", json={"name": "widget", "object_name": "metal widget", "force": True})
    assert r.status_code == 201 and r.json()["generation"] == 2  # re-encoded and reloaded

    onnx = station.bundle / "text.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    r = station.client.post("/v1/products", json={"name": "bolt"})
    assert r.status_code == 409 and "sha256" in r.json()["detail"]
    assert not (station.bundle / "products" / "bolt").exists()

    path = tmp_path / "part.png"
    path.write_bytes(png_bytes(textured_part(seed=6)))
    r = station.client.post("/v1/inspect", params={"product": "widget"}, files={"image": (path.name, path.read_bytes())})
    assert r.status_code == 200 and np.isfinite(r.json()["score"])
