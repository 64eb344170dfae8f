"""`winclip-edge demo` as library calls: the same rows `register` + `calibrate` + `infer` give on the same images."""
import json

import pytest

from winclip_edge.cli import main
from winclip_edge.demo import DEMO_PRODUCT, pick_images

pytest.importorskip("conformal_clip_data")


def test_demo_equals_the_commands_it_replaces(config_dir, tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "demo"
    demo = ["demo", "--model", str(config_dir / "tiny240.json"), "--pretrained", "none", "--bundle", str(bundle),
            "--out", str(out), "--shots", "2", "--calibration", "3", "--per-class", "1", "--batch", "2", "--quiet"]
    assert main(demo) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    references, calibration, tests = pick_images(0, 2, 3, 1)
    assert [r["file"] for r in rows] == tests and all(r["error"] is None for r in rows)
    assert all(r["anomalous"] is not None for r in rows), "the demo calibrates a threshold"

    common = ["--bundle", str(bundle), "--product", DEMO_PRODUCT, "--batch", "2", "--quiet"]
    assert main(["register", *common, *references]) == 0
    assert main(["calibrate", *common, *calibration]) == 0
    assert main(["infer", *common, "--out", str(tmp_path / "infer"), *tests]) == 0
    expected = [json.loads(line) for line in (tmp_path / "infer" / "results.jsonl").read_text().splitlines()]
    for got, want in zip(rows, expected):
        assert (got["score"], got["anomalous"], got["threshold"]) == (want["score"], want["anomalous"], want["threshold"])
    # A second run reuses the bundle (no export) and still exits 0.
    assert main(demo) == 0
