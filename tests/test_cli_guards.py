"""User mistakes end in one line and exit code 2; thresholds only apply where they were calibrated."""
import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import textured_part
from winclip_edge import Inspector
from winclip_edge.calibration import calibrate
from winclip_edge.cli import main
from winclip_edge.errors import WinclipError
from winclip_edge.scoring import ScoringOptions


@pytest.fixture
def bundle(make_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(make_bundle("tiny224p32", products=("screw",)), path)
    return path


def _write(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), textured_part((224, 224), seed=seed + i))
        paths.append(str(path))
    return paths


def _no_traceback(capsys, expected):
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err, err


def test_bad_options_are_one_line_errors(bundle, tmp_path, capsys, config_dir):
    image = _write(tmp_path, ["x.png"])[0]
    common = ["--bundle", str(bundle), "--product", "screw", "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(WinclipError, match="not in the bundle"):  # the ablations are `eval --ablation`'s flags alone
        Inspector(bundle, "screw", options=ScoringOptions(scales=(4,)))
    assert main(["infer", *common, "--temperature", "0", image]) == 2
    _no_traceback(capsys, "temperature must be > 0")
    assert main(["export", "--model", "ViT-B-99", "--pretrained", "none", "--out", str(tmp_path / "e")]) == 2
    _no_traceback(capsys, "unknown open_clip model")
    assert main(["export", "--model", str(config_dir / "tiny224p32.json"), "--pretrained", "none", "--stride", "3",
                 "--out", str(tmp_path / "e2"), "--quiet"]) == 2
    _no_traceback(capsys, "stride")
    assert not (tmp_path / "e2").exists()
    assert main(["add-product", "--bundle", str(bundle), "gear", "--template", "no placeholder", "--quiet"]) == 2
    _no_traceback(capsys, "placeholder")


def test_same_stem_in_several_folders_gets_distinct_outputs(bundle, tmp_path):
    inputs = _write(tmp_path / "in", ["a/part.png", "b/part.png", "part-2.png"])
    out = tmp_path / "o"
    assert main(["infer", "--bundle", str(bundle), "--product", "screw", "--out", str(out), "--quiet", *inputs]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    maps = [r["map"] for r in records]
    assert len(set(maps)) == 3 and all(np.load(m).shape == (224, 224) for m in maps)


def test_threshold_applies_only_to_its_mode_and_options(bundle, tmp_path, capsys):
    refs = _write(tmp_path / "refs", [f"r{i}.png" for i in range(3)])
    normals = _write(tmp_path / "normal", [f"n{i}.png" for i in range(3)], seed=10)
    image = _write(tmp_path / "test", ["t.png"], seed=20)[0]
    common = ["--bundle", str(bundle), "--product", "screw", "--quiet"]
    assert main(["register", *common, *refs]) == 0
    assert main(["calibrate", *common, "--zero-shot", *normals]) == 0
    # zero-shot threshold: used zero-shot, refused few-shot with the command that fixes it
    assert main(["infer", *common, "--zero-shot", "--out", str(tmp_path / "o1"), image]) == 0
    record = json.loads((tmp_path / "o1" / "results.jsonl").read_text())
    assert record["threshold"] is not None and record["mode"] == "zero-shot"
    assert main(["infer", *common, "--out", str(tmp_path / "o2"), image]) == 2
    _no_traceback(capsys, "without --zero-shot")
    # few-shot threshold calibrated with default options: other scoring options are refused
    assert main(["calibrate", *common, *normals]) == 0
    assert main(["infer", *common, "--out", str(tmp_path / "o3"), image]) == 0
    assert main(["infer", *common, "--temperature", "0.05", "--out", str(tmp_path / "o4"), image]) == 2
    _no_traceback(capsys, "other scoring options")
    with pytest.raises(WinclipError, match="other scoring options"):  # an ablation, from Python (eval's alone on the CLI)
        Inspector(bundle, "screw", options=ScoringOptions(mean="arithmetic"))


def test_register_replaces_a_damaged_memory(bundle, tmp_path, capsys):
    refs = _write(tmp_path / "refs", ["r0.png", "r1.png"])
    common = ["--bundle", str(bundle), "--product", "screw", "--quiet"]
    assert main(["register", *common, *refs]) == 0
    memory = bundle / "products" / "screw" / "memory.npz"
    memory.write_bytes(memory.read_bytes()[:100])
    assert main(["infer", *common, "--out", str(tmp_path / "o"), refs[0]]) == 2
    _no_traceback(capsys, "register")
    assert main(["register", *common, *refs]) == 0  # the command the message names works
    assert main(["infer", *common, "--out", str(tmp_path / "o"), refs[0]]) == 0


def test_calibrate_accepts_a_stacked_array(bundle):
    inspector = Inspector(bundle, "screw")
    images = np.stack([textured_part((224, 224), seed=s) for s in range(3)])
    threshold, failed = calibrate(inspector, images)
    assert not failed and threshold.n_images == 3 and threshold.mode == "zero-shot"
    assert threshold.scoring == inspector.options.decision_record()
