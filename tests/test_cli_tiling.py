"""The tiling / ROI faces: `winclip-edge roi`, the --tile/--roi flags of register/calibrate/infer, eval --tile."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.cli import main
from winclip_edge.products import load_tiling
from winclip_edge.tiles.roi import load_roi
from winclip_edge.tiles.tiling import TilingConfig

from test_tiled_inspection import frame, part_surface


def write_frames(folder, surface, seeds, defect=None):
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        cv2.imwrite(str(folder / f"f{s}.png"), cv2.cvtColor(frame(surface, s, defect), cv2.COLOR_RGB2BGR))
    return str(folder)


def test_roi_command_sets_shows_and_clears(bundle_copy, tmp_path, capsys):
    base = ["--bundle", str(bundle_copy), "--product", "widget"]
    mask = np.zeros((50, 80), np.uint8)
    mask[10:40, 20:60] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    assert main(["roi", *base, str(tmp_path / "mask.png")]) == 0
    assert np.array_equal(load_roi(Bundle(bundle_copy), "widget").mask, mask)
    assert main(["roi", *base]) == 0 and "mask_sha256" in capsys.readouterr().out
    assert main(["roi", *base, "--rect", "5,6,70,80"]) == 0
    assert load_roi(Bundle(bundle_copy), "widget").rect == (5, 6, 70, 80)
    capsys.readouterr()
    assert main(["info", "--bundle", str(bundle_copy)]) == 0
    widget = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("widget:"))
    assert "whole frame" in widget and "ROI {'rect': [5, 6, 70, 80]}" in widget, widget
    for bad in (["--rect", "5,6,70"], [str(tmp_path / "missing.png")], ["--clear", "--rect", "1,1,1,1"]):
        capsys.readouterr()
        assert main(["roi", *base, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("winclip-edge roi: error:") and err.count("\n") == 1
    assert main(["roi", *base, "--clear"]) == 0 and load_roi(Bundle(bundle_copy), "widget") is None


def test_register_records_the_tiling_and_infer_uses_it_with_the_roi(bundle_copy, tmp_path, capsys):
    base = ["--bundle", str(bundle_copy), "--product", "widget", "--quiet"]
    surface = part_surface((360, 480))
    refs = write_frames(tmp_path / "refs", surface, (1, 2))
    normal = write_frames(tmp_path / "normal", surface, (3, 4))
    defective = write_frames(tmp_path / "bad", surface, (5,), defect=(150, 400, 30))
    assert main(["register", *base, "--tile", "240", "--tile-overlap", "0.3", refs]) == 0
    assert load_tiling(Bundle(bundle_copy), "widget") == TilingConfig(tile=240, overlap=0.3)
    capsys.readouterr()
    assert main(["info", "--bundle", str(bundle_copy)]) == 0
    assert "tiles 240 overlap 0.3 position memory" in capsys.readouterr().out
    assert main(["roi", "--bundle", str(bundle_copy), "--product", "widget", "--rect", "0,0,300,360"]) == 0
    assert main(["calibrate", *base, normal]) == 0
    out = tmp_path / "out"
    assert main(["infer", *base, "--out", str(out), defective]) == 0
    row = json.loads((out / "results.jsonl").read_text())
    assert row["error"] is None and row["anomalous"] is False and row["image_size"] == [360, 480]
    assert np.load(row["map"])[:, 300:].max() == 0  # zeroed outside the ROI
    overlay = cv2.imread(row["overlay"])
    banner = overlay.shape[0] - 360
    b, g, r = (int(v) for v in overlay[banner + 180, 299])  # the ROI's right edge, outlined in yellow
    assert b < 80 and g > 200 and r > 200
    # the threshold belongs to this tiling and ROI: other flags are refused with the remedy
    capsys.readouterr()
    for flags in (["--tile", "off"], ["--no-roi"], ["--no-global"]):
        assert main(["infer", *base, "--out", str(tmp_path / "o2"), *flags, defective]) == 2
        assert "calibrate" in capsys.readouterr().err
    assert main(["infer", *base, "--out", str(tmp_path / "o3"), "--no-roi", "--tile", "off", "--zero-shot",
                 defective]) == 2  # zero-shot: the few-shot threshold does not apply either
    for bad in (["--tile", "48o"], ["--tile-overlap", "2"], ["--roi", "1,2,3"]):
        capsys.readouterr()
        assert main(["infer", *base, "--out", str(tmp_path / "o4"), *bad, defective]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    # back to whole frames: register and calibrate record the tiling they ran with
    assert main(["register", *base, "--tile", "off", refs]) == 0
    assert load_tiling(Bundle(bundle_copy), "widget").tile is None
    assert main(["calibrate", *base, "--zero-shot", "--tile", "auto", "--min-defect", "20", normal]) == 0
    assert load_tiling(Bundle(bundle_copy), "widget") == TilingConfig(tile="auto", min_defect=20)
    assert main(["infer", *base, "--zero-shot", "--out", str(tmp_path / "o5"), defective]) == 0  # threshold accepted


def test_eval_with_tiles_scores_like_the_inspector_with_the_same_references(bundle_copy, tmp_path):
    """eval --tile on a folder data set: every test image's score equals inspecting it with the unit's references
    registered with the same tiling (the faithful path), and pixel metrics come from the stitched maps."""
    from winclip_edge.evaluation.runner import EvalConfig, run_evaluation
    from winclip_edge.inspector import Inspector
    from winclip_edge.registration import register
    from winclip_edge.scoring import ScoringOptions

    surface = part_surface((360, 480))
    root = tmp_path / "widget"  # one class, named like the bundle's product
    write_frames(root / "good", surface, (1, 2, 3, 4))
    write_frames(root / "stain", surface, (5, 6), defect=(100, 200, 40))
    (root / "masks" / "stain").mkdir(parents=True)
    mask = np.zeros((360, 480), np.uint8)
    mask[100:140, 200:240] = 255
    for s in (5, 6):
        cv2.imwrite(str(root / "masks" / "stain" / f"f{s}.png"), mask)
    tiling = TilingConfig(tile=240, memory="pooled")
    result = run_evaluation(EvalConfig(bundle=bundle_copy, dataset="folder", root=root, out=tmp_path / "eval",
                                       shots=(1,), seeds=1, pictures=False, progress=False, tiling=tiling),
                            log=lambda m: None)
    record = json.loads(next((tmp_path / "eval" / "partial").rglob("1shot-seed0.json")).read_text())
    assert result.summary["shots"]["1"]["mean"]["pixel_auroc"] > 0.9  # the stain is found in the stitched maps
    register(Inspector(bundle_copy, "widget", options=ScoringOptions(use_memory=False), with_threshold=False,
                       tiling=tiling, roi=None), record["references"])
    inspector = Inspector(bundle_copy, "widget", with_threshold=False)
    scores = {r.path: r.score for r in inspector.inspect([i["path"] for i in record["images"]])}
    for image in record["images"]:
        assert image["score"] == pytest.approx(scores[image["path"]], abs=1e-5)
