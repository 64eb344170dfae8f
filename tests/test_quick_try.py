"""The README's "try it in a minute": the shipped winclip-tiny config through `demo`, then `serve --http` on that
bundle answering the documented curl (multipart field `image`, or its alias `file`) with infer's score, and the
review page. Random weights: the scores mean nothing, the faces are real."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

pytest.importorskip("conformal_clip_data")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from winclip_edge.bundle import Bundle  # noqa: E402
from winclip_edge.cli import main  # noqa: E402
from winclip_edge.demo import DEMO_PRODUCT  # noqa: E402

pytestmark = pytest.mark.slow


def test_shipped_tiny_config_resolves_by_name():
    pytest.importorskip("open_clip")
    from winclip_edge.export.models import SHIPPED_CONFIGS, ModelNotFoundError, resolve_model, shipped_models

    assert "winclip-tiny" in shipped_models()
    name, config = resolve_model("winclip-tiny")
    assert name == "winclip-tiny" and config == json.loads((SHIPPED_CONFIGS / "tiny.json").read_text())
    assert config["vision_cfg"]["image_size"] == 240 and config["vision_cfg"]["patch_size"] == 16  # the default grid
    with pytest.raises(ModelNotFoundError, match="winclip-tiny"):
        resolve_model("winclip-huge")


@pytest.fixture(scope="module")
def tried(tmp_path_factory):
    """`winclip-edge demo --model winclip-tiny --pretrained none --bundle B --out O`, as the README says."""
    pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("try")
    bundle, out = root / "models" / "tiny", root / "runs" / "tiny"
    assert main(["demo", "--model", "winclip-tiny", "--pretrained", "none", "--bundle", str(bundle), "--out", str(out),
                 "--quiet"]) == 0
    return bundle, out


def test_demo_on_the_tiny_model_calibrates_a_small_bundle(tried):
    bundle, out = tried
    b = Bundle(bundle)
    assert b.manifest.model == "winclip-tiny"
    assert sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) < 8 * 2**20
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["error"] is None and r["anomalous"] is not None for r in rows)


def test_serve_answers_the_documented_curl_with_infers_score(tried, tmp_path):
    bundle, out = tried
    image = Path(json.loads((out / "results.jsonl").read_text().splitlines()[-1])["file"])
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "winclip_edge.cli", "serve", "--http", f"127.0.0.1:{port}",
                             "--bundle", str(bundle), "--product", DEMO_PRODUCT, "--out", str(tmp_path / "station")],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve not ready:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        want = {json.loads(line)["file"]: json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()}
        for field in ("image", "file"):  # docs/service.md: `file` is taken when there is no `image`
            got = client.post("/v1/inspect", params={"product": DEMO_PRODUCT},
                              files={field: (image.name, image.read_bytes())})
            assert got.status_code == 200, got.text
            body = got.json()
            row = want[str(image)]  # the demo ran batches of 8, the station batch 1: equal up to float rounding
            assert body["score"] == pytest.approx(row["score"], abs=1e-6) and body["threshold"] == row["threshold"]
            assert client.get(body["urls"]["overlay"]).status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
