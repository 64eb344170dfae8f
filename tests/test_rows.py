"""One decision row: ``infer``, ``serve`` (results.jsonl and its sinks) and the HTTP face write the same fields with the
same scores for the same image (winclip_edge/rows.py), and docs/line.md lists every field."""
from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import cv2
import pytest

from conftest import free_port, textured_part, wait_for
from winclip_edge.cli import main
from winclip_edge.rows import ROW_FIELDS, SCHEMA, ResultRow

ROOT = Path(__file__).resolve().parents[1]
# What only a face that captures knows (null in infer's rows) and what only the hot folder knows.
CAPTURE_FIELDS = {"station", "source", "captured_at", "latency_ms"}
FILE_FIELDS = {"file_sha256", "moved_to"}
CAMERA_FIELDS = {"camera_frame_id", "camera_timestamp_ns"}  # genicam: sources only (tests/test_genicam.py)
# Fields about the decision itself: the same value from every face.
DECISION_FIELDS = {"schema", "product", "score", "anomalous", "threshold", "zero_shot_score", "mode", "model",
                   "weights_id", "memory_id", "threshold_id", "image_size", "error"}


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with a few-shot memory and a threshold: every id and decision field has a value."""
    from winclip_edge.calibration import calibrate
    from winclip_edge.inspector import Inspector
    from winclip_edge.products import save_memory, save_threshold

    folder = tmp_path_factory.mktemp("rows") / "bundle"
    shutil.copytree(tiny_bundle, folder)
    inspector = Inspector(folder, "widget")
    save_memory(inspector.bundle, "widget", inspector.embed_references([textured_part(seed=s) for s in range(3)])[0])
    inspector = Inspector(folder, "widget")
    save_threshold(inspector.bundle, "widget", calibrate(inspector)[0])
    return folder


def images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, defect in enumerate((None, (60, 80, 50, 50), None)):
        path = folder / f"part{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(textured_part(seed=40 + i, defect=defect), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_serve_and_http_rows_have_the_same_fields_and_scores(calibrated, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("watchdog")
    import httpx

    from winclip_edge.line import build_station
    from winclip_edge.line.spec import BatchingSpec, HttpSpec, OutputsSpec, SourceSpec, StationSpec

    paths = images(tmp_path / "images")
    assert main(["infer", "--bundle", str(calibrated), "--product", "widget", "--batch", "1", "--out",
                 str(tmp_path / "infer"), "--quiet", *map(str, paths)]) == 0
    inferred = {Path(r["file"]).name: r for r in jsonl(tmp_path / "infer" / "results.jsonl")}

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for path in paths:
        shutil.copy(path, inbox / path.name)
    port = free_port()
    spec = StationSpec(station="rows", bundle=str(calibrated), products=("widget",),
                       sources=(SourceSpec(f"folder:{inbox}", "line"),), batching=BatchingSpec(max_batch=1),
                       outputs=OutputsSpec(out=str(tmp_path / "out"), save="all", status_every=0),
                       http=HttpSpec(listen=f"127.0.0.1:{port}"))
    station = build_station(spec)
    stop = threading.Event()
    runner = threading.Thread(target=station.run, args=(stop,))
    runner.start()
    answered = {}
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        wait_for(lambda: _ready(client), 120, "the HTTP face")
        for path in paths:
            r = client.post("/v1/inspect", params={"product": "widget"}, files={"image": (path.name, path.read_bytes())})
            assert r.status_code == 200, r.text
            answered[path.name] = r.json()
        wait_for(lambda: (tmp_path / "out" / "results.jsonl").is_file()
                 and len(jsonl(tmp_path / "out" / "results.jsonl")) == len(paths), 120, "the folder's rows")
        stored = {r["id"]: r for r in client.get("/v1/results", params={"limit": 50}).json()["results"]}
        client.close()
    finally:
        stop.set()
        runner.join(120)
    assert not runner.is_alive()
    rows = jsonl(tmp_path / "out" / "results.jsonl")
    served = {Path(r["file"]).name: r for r in rows if r["source"] == "line"}
    assert len(served) == len(rows)  # HTTP decisions go to the answer and the review store (as before)
    assert sorted(served) == sorted(inferred) == sorted(answered)
    for name in inferred:
        infer_row, serve_row = inferred[name], served[name]
        http_row = {k: v for k, v in answered[name].items() if k != "urls"}
        assert list(infer_row) == list(serve_row) == list(http_row) == list(ROW_FIELDS)  # same fields, same order
        assert {k: v for k, v in stored[http_row["id"]].items() if k not in ("urls", "review")} == http_row
        # the same bytes decoded by the same code and scored at batch 1 everywhere: bit for bit
        for key in DECISION_FIELDS:
            assert infer_row[key] == serve_row[key] == http_row[key], key
        assert infer_row["schema"] == SCHEMA and infer_row["memory_id"] and infer_row["threshold_id"]
        assert infer_row["anomalous"] is not None and infer_row["threshold"] is not None
        assert all(infer_row[k] is None for k in CAPTURE_FIELDS | FILE_FIELDS | {"frame"})  # do not apply: null
        assert all(row[k] is None for row in (infer_row, serve_row, http_row) for k in CAMERA_FIELDS)
        assert serve_row["station"] == http_row["station"] == "rows" and http_row["source"] == "http"
        assert serve_row["file_sha256"] and Path(serve_row["moved_to"]).is_file() and http_row["moved_to"] is None
        assert all(r["captured_at"] and r["latency_ms"] > 0 for r in (serve_row, http_row))
        assert len({infer_row["id"], serve_row["id"], http_row["id"]}) == 3  # one id per decision
    assert sum(r["anomalous"] for r in inferred.values()) >= 1, "a defect decided anomalous makes the test stronger"


def _ready(client) -> bool:
    import httpx

    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_a_failed_write_keeps_the_score_and_sets_the_error(tiny_bundle):
    from winclip_edge.inspector import Inspector
    from winclip_edge.rows import ModelIds

    inspector = Inspector(tiny_bundle, "widget")
    [result] = inspector.inspect([textured_part((64, 64))])
    ids = ModelIds.of(inspector)
    row = ResultRow.of(result, ids, error="part: cannot write outputs (disk full)").as_dict()
    assert row["error"].endswith("(disk full)") and row["score"] == result.score
    assert ResultRow.of(result, ids, error=None).as_dict()["error"] is None  # no output error: the result's own
    with pytest.raises(TypeError):
        ResultRow.of(result, ids, part_number="17")  # a field the row does not have is refused, not written


def documented_fields(doc: str, heading: str) -> list[str]:
    """The first column of the table under ``heading`` in docs/line.md (``a``, ``b`` rows count both)."""
    text = (ROOT / "docs" / doc).read_text()
    section = text[text.index(heading):]
    start = section.index("\n|") + 1
    table = section[start:section.index("\n\n", start)]
    names = []
    for line in table.splitlines()[2:]:
        names += re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])
    return names


def test_docs_list_every_row_field_and_map_the_old_infer_row():
    assert sorted(documented_fields("line.md", "## The result row")) == sorted(ROW_FIELDS)
    old_infer = {"path", "score", "anomalous", "threshold", "zero_shot_score", "mode", "map", "overlay", "image_size",
                 "timings_ms", "error"}  # the keys of an infer row before winclip-edge/result/2
    assert sorted(documented_fields("line.md", "### From the older rows")) == sorted(old_infer)
