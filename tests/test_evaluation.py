"""`winclip-edge eval`: end to end on the textile set and on tiny fake MVTec / folder trees (tiny random bundle)."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import textured_part

from winclip_edge import Inspector
from winclip_edge.bundle import Bundle
from winclip_edge.cli import main
from winclip_edge.evaluation.datasets import read_mvtec, split_references
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.evaluation.runner import (
    RANDOM_WEIGHTS_WARNING,
    EvalConfig,
    EvaluationError,
    load_classes,
    run_evaluation,
    scoring_options,
)
from winclip_edge.evaluation.metrics import IMAGE_KEYS, PIXEL_KEYS, image_auroc, pixel_auroc_exact, pro_exact
from winclip_edge.evaluation.paper import paper_result
from winclip_edge.products import load_text, save_memory
from winclip_edge.evaluation.report import ReportError

PART_SIZE = (64, 80)  # (H, W): not the model size, so maps are resized back
DEFECT = (20, 30, 16, 20)  # top, left, height, width
BINNING_TOLERANCE = 1e-3  # PixelMetrics (10_000 bins) vs the exact references


class CountingEngine:
    """The real ONNX Runtime engine, counting the images it is asked to embed."""

    def __init__(self, bundle_path: Path):
        self.inner = create_engine(Bundle(bundle_path), EngineConfig(backend="onnxruntime"))
        self.name, self.device = self.inner.name, self.inner.device
        self.images = 0

    def run(self, images: np.ndarray) -> dict:
        self.images += len(images)
        return self.inner.run(images)

    def close(self) -> None:
        self.inner.close()


def write_rgb(path: Path, image: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), path
    return str(path)


def defect_mask() -> np.ndarray:
    t, l, h, w = DEFECT
    mask = np.zeros(PART_SIZE, np.uint8)
    mask[t:t + h, l:l + w] = 255
    return mask


def make_mvtec(root: Path, name: str = "widget") -> Path:
    """One class: 4 train good, test good x3 and scratch x3 with masks."""
    cls = root / name
    for i in range(4):
        write_rgb(cls / "train" / "good" / f"{i:03d}.png", textured_part(PART_SIZE, seed=i))
    for i in range(3):
        write_rgb(cls / "test" / "good" / f"{i:03d}.png", textured_part(PART_SIZE, seed=10 + i))
        write_rgb(cls / "test" / "scratch" / f"{i:03d}.png", textured_part(PART_SIZE, seed=20 + i, defect=DEFECT))
        mask_path = cls / "ground_truth" / "scratch" / f"{i:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(mask_path), defect_mask())
    return root


@pytest.fixture(scope="module")
def module_bundle(make_bundle, tmp_path_factory) -> Path:
    """A writable tiny bundle for this module (eval adds the products it needs)."""
    dst = tmp_path_factory.mktemp("eval") / "bundle"
    shutil.copytree(make_bundle(), dst)
    return dst


@pytest.fixture(scope="module")
def textile_run(module_bundle, tmp_path_factory):
    """One textile run through the CLI: --limit 6, shots 0,1, 2 seeds, pictures on."""
    out = tmp_path_factory.mktemp("eval") / "textile"
    code = main(["eval", "--bundle", str(module_bundle), "--dataset", "textile", "--limit", "6", "--shots", "0,1",
                 "--seeds", "2", "--out", str(out), "--quiet"])
    return code, out


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("mvtec"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def config(bundle: Path, out: Path, **kw) -> EvalConfig:
    return EvalConfig(bundle=bundle, out=out, pictures=False, progress=False, **kw)


# ---------------------------------------------------------------- textile, end to end
def test_textile_writes_tables_pictures_and_warning(textile_run):
    code, out = textile_run
    assert code == 0
    for name in ("summary.json", "metrics.csv", "scores.csv", "report.md", "roc_curves.png", "auroc_bars.png",
                 "cases/textile_0shot.png", "cases/textile_1shot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert RANDOM_WEIGHTS_WARNING in "\n".join((out / "report.md").read_text().splitlines()[:3])
    summary = json.loads((out / "summary.json").read_text())
    assert next(iter(summary)) == "warning" and summary["warning"] == RANDOM_WEIGHTS_WARNING
    assert summary["shots"]["0"]["seeds"] == [0] and summary["shots"]["1"]["seeds"] == [0, 1]
    textile = summary["shots"]["1"]["classes"]["textile"]
    for seed_metrics in textile["seeds"].values():
        assert all(0.0 <= seed_metrics[k] <= 1.0 for k in IMAGE_KEYS)
        assert all(seed_metrics[k] is None for k in PIXEL_KEYS)  # no masks: image level only
    aurocs = [m["image_auroc"] for m in textile["seeds"].values()]
    assert textile["mean"]["image_auroc"] == pytest.approx(np.mean(aurocs))
    assert textile["std"]["image_auroc"] == pytest.approx(np.std(aurocs))
    assert summary["shots"]["0"]["paper"] is None  # no paper numbers for the textile set
    assert "n/a" in (out / "report.md").read_text()


def test_textile_limit_and_scores_csv(textile_run):
    _, out = textile_run
    rows = read_csv(out / "scores.csv")
    zero_shot = [r for r in rows if r["shots"] == "0"]
    assert Counter(r["defect_type"] for r in zero_shot) == {"good": 6, "local": 6, "global": 6}
    assert {r["seed"] for r in rows if r["shots"] == "1"} == {"0", "1"}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    metrics = read_csv(out / "metrics.csv")
    mean_row = next(r for r in metrics if r["shots"] == "1" and r["class"] == "mean" and r["seed"] == "mean")
    assert mean_row["pixel_auroc"] == "n/a" and 0.0 <= float(mean_row["image_auroc"]) <= 1.0


def test_resume_skips_finished_units_and_embeds_each_test_image_once(textile_run, module_bundle, tmp_path):
    _, finished = textile_run
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    engine = CountingEngine(module_bundle)
    messages = []
    cli_engine = EngineConfig()  # what the CLI run of textile_run used
    same = config(module_bundle, out, dataset="textile", limit=6, shots=(0, 1), seeds=2, engine=cli_engine)
    result = run_evaluation(same, engine=engine, log=messages.append)
    assert (result.computed, result.skipped, engine.images) == (0, 3, 0)
    assert any("skipped 3 finished" in m for m in messages)
    # A new shot count: the 18 test images are embedded once for both of its seeds, plus 2 x 2 references.
    more = config(module_bundle, out, dataset="textile", limit=6, shots=(0, 1, 2), seeds=2, engine=cli_engine)
    result = run_evaluation(more, engine=engine, log=messages.append)
    assert (result.computed, result.skipped, engine.images) == (2, 3, 18 + 2 * 2)
    assert set(result.summary["shots"]) == {"0", "1", "2"}


def test_resume_refuses_another_configuration(textile_run, module_bundle, tmp_path):
    _, finished = textile_run
    out = tmp_path / "other"
    shutil.copytree(finished, out)
    with pytest.raises(EvaluationError, match="limit"):
        run_evaluation(config(module_bundle, out, dataset="textile", limit=5, shots=(0,), seeds=1))
    with pytest.raises(EvaluationError, match="engine"):  # e.g. an int8 variant instead of fp32
        run_evaluation(config(module_bundle, out, dataset="textile", limit=6, shots=(0,), seeds=1,
                              engine=EngineConfig(precision="int8")))


# ---------------------------------------------------------------- MVTec with masks
def test_mvtec_pixel_metrics_match_inspector(module_bundle, mvtec_root, tmp_path):
    out = tmp_path / "out"
    code = main(["eval", "--bundle", str(module_bundle), "--dataset", "mvtec", "--root", str(mvtec_root),
                 "--shots", "0,1", "--seeds", "2", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shots"]["0"]["paper"]["values"]["image_auroc"]["mean"] == pytest.approx(0.918)
    assert (out / "cases" / "widget_1shot.png").is_file()
    zero = summary["shots"]["0"]["classes"]["widget"]["seeds"]["0"]
    assert all(0.0 <= zero[k] <= 1.0 for k in (*IMAGE_KEYS, *PIXEL_KEYS))

    # The cached-embedding path must equal the plain Inspector path (zero-shot and 1-shot seed 0).
    train, test = read_mvtec(mvtec_root, "widget")
    masks = [cv2.imread(s.mask_path, cv2.IMREAD_GRAYSCALE) if s.mask_path else np.zeros(PART_SIZE, np.uint8)
             for s in test]
    labels = np.array([s.label for s in test])
    inspector = Inspector(module_bundle, "widget")
    results = inspector.inspect([s.path for s in test])
    maps = [r.anomaly_map for r in results]
    assert zero["image_auroc"] == pytest.approx(image_auroc(labels, np.array([r.score for r in results])))
    assert zero["pixel_auroc"] == pytest.approx(pixel_auroc_exact(maps, masks), abs=BINNING_TOLERANCE)
    assert zero["pixel_pro"] == pytest.approx(pro_exact(maps, masks), abs=BINNING_TOLERANCE)

    registered = shutil.copytree(module_bundle, tmp_path / "registered")  # the module bundle stays zero-shot
    references, _ = split_references(train, 1, 0)
    memory, _ = inspector.embed_references([s.path for s in references])
    save_memory(Bundle(registered), "widget", memory)
    few = Inspector(registered, "widget").inspect([s.path for s in test])
    stored = {r["path"]: float(r["score"]) for r in read_csv(out / "scores.csv") if r["shots"] == "1" and r["seed"] == "0"}
    assert [stored[s.path] for s in test] == pytest.approx([r.score for r in few], abs=1e-6)


def test_ablation_maps_onto_scoring_options():
    assert scoring_options("none", (2, 3)).scales is None
    assert scoring_options("no_image_scale", (2, 3)).use_image_scale is False
    assert scoring_options("no_scale_3", (2, 3)).scales == (2,)
    assert scoring_options("arithmetic", (2, 3)).mean == "arithmetic"
    for bad in ("no_scale_4", "no_scale_x"):
        with pytest.raises(EvaluationError, match="window scales"):
            scoring_options(bad, (2, 3))
    with pytest.raises(EvaluationError, match="leaves no window scale"):
        scoring_options("no_scale_2", (2,))


def test_ablation_run_is_compared_with_the_paper_ablation(module_bundle, mvtec_root, tmp_path):
    base = run_evaluation(config(module_bundle, tmp_path / "base", dataset="mvtec", root=mvtec_root, shots=(0,)))
    ablated = run_evaluation(config(module_bundle, tmp_path / "abl", dataset="mvtec", root=mvtec_root, shots=(0,),
                                    ablation="no_scale_3"))
    s = ablated.summary["shots"]["0"]
    assert s["paper"]["method"] == "WinCLIP w/o mid scale (0-shot)"
    assert s["paper"]["values"]["pixel_auroc"]["mean"] == pytest.approx(0.84)
    assert s["mean"]["pixel_auroc"] != base.summary["shots"]["0"]["mean"]["pixel_auroc"]


def test_prompt_baseline_adds_its_product(module_bundle, mvtec_root, tmp_path):
    result = run_evaluation(config(module_bundle, tmp_path / "out", dataset="mvtec", root=mvtec_root, shots=(0,),
                                   prompts="clip_ac"))
    text = load_text(Bundle(module_bundle), "widget__clip_ac")
    assert text.prompt_spec["style"] == "clip_ac" and text.normal_prompts == ("normal widget",)
    paper = result.summary["shots"]["0"]["paper"]
    assert paper["method"] == "CLIP-AC (0-shot)" and paper["values"]["image_auroc"]["mean"] == pytest.approx(0.74)
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert {r["prompts"] for r in rows} == {"clip_ac"}


# ---------------------------------------------------------------- folder data, bad inputs
def test_folder_references_leave_the_test_set_and_bad_images_are_reported(module_bundle, tmp_path, capsys):
    root = tmp_path / "parts"
    for i in range(5):
        write_rgb(root / "good" / f"g{i}.png", textured_part(PART_SIZE, seed=i))
    (root / "masks" / "dent").mkdir(parents=True)
    for i in range(2):
        write_rgb(root / "dent" / f"d{i}.png", textured_part(PART_SIZE, seed=50 + i, defect=DEFECT))
        cv2.imwrite(str(root / "masks" / "dent" / f"d{i}.png"), defect_mask())
    (root / "good" / "broken.png").write_bytes(b"not an image")
    classes = load_classes(config(module_bundle, tmp_path / "x", dataset="folder", root=root))
    assert [c.name for c in classes] == ["parts"]
    references, test = classes[0].draw(2, seed=0)
    assert len(references) == 2 and not {s.path for s in references} & {s.path for s in test}

    out = tmp_path / "out"
    code = main(["eval", "--bundle", str(module_bundle), "--dataset", "folder", "--root", str(root), "--shots", "0,2",
                 "--seeds", "2", "--no-pictures", "--out", str(out), "--quiet"])
    assert code == 1  # one unreadable image: reported, the rest evaluated
    assert "broken.png" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["failed_images"]) == 1 and "broken.png" in (out / "report.md").read_text()
    assert all(0.0 <= v <= 1.0 for v in summary["shots"]["2"]["mean"].values())


def test_wrong_root_is_a_clear_error(module_bundle, tmp_path, capsys):
    missing = tmp_path / "no-such-mvtec"
    code = main(["eval", "--bundle", str(module_bundle), "--dataset", "mvtec", "--root", str(missing),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "MVTec-AD" in err
    assert main(["eval", "--bundle", str(module_bundle), "--dataset", "folder", "--out", str(tmp_path / "o")]) == 2
    assert "--root is required" in capsys.readouterr().err


def test_missing_optional_dependencies_are_named(bundle_copy, mvtec_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: the import fails
    with pytest.raises(ReportError, match=r"pip install matplotlib.*--no-pictures"):
        run_evaluation(EvalConfig(bundle=bundle_copy, out=tmp_path / "a", dataset="mvtec", root=mvtec_root,
                                  shots=(0,), progress=False))
    monkeypatch.setitem(sys.modules, "winclip_edge.export.models", None)
    with pytest.raises(EvaluationError, match=r"widget__clip_ac.*winclip-edge\[export\]"):
        run_evaluation(config(bundle_copy, tmp_path / "b", dataset="mvtec", root=mvtec_root, shots=(0,),
                              prompts="clip_ac"))


# ---------------------------------------------------------------- paper numbers
def test_paper_table_lookup():
    zero = paper_result("mvtec", 0)
    assert zero.method == "WinCLIP (0-shot)"
    assert {k: v.mean for k, v in zero.values.items()} == {
        "image_auroc": 0.918, "image_aupr": 0.965, "image_f1max": 0.929,
        "pixel_auroc": 0.851, "pixel_pro": 0.646, "pixel_f1max": 0.317}
    four = paper_result("visa", 4)
    assert four.method == "WinCLIP+ (4-shot)"
    assert (four.values["image_auroc"].mean, four.values["image_auroc"].std) == (0.873, 0.018)
    assert four.values["pixel_auroc"].mean == 0.972
    assert set(paper_result("visa", 0).values) == {*IMAGE_KEYS, "pixel_auroc"}  # 0-shot VisA PRO/F1 not quoted
    assert paper_result("mvtec", 0, prompts="templates_only").values["image_auroc"].mean == 0.741
    assert paper_result("mvtec", 8) is None and paper_result("folder", 0) is None
    assert paper_result("mvtec", 1, prompts="clip_ac") is None
