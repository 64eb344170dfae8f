"""winclip_edge.evaluation.datasets on tiny fake MVTec-AD / VisA / folder trees."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from winclip_edge.evaluation.datasets import (
    DatasetError,
    Sample,
    mvtec_classes,
    read_folder,
    read_mvtec,
    read_visa,
    split_references,
    textile_root,
    visa_classes,
)

TINY = np.zeros((4, 4, 3), np.uint8)


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), TINY), path
    return path


def make_mvtec(root: Path) -> Path:
    """bottle: 3 train good, test good x2, broken x2 (with masks), crack x1 (with mask)."""
    cls = root / "bottle"
    for i in range(3):
        write_image(cls / "train" / "good" / f"{i:03d}.png")
    for defect, n in (("good", 2), ("broken", 2), ("crack", 1)):
        for i in range(n):
            write_image(cls / "test" / defect / f"{i:03d}.png")
            if defect != "good":
                write_image(cls / "ground_truth" / defect / f"{i:03d}_mask.png")
    (root / "license.txt").write_text("not a class")
    (root / "no_train").mkdir()
    return root


def test_read_mvtec(tmp_path):
    root = make_mvtec(tmp_path)
    assert mvtec_classes(root) == ["bottle"]
    train, test = read_mvtec(root, "bottle")
    assert [Path(s.path).name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.split == "train" and s.mask_path is None for s in train)
    assert [(s.defect_type, s.label) for s in test] == [("broken", 1)] * 2 + [("crack", 1)] + [("good", 0)] * 2
    gt = root / "bottle" / "ground_truth"
    expected_masks = [gt / s.defect_type / f"{Path(s.path).stem}_mask.png" if s.label else None for s in test]
    assert [s.mask_path and Path(s.mask_path) for s in test] == expected_masks


def test_mvtec_errors_name_the_path(tmp_path):
    root = make_mvtec(tmp_path)
    missing = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="000_mask.png.*ground-truth mask.*not found"):
        read_mvtec(root, "bottle")
    with pytest.raises(DatasetError, match=r"carpet.*classes found.*\['bottle'\]"):
        read_mvtec(root, "carpet")
    with pytest.raises(DatasetError, match=r"no class, folders: \['ground_truth', 'test', 'train'\]"):
        read_mvtec(root / "bottle", "bottle")  # the class folder given as root
    with pytest.raises(DatasetError, match=r"nowhere: expected the MVTec-AD root.*no such.*\['bottle', 'no_train'\]"):
        read_mvtec(root / "nowhere", "bottle")


def make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in ("pcb1", "candle"):
        for split, label, name in (("train", "normal", "t0"), ("train", "normal", "t1"), ("test", "normal", "n0"),
                                   ("test", "anomaly", "a0"), ("test", "anomaly", "a1")):
            image = f"{obj}/Data/Images/{label}/{name}.JPG"
            mask = f"{obj}/Data/Masks/Anomaly/{name}.png" if label == "anomaly" else ""
            write_image(root / image)
            if mask:
                write_image(root / mask)
            rows.append(",".join((obj, split, label, image, mask)))
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_read_visa(tmp_path):
    root = make_visa(tmp_path)
    assert visa_classes(root) == ["candle", "pcb1"]
    train, test = read_visa(root, "pcb1")
    assert [Path(s.path).stem for s in train] == ["t0", "t1"]
    assert all(s.label == 0 and s.split == "train" for s in train)
    assert [(Path(s.path).stem, s.label, s.defect_type) for s in test] == [
        ("a0", 1, "anomaly"), ("a1", 1, "anomaly"), ("n0", 0, "good")]
    assert all((s.mask_path is not None) == bool(s.label) for s in test)
    assert all(Path(s.mask_path).is_file() for s in test if s.label)


def test_visa_errors(tmp_path):
    root = make_visa(tmp_path)
    with pytest.raises(DatasetError, match=r"class 'fryum'.*\['candle', 'pcb1'\]"):
        read_visa(root, "fryum")
    (root / "pcb1/Data/Masks/Anomaly/a1.png").unlink()
    with pytest.raises(DatasetError, match="a1.png.*expected the file named in.*line"):
        read_visa(root, "pcb1")
    with pytest.raises(DatasetError, match="1cls.csv.*expected VisA's official split file"):
        read_visa(tmp_path / "pcb1", "pcb1")


def make_folder(root: Path, normal: str = "good") -> Path:
    """3 normal, scratch x2 with masks (one '_mask', one plain stem), stain x1 without masks."""
    for i in range(3):
        write_image(root / normal / f"img{i}.jpg")
    write_image(root / "scratch" / "s0.PNG")
    write_image(root / "scratch" / "s1.bmp")
    write_image(root / "stain" / "x0.tif")
    write_image(root / "masks" / "scratch" / "s0_mask.png")
    write_image(root / "masks" / "scratch" / "s1.png")
    (root / "good_notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("normal", ["good", "nominal"])
def test_read_folder(tmp_path, normal):
    root = make_folder(tmp_path, normal)
    train, test = read_folder(root)
    assert train == []
    assert [(Path(s.path).name, s.label, s.defect_type) for s in test] == [
        ("img0.jpg", 0, "good"), ("img1.jpg", 0, "good"), ("img2.jpg", 0, "good"),
        ("s0.PNG", 1, "scratch"), ("s1.bmp", 1, "scratch"), ("x0.tif", 1, "stain")]
    assert [s.mask_path and Path(s.mask_path).name for s in test] == [None] * 3 + ["s0_mask.png", "s1.png", None]
    assert all(s.split == "test" for s in test)


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path)
    (root / "masks" / "scratch" / "s1.png").unlink()
    with pytest.raises(DatasetError, match="expected a mask s1.*s1.bmp"):
        read_folder(root)
    write_image(root / "nominal" / "img9.png")
    with pytest.raises(DatasetError, match=r"exactly one normal-image.*\['good', 'nominal', 'scratch', 'stain'\]"):
        read_folder(root)
    with pytest.raises(DatasetError, match="nowhere: expected a data set folder.*no such folder"):
        read_folder(tmp_path / "nowhere")


def test_split_references_is_deterministic(tmp_path):
    _, test = read_folder(make_folder(tmp_path))
    refs, rest = split_references(test, k=2, seed=7)
    assert split_references(test, k=2, seed=7) == (refs, rest)
    assert len(refs) == 2 and all(s.label == 0 and s.split == "train" for s in refs)
    assert len(rest) == len(test) - 2 and {s.path for s in refs}.isdisjoint(s.path for s in rest)
    draws = {tuple(s.path for s in split_references(test, 2, seed)[0]) for seed in range(20)}
    assert len(draws) == 3  # all three pairs of the 3 normal images occur
    with pytest.raises(DatasetError, match="k <= 3.*k=4"):
        split_references(test, k=4, seed=0)


def test_textile_root_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "conformal_clip_data", None)  # makes the import fail
    with pytest.raises(DatasetError, match="pip install conformal-clip-data"):
        textile_root()


def test_textile_data_set():
    pytest.importorskip("conformal_clip_data")
    root = textile_root()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["global", "local", "nominal"]
    train, test = read_folder(root)
    counts = {d: sum(s.defect_type == d for s in test) for d in ("good", "local", "global")}
    assert train == [] and sum(counts.values()) == len(test) and min(counts.values()) > 0
    assert all(isinstance(s, Sample) and s.mask_path is None for s in test)
