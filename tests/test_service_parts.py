"""The service's parts without a server: the review store (bounded, crash leftovers, ids), bind safety, the token."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.inspector import InspectionResult

pytest.importorskip("fastapi")

from winclip_edge.cli.common import CliError  # noqa: E402
from winclip_edge.cli.serve_http import parse_host_port  # noqa: E402
from winclip_edge.service.auth import presented_token  # noqa: E402
from winclip_edge.service.config import HttpConfig, ServiceError, is_loopback  # noqa: E402
from winclip_edge.service.store import ResultStore, valid_id  # noqa: E402


def record(product="widget", anomalous=None, score=0.5) -> dict:
    return {"id": uuid.uuid4().hex, "product": product, "score": score, "anomalous": anomalous, "threshold": 0.6}


def test_store_keeps_the_newest_and_their_files(tmp_path):
    store = ResultStore(tmp_path, capacity=3)
    image = textured_part((50, 70), seed=1)
    anomaly_map = np.linspace(0, 1, 50 * 70, dtype=np.float32).reshape(50, 70)
    result = InspectionResult(path="p", score=0.5, anomalous=False, threshold=0.6, anomaly_map=anomaly_map, image=image)
    ids = [store.add(record(anomalous=i % 2 == 1), result) for i in range(5)]
    assert [r["id"] for r in store.newest()] == ids[:1:-1] and len(store) == 3
    assert store.get(ids[0]) is None and not list(tmp_path.glob(f"{ids[0]}*"))  # evicted with its files
    assert np.array_equal(np.load(store.file(ids[4], "map")), anomaly_map)
    assert store.file(ids[4], "overlay").stat().st_size > 0 and store.file(ids[4], "image").stat().st_size > 0
    assert [r["id"] for r in store.newest(anomalous=True)] == [ids[3]]
    assert store.newest(product="gadget") == [] and len(store.newest(limit=1)) == 1


def test_store_survives_a_restart_and_removes_half_written_results(tmp_path):
    store = ResultStore(tmp_path, capacity=10)
    result = InspectionResult(path="p", score=0.5, anomaly_map=np.zeros((40, 40), np.float32), image=textured_part((40, 40)))
    kept = [store.add(record(), result) for _ in range(2)]
    orphan = uuid.uuid4().hex  # files written, record never: a crash in between
    (tmp_path / f"{orphan}.overlay.png").write_bytes(b"x")
    (tmp_path / f".{orphan}.json.123.tmp").write_text("{")
    (tmp_path / f"{uuid.uuid4().hex}.json").write_text("{not json")
    (tmp_path / "results.jsonl").write_text("{}\n")  # not the store's: left alone
    (tmp_path / "notes.png").write_bytes(b"x")
    reopened = ResultStore(tmp_path, capacity=10)
    assert [r["id"] for r in reopened.newest()] == kept[::-1]
    assert not list(tmp_path.glob(f"*{orphan}*")) and len(list(tmp_path.glob("*.json"))) == 2
    assert (tmp_path / "results.jsonl").exists() and (tmp_path / "notes.png").exists()


@pytest.mark.parametrize("bad", ["", "../x", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "0" * 30 + "/.", None])
def test_ids_are_validated_before_any_path_is_built(tmp_path, bad):
    store = ResultStore(tmp_path)
    assert not (isinstance(bad, str) and valid_id(bad))
    if isinstance(bad, str):
        assert store.get(bad) is None and store.file(bad, "map") is None
    with pytest.raises(ValueError):
        store.add({**record(), "id": bad})


def test_bind_safety():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.4.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("station.local")
    HttpConfig().check()
    HttpConfig(host="0.0.0.0", token="t" * 32).check()
    HttpConfig(host="0.0.0.0", insecure=True).check()
    for bad in (HttpConfig(host="0.0.0.0"), HttpConfig(host="::"), HttpConfig(token="  "), HttpConfig(max_upload_mb=0),
                HttpConfig(port=70000), HttpConfig(keep_results=0), HttpConfig(result_timeout_s=0)):
        with pytest.raises(ServiceError):
            bad.check()
    assert parse_host_port("127.0.0.1:8080") == ("127.0.0.1", 8080) and parse_host_port("[::1]:9") == ("::1", 9)
    for bad in ("8080", "host:", ":80", "h:x"):
        with pytest.raises(CliError):
            parse_host_port(bad)


def test_token_from_header_or_cookie():
    assert presented_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_token([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert presented_token([(b"authorization", b"Basic abc")]) is None
    assert presented_token([(b"cookie", b"a=1; winclip_token=x%20y")]) == b"x y"
    assert presented_token([(b"cookie", b"a=1")]) is None
    assert presented_token([]) is None


def test_catalog_serves_products_over_one_engine_and_reloads_atomically(make_bundle, tmp_path):
    import shutil

    from winclip_edge.catalog import Catalog, UnknownProduct
    from winclip_edge.bundle import THRESHOLD

    bundle = tmp_path / "bundle"
    shutil.copytree(make_bundle(products=("widget", "gadget")), bundle)
    catalog = Catalog(bundle, ["widget", "gadget", "widget"])
    try:
        assert catalog.products == ["widget", "gadget"]
        widget, gadget = catalog.get("widget"), catalog.get("gadget")
        assert widget.engine is gadget.engine is catalog.engine  # one engine, shared
        with pytest.raises(UnknownProduct, match="gadget"):
            catalog.get("bolt")
        image = textured_part(seed=3)
        before = widget.inspect([image])[0].score
        assert gadget.inspect([image])[0].score != pytest.approx(before, abs=1e-6)  # products differ
        catalog.reload("widget")
        assert catalog.get("widget") is not widget and catalog.info("widget").generation == 2
        assert catalog.get("widget").inspect([image])[0].score == pytest.approx(before, abs=1e-6)
        (bundle / "products" / "widget" / THRESHOLD).write_text("{}")  # damaged: refused, the loaded one stays
        current = catalog.get("widget")
        with pytest.raises(Exception, match="threshold.json"):
            catalog.reload("widget")
        assert catalog.get("widget") is current and catalog.info("widget").generation == 2
    finally:
        catalog.close()
