"""Dataset readers: MVTec-AD, VisA (official 1cls split) and a generic folder layout.

Readers only list files (no image is decoded) and return `Sample`s in a sorted, deterministic
order, so a run's few-shot draw (`split_references`) is reproducible from its seed. Layout
problems raise `DatasetError` naming the path, what was expected and what was found, because a
silently empty class would otherwise surface later as a meaningless metric.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from ..errors import WinclipError
from ..preprocess import IMAGE_EXTENSIONS

GOOD = "good"  # defect type of normal samples, in every reader
NORMAL_FOLDERS = (GOOD, "nominal")  # folder names of normal images in `read_folder`
MASKS_FOLDER = "masks"  # `read_folder`: masks/<defect>/<stem>[_mask].<ext>
MASK_SUFFIX = "_mask"  # MVTec-AD: ground_truth/<defect>/<stem>_mask.png
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
VISA_ANOMALY = "anomaly"  # VisA's 1cls split has no defect types: every anomaly gets this one
SPLITS = ("train", "test")
TEXTILE_PIP = "pip install conformal-clip-data"
TEXTILE_SUBDIR = Path("data") / "textile_images" / "simulated"  # inside the package (v0.1.4)

PathLike = Union[str, Path]


class DatasetError(WinclipError, ValueError):
    """A data set folder or split file that does not have the expected layout."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a data set; `mask_path` is None for normal images and unannotated defects."""

    path: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # GOOD for normal images
    mask_path: str | None
    split: str  # "train" or "test"


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _require_dir(folder: Path, expected: str) -> None:
    if not folder.is_dir():
        parent = folder.parent
        found = [p.name for p in _subfolders(parent)] if parent.is_dir() else "none, it does not exist either"
        raise DatasetError(f"{folder}: expected {expected}; no such folder (folders in {parent}: {found})")


def _require_images(folder: Path, expected: str) -> list[Path]:
    _require_dir(folder, expected)
    images = _list_images(folder)
    if not images:
        raise DatasetError(f"{folder}: expected {expected} ({'/'.join(sorted(IMAGE_EXTENSIONS))}); found no image")
    return images


# ----------------------------------------------------------------------------- MVTec-AD


def mvtec_classes(root: PathLike) -> list[str]:
    """Class folders under an MVTec-AD root (those with train/good)."""
    root = Path(root)
    _require_dir(root, "the MVTec-AD root folder")
    return [p.name for p in _subfolders(root) if (p / "train" / GOOD).is_dir()]


def read_mvtec(root: PathLike, class_name: str) -> tuple[list[Sample], list[Sample]]:
    """(train good samples, test samples) of one MVTec-AD class; every anomalous test image
    must have `ground_truth/<defect>/<stem>_mask.png`, since pixel metrics need all of them."""
    root = Path(root)
    class_dir = root / class_name
    if not (class_dir / "train" / GOOD).is_dir():
        classes = mvtec_classes(root)
        found = f"classes found: {classes}" if classes else f"no class, folders: {[p.name for p in _subfolders(root)]}"
        raise DatasetError(f"{class_dir}: expected an MVTec-AD class folder with train/good/; under {root} {found}")
    train_images = _require_images(class_dir / "train" / GOOD, "normal training images")
    train = [Sample(str(p), 0, GOOD, None, "train") for p in train_images]
    test_dir = class_dir / "test"
    _require_dir(test_dir, "the test folder with one folder per defect type and good/")
    test = []
    for defect_dir in _subfolders(test_dir):
        defect = defect_dir.name
        label = int(defect != GOOD)
        for image in _list_images(defect_dir):
            mask = class_dir / "ground_truth" / defect / f"{image.stem}{MASK_SUFFIX}.png"
            if label and not mask.is_file():
                raise DatasetError(f"{mask}: expected the ground-truth mask of anomalous test image {image}; not found")
            test.append(Sample(str(image), label, defect, str(mask) if label else None, "test"))
    if not test:
        raise DatasetError(f"{test_dir}: expected test images in per-defect folders; found none")
    return train, test


# ----------------------------------------------------------------------------- VisA


def _read_visa_rows(root: Path) -> list[dict[str, str]]:
    split_csv = root / VISA_SPLIT_CSV
    if not split_csv.is_file():
        found = [p.name for p in root.iterdir()] if root.is_dir() else "root does not exist"
        raise DatasetError(
            f"{split_csv}: expected VisA's official split file; not found (found in {root}: {found})"
        )
    with split_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        if set(VISA_COLUMNS) - set(reader.fieldnames or ()):
            raise DatasetError(f"{split_csv}: expected columns {','.join(VISA_COLUMNS)}; found {reader.fieldnames}")
        return list(reader)


def visa_classes(root: PathLike) -> list[str]:
    """Object classes listed in VisA's split_csv/1cls.csv."""
    return sorted({row["object"] for row in _read_visa_rows(Path(root))})


def _visa_sample(root: Path, row: dict[str, str], where: str) -> Sample:
    """One checked csv row: known label and split, files present, anomalies with a mask."""
    if row["label"] not in VISA_LABELS or row["split"] not in SPLITS:
        raise DatasetError(
            f"{where}: expected label in {list(VISA_LABELS)} and split in {list(SPLITS)}; "
            f"found {row['label']!r}, {row['split']!r}"
        )
    label = VISA_LABELS[row["label"]]
    if label and (row["split"] == "train" or not row["mask"]):
        raise DatasetError(f"{where}: expected anomalies only in the test split and with a mask; found {row}")
    image = root / row["image"]
    mask = root / row["mask"] if label else None
    for path in (image, mask):
        if path is not None and not path.is_file():
            raise DatasetError(f"{path}: expected the file named in {where}; not found")
    defect = VISA_ANOMALY if label else GOOD
    return Sample(str(image), label, defect, None if mask is None else str(mask), row["split"])


def read_visa(root: PathLike, class_name: str) -> tuple[list[Sample], list[Sample]]:
    """(train good samples, test samples) of one VisA class from split_csv/1cls.csv, whose image
    and mask paths are relative to `root`; anomalies get defect type "anomaly" (none in the csv)."""
    root = Path(root)
    split_csv = root / VISA_SPLIT_CSV
    rows = _read_visa_rows(root)
    samples = [
        _visa_sample(root, row, f"{split_csv} line {line}")
        for line, row in enumerate(rows, start=2)  # line 1 is the header
        if row["object"] == class_name
    ]
    if not samples:
        classes = sorted({row["object"] for row in rows})
        raise DatasetError(f"{split_csv}: expected rows of class {class_name!r}; classes found: {classes}")
    samples.sort(key=lambda s: s.path)
    return [s for s in samples if s.split == "train"], [s for s in samples if s.split == "test"]


# ----------------------------------------------------------------------------- generic folder


def _mask_index(mask_dir: Path) -> dict[str, Path]:
    """Image stem -> mask path; a mask named <stem>.<ext> or <stem>_mask.<ext>."""
    index: dict[str, Path] = {}
    for mask in _list_images(mask_dir):
        stem = mask.stem[: -len(MASK_SUFFIX)] if mask.stem.endswith(MASK_SUFFIX) else mask.stem
        if stem in index:
            raise DatasetError(
                f"{mask_dir}: expected one mask per image stem; found {index[stem].name} and {mask.name} for {stem!r}"
            )
        index[stem] = mask
    return index


def read_folder(root: PathLike) -> tuple[list[Sample], list[Sample]]:
    """([], test samples) of a generic layout: good/ (or nominal/) normal images, one folder per
    defect type, optional masks/<defect>/ with one mask per image of that defect (by stem, with
    or without "_mask"). Everything is test: draw references with `split_references`."""
    root = Path(root)
    _require_dir(root, "a data set folder with good/ (or nominal/) and one folder per defect type")
    folders = [p for p in _subfolders(root) if p.name != MASKS_FOLDER]
    normal = [p for p in folders if p.name in NORMAL_FOLDERS]
    if len(normal) != 1:
        raise DatasetError(
            f"{root}: expected exactly one normal-image folder of {list(NORMAL_FOLDERS)}; "
            f"found folders {[p.name for p in folders]}"
        )
    test = [Sample(str(p), 0, GOOD, None, "test") for p in _require_images(normal[0], "normal images")]
    for defect_dir in (p for p in folders if p not in normal):
        mask_dir = root / MASKS_FOLDER / defect_dir.name
        masks = _mask_index(mask_dir) if mask_dir.is_dir() else None
        for image in _list_images(defect_dir):
            mask = None
            if masks is not None:
                if image.stem not in masks:
                    raise DatasetError(
                        f"{mask_dir}: expected a mask {image.stem}[{MASK_SUFFIX}].<ext> for {image}; not found"
                    )
                mask = str(masks[image.stem])
            test.append(Sample(str(image), 1, defect_dir.name, mask, "test"))
    return [], test


def split_references(samples: Sequence[Sample], k: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Draw k normal samples as few-shot references with numpy default_rng(seed).

    Returns (references with split "train", the other samples in their order), so a folder data
    set without a train split can be evaluated few-shot without testing on its references.
    """
    normal = [i for i, s in enumerate(samples) if s.label == 0]
    if not 0 <= k <= len(normal):
        raise DatasetError(f"expected 0 <= k <= {len(normal)} (normal samples available); got k={k}")
    chosen = set(np.random.default_rng(seed).choice(normal, size=k, replace=False).tolist())
    references = [dataclasses.replace(samples[i], split="train") for i in sorted(chosen)]
    return references, [s for i, s in enumerate(samples) if i not in chosen]


def textile_root() -> Path:
    """Image folder of the textile data set of the PyPI package conformal-clip-data: nominal/,
    local/, global/ (250x250 jpg, no masks); read it with `read_folder`."""
    try:
        import conformal_clip_data
    except ImportError as e:
        raise DatasetError(f"the textile data set needs the package conformal-clip-data; run: {TEXTILE_PIP}") from e
    root = Path(conformal_clip_data.__file__).parent / TEXTILE_SUBDIR
    if not root.is_dir():
        raise DatasetError(
            f"{root}: expected the textile image folder of conformal-clip-data; not found "
            f"(try: {TEXTILE_PIP} --upgrade)"
        )
    return root


def read_mask(path: str) -> np.ndarray:
    """Ground-truth mask as uint8 [H, W]; any non-zero value is anomalous."""
    mask = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"{path}: expected a ground-truth mask image; cannot decode it")
    return mask
