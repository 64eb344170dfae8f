"""``winclip-edge eval``: the paper's protocol (docs/method.md §9, docs/evaluation.md) on MVTec-AD, VisA or a folder.

Cost model: the engine is the expensive call, so every test image of a class is embedded ONCE and
kept (the outputs live on the token grid: ~2 MB per image for ViT-B-16-plus-240); every
(shots, seed) unit is then scored from that cache, and only its K references go through the engine
again. Pixel maps are upsampled one image at a time and streamed into `PixelMetrics`.

Resumable: each finished (class, shots, seed) unit of a (prompts, ablation) setting is written
atomically to ``out/partial/`` and is not recomputed when eval is re-run with the same ``--out``.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from ..bundle import Bundle
from .datasets import (
    NORMAL_FOLDERS,
    DatasetError,
    Sample,
    mvtec_classes,
    read_folder,
    read_mask,
    read_mvtec,
    read_visa,
    split_references,
    textile_root,
    visa_classes,
)
from ..engines import Engine, EngineConfig, select
from ..engines.registry import identity
from ..engines.serial import serialised
from ..errors import WinclipError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..heatmap import upsample_map
from ..inspector import Inspector
from ..samples import iter_decoded
from ..tiles.roi import Roi
from ..tiles.units import FramePlan, frame_map, frame_score
from ..tiles.tiling import TilingConfig
from .metrics import IMAGE_KEYS, PIXEL_KEYS, MetricError, PixelMetrics, image_metrics
from .paper import PAPER_DATASETS, PAPER_SCALES, paper_result
from ..products import Memory, load_text
from ..prompts import PROMPT_STYLES, PromptSpec, object_name_for
from ..scoring import ScoringOptions

DATASETS = ("mvtec", "visa", "folder", "textile")
FIXED_ABLATIONS = ("none", "no_image_scale", "arithmetic")
SCALE_ABLATION = "no_scale_"  # + k: leave window scale k out
DEFAULT_SHOTS = (0, 1, 2, 4)
DEFAULT_SEEDS = 5  # the paper's number of random reference draws
DEFAULT_BATCH = 8
LIMIT_SEED = 0  # --limit draws the same test subset in every run, so runs stay comparable and resumable
SCORE_BATCH = 32  # test images per scoring call (bounds the memory of the association matrices)
CASE_MAP_SCALE = 4  # tiled runs keep example maps at 4x the token grid for the report pictures
TEXTILE_CLASS = "textile"
BASELINE_SEPARATOR = "__"  # product of a prompt baseline: <class>__<style>
PARTIAL_DIR = "partial"
RUN_FILE = "run.json"  # the configuration the partial results belong to
RANDOM_WEIGHTS_WARNING = ("WARNING: this bundle has random weights (exported with --pretrained none): "
                          "these numbers are meaningless; they only show that the pipeline runs end to end.")
# Example pictures: (role, label, pick the highest score?) -> the best and worst cases of a unit.
CASE_ROLES = (("highest-scored anomalous", 1, True), ("lowest-scored anomalous", 1, False),
              ("highest-scored normal", 0, True))

Log = Callable[[str], None]


class EvaluationError(WinclipError, ValueError):
    """An evaluation that cannot run as asked (bad option, missing prompts, undefined metric)."""


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: a bundle, a data set, one prompt style and one ablation, all shot counts."""

    bundle: Path
    dataset: str  # mvtec | visa | folder | textile
    out: Path
    root: Path | None = None  # data set root; optional for textile (the conformal-clip-data package)
    classes: tuple[str, ...] = ()  # empty = every class found
    shots: tuple[int, ...] = DEFAULT_SHOTS  # 0 = zero-shot WinCLIP, K > 0 = WinCLIP+ with K references
    seeds: int = DEFAULT_SEEDS  # random reference draws per K > 0 (zero-shot is deterministic: one run)
    ablation: str = "none"  # none | no_image_scale | no_scale_<k> | arithmetic (docs/method.md §6)
    prompts: str = "cpe"  # cpe | clip_ac | templates_only (the paper's prompt baselines)
    engine: EngineConfig = EngineConfig()  # what runs the graph (a resumed run must use the same)
    batch: int = DEFAULT_BATCH  # images per engine call
    limit: int | None = None  # at most this many test images per defect type (incl. good), drawn with LIMIT_SEED
    pictures: bool = True  # ROC curves, AUROC bars, example grids (needs matplotlib)
    progress: bool = True  # tqdm bar on stderr
    tiling: TilingConfig | None = None  # tiled inspection (docs/tiling.md); references then store their tiles too
    roi: Roi | None = None  # inspect only this region of every test image


def _check_config(config: EvalConfig) -> None:
    problems = []
    if config.dataset not in DATASETS:
        problems.append(f"dataset {config.dataset!r} unknown (choose one of {DATASETS})")
    if config.prompts not in PROMPT_STYLES:
        problems.append(f"prompts {config.prompts!r} unknown (choose one of {PROMPT_STYLES})")
    if config.ablation not in FIXED_ABLATIONS and not config.ablation.startswith(SCALE_ABLATION):
        problems.append(f"ablation {config.ablation!r} unknown (choose one of {FIXED_ABLATIONS} or {SCALE_ABLATION}<k>)")
    if not config.shots or min(config.shots) < 0 or len(set(config.shots)) != len(config.shots):
        problems.append(f"shots must be distinct integers >= 0, got {list(config.shots)}")
    for name, value in (("seeds", config.seeds), ("batch", config.batch), ("limit", config.limit)):
        if value is not None and value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if config.dataset != "textile" and config.root is None:
        problems.append(f"--root is required for dataset {config.dataset!r}")
    if problems:
        raise EvaluationError("; ".join(problems))


def scoring_options(ablation: str, scales: Sequence[int]) -> ScoringOptions:
    """Map an ablation name onto ScoringOptions (docs/method.md §6); ``scales`` are the bundle's.
    The temperature stays the bundle's."""
    if ablation == "none":
        return ScoringOptions()
    if ablation == "no_image_scale":
        return ScoringOptions(use_image_scale=False)
    if ablation == "arithmetic":
        return ScoringOptions(mean="arithmetic")
    suffix = ablation[len(SCALE_ABLATION):] if ablation.startswith(SCALE_ABLATION) else ""
    if not suffix.isdigit() or int(suffix) not in scales:
        raise EvaluationError(f"ablation {ablation!r}: expected {SCALE_ABLATION}<k> with k one of the bundle's "
                              f"window scales {list(scales)}")
    kept = tuple(k for k in scales if k != int(suffix))
    if not kept:
        raise EvaluationError(f"ablation {ablation!r} leaves no window scale (the bundle has only {list(scales)})")
    return ScoringOptions(scales=kept)


def seeds_for(shots: int, seeds: int) -> tuple[int, ...]:
    """Zero-shot has no random draw: one run (seed 0). K-shot: seeds 0 .. seeds-1."""
    return (0,) if shots == 0 else tuple(range(seeds))


def product_name(class_name: str, prompts: str) -> str:
    """The bundle product holding a class's text prototypes: the class for CPE, <class>__<style> otherwise."""
    return class_name if prompts == "cpe" else f"{class_name}{BASELINE_SEPARATOR}{prompts}"


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class ClassData:
    """The test images of one class and the normal images its few-shot references are drawn from."""

    name: str
    test: tuple[Sample, ...]  # after --limit
    reference_pool: tuple[Sample, ...]  # normal images to draw K references from
    references_from_test: bool  # folder data: drawn references are removed from the test set

    def draw(self, shots: int, seed: int) -> tuple[list[Sample], list[Sample]]:
        """(references, test samples) of one unit."""
        if shots == 0:
            return [], list(self.test)
        references, _ = split_references(self.reference_pool, shots, seed)
        if not self.references_from_test:
            return references, list(self.test)
        taken = {s.path for s in references}
        return references, [s for s in self.test if s.path not in taken]

    def pixel_support(self) -> tuple[bool, str]:
        """Pixel metrics need a mask for every anomalous test image; (possible, why not)."""
        anomalous = [s for s in self.test if s.label == 1]
        missing = sum(s.mask_path is None for s in anomalous)
        if anomalous and not missing:
            return True, ""
        return False, f"{missing} of {len(anomalous)} anomalous test images have no ground-truth mask"


def limit_per_defect(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` samples per defect type (good included), drawn with LIMIT_SEED; order kept."""
    if limit is None:
        return list(samples)
    rng = np.random.default_rng(LIMIT_SEED)
    keep: set[int] = set()
    for defect in sorted({s.defect_type for s in samples}):
        indices = [i for i, s in enumerate(samples) if s.defect_type == defect]
        chosen = rng.choice(len(indices), size=min(limit, len(indices)), replace=False)
        keep.update(indices[j] for j in chosen)
    return [s for i, s in enumerate(samples) if i in keep]


def folder_classes(root: Path) -> list[tuple[str, Path]]:
    """A folder data set is one class (root has good/ or nominal/) or one class per such subfolder."""
    if not root.is_dir():
        raise DatasetError(f"{root}: expected a data set folder; it does not exist")
    if any((root / n).is_dir() for n in NORMAL_FOLDERS):
        return [(root.resolve().name, root)]
    found = sorted(p for p in root.iterdir() if p.is_dir())
    classes = [(p.name, p) for p in found if any((p / n).is_dir() for n in NORMAL_FOLDERS)]
    if not classes:
        raise DatasetError(f"{root}: expected {'/ or '.join(NORMAL_FOLDERS)}/ with one folder per defect type, "
                           f"or one such folder per class; found folders {[p.name for p in found]}")
    return classes


def _select(available: Sequence[str], wanted: Sequence[str], where: str) -> list[str]:
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(f"{where}: classes {unknown} not found; classes there: {list(available)}")
    if not available:
        raise DatasetError(f"{where}: expected at least one class; found none")
    return list(wanted) if wanted else list(available)


def load_classes(config: EvalConfig) -> list[ClassData]:
    """Read the data set's file lists (no image is decoded) for the selected classes."""
    limit = config.limit
    if config.dataset in ("mvtec", "visa"):
        root = Path(config.root)
        list_classes, read = (mvtec_classes, read_mvtec) if config.dataset == "mvtec" else (visa_classes, read_visa)
        classes = []
        for name in _select(list_classes(root), config.classes, str(root)):
            train, test = read(root, name)
            classes.append(ClassData(name, tuple(limit_per_defect(test, limit)), tuple(train), False))
        return classes
    if config.dataset == "textile":
        found = [(TEXTILE_CLASS, Path(config.root or textile_root()))]
    else:
        found = folder_classes(Path(config.root))
    roots = dict(found)
    classes = []
    for name in _select(list(roots), config.classes, str(config.root or found[0][1])):
        _, samples = read_folder(roots[name])
        normal = tuple(s for s in samples if s.label == 0)
        classes.append(ClassData(name, tuple(limit_per_defect(samples, limit)), normal, True))
    return classes


# ---------------------------------------------------------------- text prototypes
def ensure_products(bundle: Bundle, class_names: Sequence[str], prompts: str, show_progress: bool, log: Log) -> None:
    """Every class needs text prototypes of the asked prompt style; missing ones are encoded (export stage)."""
    missing = []
    for name in class_names:
        product = product_name(name, prompts)
        if product not in bundle.products():
            missing.append((name, product))
            continue
        style = load_text(bundle, product).prompt_spec.get("style", "cpe")
        if style != prompts:
            raise EvaluationError(
                f"product {product!r} in {bundle.root} has prompt style {style!r}, eval --prompts {prompts} needs "
                f"{prompts!r}; re-encode it: winclip-edge product add --bundle {bundle.root} {product} "
                f"--prompt-style {prompts} --force"
            )
    if not missing:
        return
    try:
        from winclip_edge.export.models import load_from_manifest
        from winclip_edge.export.onnx_export import add_product
    except ImportError as err:
        raise EvaluationError(
            f"bundle {bundle.root} has no text prototypes for {[p for _, p in missing]}; encoding them needs the "
            f"export extras ({err}): pip install 'winclip-edge[export]', or add them on the export machine with "
            f"`winclip-edge product add --bundle {bundle.root} PRODUCT --prompt-style {prompts}`"
        ) from None
    log(f"encoding {prompts} prompts for {[p for _, p in missing]} into {bundle.root}")
    loaded = load_from_manifest(bundle.manifest)
    for name, product in missing:
        add_product(bundle, product, loaded, spec=PromptSpec(object_name=object_name_for(name), style=prompts),
                    show_progress=show_progress)


# ---------------------------------------------------------------- embedding and scoring
@dataclass
class Embedded:
    """Engine outputs of a class's test images: the units of every readable image (docs/tiling.md; a whole frame is
    one unit), rows ``rows[path] .. rows[path] + len(plans[path])``."""

    rows: dict[str, int]  # image path -> its first row in `outputs`
    outputs: dict[str, np.ndarray]  # the graph contract's outputs, [units, ...]
    failed: list[str]  # one message per unreadable image (or one whose units cannot be planned: ROI off the frame)
    plans: dict[str, FramePlan]  # image path -> its units


def embed_images(inspector: Inspector, samples: Sequence[Sample], batch: int,
                 progress: Callable[[int], None]) -> Embedded:
    """One engine pass over ``samples`` through ``Inspector.embed_units`` (every unit of every image of a batch in
    one engine call); the next batch is decoded on a worker thread meanwhile."""
    rows: dict[str, int] = {}
    parts: list[dict[str, np.ndarray]] = []
    failed: list[str] = []
    plans: dict[str, FramePlan] = {}
    n_rows = 0
    for decoded in iter_decoded([s.path for s in samples], inspector.model_size, batch):
        frames = inspector.embed_units(decoded)
        if frames.engine_error is not None:
            raise frames.engine_error
        failed += [d.error for d in decoded if d.error is not None]
        failed += [e for d, e in zip(decoded, frames.errors) if e is not None and d.error is None]
        if frames.outputs is not None:
            parts.append(frames.outputs)
        for i in frames.planned:
            name, plans[decoded[i].name] = decoded[i].name, frames.plans[i]
            rows[name] = n_rows
            n_rows += len(frames.plans[i])
        progress(len(decoded))
    return Embedded(rows, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}, failed, plans)


def _cases(samples: Sequence[Sample], scores: np.ndarray, token_maps: np.ndarray) -> list[dict]:
    """The best and worst cases of a unit (CASE_ROLES), with their token maps for the report pictures."""
    cases = []
    for role, label, highest in CASE_ROLES:
        candidates = [i for i, s in enumerate(samples) if s.label == label]
        if not candidates:
            continue
        pick = max(candidates, key=lambda i: scores[i]) if highest else min(candidates, key=lambda i: scores[i])
        s = samples[pick]
        cases.append({"role": role, "path": s.path, "mask_path": s.mask_path, "label": s.label,
                      "defect_type": s.defect_type, "score": float(scores[pick]),
                      "token_map": token_maps[pick].tolist()})
    return cases


def score_unit(inspector: Inspector, embedded: Embedded, test: Sequence[Sample], memory: Memory | None,
               pixel: bool, progress: Callable[[int], None]) -> dict:
    """Metrics, per-image scores and example cases of one unit from cached embeddings: SCORE_BATCH frames per
    scoring call, each through its units. Untiled runs without an ROI picture a frame by its token map (upsampled
    to its mask for the pixel metrics); tiled or ROI runs stitch full-resolution maps and picture them at
    CASE_MAP_SCALE x the grid (every frame, also one that is a single whole tile: the pictures share one size)."""
    kept = [s for s in test if s.path in embedded.rows]
    whole_frames = inspector.tiling is None and inspector.roi is None
    scores, small_maps = [], []
    accumulator = PixelMetrics() if pixel else None
    case_size = tuple(CASE_MAP_SCALE * g for g in inspector.bundle.spec.grid)
    for start in range(0, len(kept), SCORE_BATCH):
        chunk = kept[start:start + SCORE_BATCH]
        plans = [embedded.plans[s.path] for s in chunk]
        rows = np.concatenate([np.arange(embedded.rows[s.path], embedded.rows[s.path] + len(p)) for s, p in zip(chunk, plans)])
        frames = inspector.score_frames(plans, {k: v[rows] for k, v in embedded.outputs.items()}, memory,
                                        None if memory is None else memory.tiles)
        for s, plan, units in zip(chunk, plans, frames):
            scores.append(frame_score(units)[0])
            mask = None
            if accumulator is not None:
                mask = read_mask(s.mask_path) if s.mask_path else np.zeros(plan.size, np.uint8)
            if whole_frames:
                small_maps.append(units.token_map[0])
                if mask is not None:
                    accumulator.update(upsample_map(units.token_map[0], mask.shape), mask)
            else:
                full = frame_map(plan, units.token_map)
                small_maps.append(cv2.resize(full, case_size[::-1], interpolation=cv2.INTER_AREA))
                if mask is not None:
                    accumulator.update(full, mask)
            progress(1)
    scores = np.array(scores, np.float32)
    metrics: dict[str, float | None] = image_metrics(np.array([s.label for s in kept]), scores)
    metrics.update(accumulator.compute() if accumulator is not None else dict.fromkeys(PIXEL_KEYS))
    return _unit_record(kept, scores, metrics, np.stack(small_maps) if small_maps else np.zeros((0, *case_size)))


def _unit_record(kept: Sequence[Sample], scores: np.ndarray, metrics: dict, maps: np.ndarray) -> dict:
    images = [{"path": s.path, "label": s.label, "defect_type": s.defect_type, "score": float(v)}
              for s, v in zip(kept, scores)]
    return {"n_test": len(kept), "metrics": metrics, "images": images, "cases": _cases(kept, scores, maps)}


# ---------------------------------------------------------------- units and resuming
@dataclass(frozen=True)
class Unit:
    """One (class, shots, seed) evaluation of the run's (prompts, ablation) setting."""

    data: ClassData
    shots: int
    seed: int
    references: tuple[Sample, ...]
    test: tuple[Sample, ...]

    def path(self, out: Path, config: EvalConfig) -> Path:
        return out / PARTIAL_DIR / f"{config.prompts}-{config.ablation}" / self.data.name / \
            f"{self.shots}shot-seed{self.seed}.json"


def plan_units(classes: Sequence[ClassData], config: EvalConfig) -> list[Unit]:
    units = []
    for data in classes:
        for shots in config.shots:
            for seed in seeds_for(shots, config.seeds):
                references, test = data.draw(shots, seed)
                units.append(Unit(data, shots, seed, tuple(references), tuple(test)))
    return units


def fingerprint(bundle: Bundle, config: EvalConfig, engine: EngineConfig | None = None) -> dict:
    """What partial results depend on besides their unit key; a resumed run must match it. ``engine``: the engine
    ``config.engine`` selected (default: ``config.engine`` as given)."""
    m = bundle.manifest
    return {"weights_id": m.weights_id, "model": m.model, "image_size": list(m.image_size), "scales": list(m.scales),
            "stride": m.stride, "patch_layer": m.patch_layer, "temperature": m.temperature,
            "dataset": config.dataset, "root": str(Path(config.root).resolve()) if config.root else None,
            "limit": config.limit, "tiling": config.tiling.to_dict() if config.tiling else None,
            "roi": config.roi.identity if config.roi else None,
            "engine": identity(engine or config.engine)}


def check_resume(out: Path, expected: dict) -> None:
    """Refuse to mix partial results of another configuration into this run's out folder."""
    run_file = out / PARTIAL_DIR / RUN_FILE
    if run_file.is_file():
        stored = json.loads(run_file.read_text())
        differ = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        if differ:
            raise EvaluationError(
                f"{out} holds partial results of another configuration (stored "
                f"{ {k: stored.get(k) for k in differ} }, this run { {k: expected.get(k) for k in differ} }); "
                f"use another --out or delete {out / PARTIAL_DIR}"
            )
    else:
        atomic_write_json(run_file, expected)


def load_finished(path: Path, unit: Unit) -> dict | None:
    """A stored unit result, or None when there is none (or it belongs to another draw)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None  # written atomically, so only a foreign file gets here: recompute it
    same_draw = record.get("references") == [s.path for s in unit.references]
    return record if same_draw else None


# ---------------------------------------------------------------- the run
@dataclass
class EvalResult:
    summary: dict  # what summary.json holds
    files: list[Path]  # everything written under --out (partials excluded)
    computed: int  # units computed in this run
    skipped: int  # finished units found under out/partial
    failed_images: list[str]  # unreadable images (skipped, listed in the report)


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std (ddof 0); None when any value is None (metric not available)."""
    if any(v is None for v in values):
        return None, None
    return float(np.mean(values)), float(np.std(values))


def summarize(config: EvalConfig, bundle: Bundle, classes: Sequence[ClassData], records: dict, info: dict,
              failed_images: Sequence[str]) -> dict:
    """Per shot count: per class per seed, per class mean/std over seeds, and the mean over classes
    (computed per seed, then mean/std over seeds, as the paper reports it), next to the paper's numbers."""
    keys = [*IMAGE_KEYS, *PIXEL_KEYS]
    shots_out = {}
    for shots in config.shots:
        seeds = seeds_for(shots, config.seeds)
        per_class = {}
        for data in classes:
            seed_metrics = {seed: records[(data.name, shots, seed)]["metrics"] for seed in seeds}
            stats = {k: _stats([m[k] for m in seed_metrics.values()]) for k in keys}
            per_class[data.name] = {
                "n_test": records[(data.name, shots, seeds[0])]["n_test"],
                "seeds": {str(seed): m for seed, m in seed_metrics.items()},
                "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
            }
        class_means = {seed: {k: _stats([per_class[c.name]["seeds"][str(seed)][k] for c in classes])[0] for k in keys}
                       for seed in seeds}
        stats = {k: _stats([class_means[seed][k] for seed in seeds]) for k in keys}
        comparable = config.dataset in PAPER_DATASETS and (
            not config.ablation.startswith(SCALE_ABLATION) or tuple(bundle.manifest.scales) == PAPER_SCALES)
        paper = paper_result(config.dataset, shots, config.prompts, config.ablation) if comparable else None
        shots_out[str(shots)] = {
            "seeds": list(seeds), "classes": per_class,
            "per_seed_mean": {str(seed): m for seed, m in class_means.items()},
            "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
            "paper": paper.to_dict() if paper else None,
        }
    m = bundle.manifest
    pixel = {c.name: c.pixel_support() for c in classes}
    return {
        "warning": RANDOM_WEIGHTS_WARNING if m.weights["source"] == "none" else None,
        "bundle": {"path": str(bundle.root), "model": m.model, "weights": dict(m.weights),
                   "image_size": list(m.image_size), "grid": list(m.grid), "scales": list(m.scales),
                   "stride": m.stride, "patch_layer": m.patch_layer},
        "dataset": {"name": config.dataset, "root": str(config.root) if config.root else None,
                    "classes": [c.name for c in classes], "limit": config.limit, "limit_seed": LIMIT_SEED,
                    "references": "drawn from the normal images, excluded from the test set"
                    if classes[0].references_from_test else "drawn from the normal training images (train/good)"},
        "setting": {"prompts": config.prompts, "ablation": config.ablation, "shots": list(config.shots),
                    "seeds": config.seeds, "std": "population, ddof 0", "pictures": config.pictures},
        "metric_keys": keys,
        "pixel_metrics": {name: None if ok else why for name, (ok, why) in pixel.items()},
        "shots": shots_out,
        "failed_images": list(failed_images),
        "run": info,
    }


def run_evaluation(config: EvalConfig, engine: Engine | None = None, log: Log | None = None) -> EvalResult:
    """Evaluate, resume from ``out/partial``, write the tables (and pictures) under ``config.out``."""
    from tqdm import tqdm

    from . import report

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    _check_config(config)
    if config.dataset == "textile" and config.root is None:
        config = replace(config, root=textile_root())
    if config.pictures:
        report.require_matplotlib()
    t_start = time.perf_counter()
    bundle = Bundle(config.bundle)
    options = scoring_options(config.ablation, bundle.manifest.scales)
    classes = load_classes(config)
    for data in classes:
        if max(config.shots) > len(data.reference_pool):
            raise DatasetError(f"class {data.name!r}: {max(config.shots)}-shot needs that many normal reference "
                               f"images; found {len(data.reference_pool)}")
    out = Path(config.out)
    selection = select(bundle, config.engine)  # decided once: the fingerprint and the engine agree
    if config.engine.backend == "auto":
        log(f"engine: {selection.reason}")
    check_resume(out, fingerprint(bundle, config, selection.config))
    units = plan_units(classes, config)
    records = {}
    for unit in units:
        record = load_finished(unit.path(out, config), unit)
        if record is not None:
            records[(unit.data.name, unit.shots, unit.seed)] = record
    todo = [u for u in units if (u.data.name, u.shots, u.seed) not in records]
    skipped = len(units) - len(todo)
    if skipped:
        log(f"resuming {out}: skipped {skipped} finished unit(s) of {len(units)}")
    info = {"engine": None, "device": None, "images_embedded": 0, "embed_seconds": 0.0, "units_computed": len(todo),
            "units_skipped": skipped, "scoring_seconds": 0.0}
    if todo:
        todo_classes = [c for c in classes if any(u.data is c for u in todo)]
        ensure_products(bundle, [c.name for c in todo_classes], config.prompts, config.progress, log)
        own_engine = engine is None
        engine = serialised(engine or selection.create(bundle))  # one lock for every class's Inspector
        info.update(engine=engine.name, device=engine.device)
        total = sum(len(c.test) for c in todo_classes) + sum(len(u.references) + len(u.test) for u in todo)
        try:
            with tqdm(total=total, desc="eval", unit="img", file=sys.stderr, disable=not config.progress) as bar:
                for data in todo_classes:
                    _evaluate_class(config, bundle, options, engine, data, [u for u in todo if u.data is data],
                                    out, records, info, bar)
        finally:
            if own_engine:
                engine.close()
    info["wall_seconds"] = time.perf_counter() - t_start
    ordered = [records[(u.data.name, u.shots, u.seed)] for u in units]
    failed = sorted({f for r in ordered for f in r["failed"]})
    summary = summarize(config, bundle, classes, records, info, failed)
    files = report.write_tables(out, summary, ordered)
    if config.pictures:
        files += report.write_pictures(out, summary, ordered)
    return EvalResult(summary, files, len(todo), skipped, failed)


def _evaluate_class(config: EvalConfig, bundle: Bundle, options: ScoringOptions, engine: Engine, data: ClassData,
                    units: Sequence[Unit], out: Path, records: dict, info: dict, bar) -> None:
    inspector = Inspector(bundle, product_name(data.name, config.prompts), options=options, engine=engine,
                          with_threshold=False, tiling=None, roi=None)  # eval sets its own memories and threshold
    # the run's tiling and ROI, set after loading: the product's own tile memory (if any) is not needed
    inspector.tiling = config.tiling if config.tiling is not None and config.tiling.enabled else None
    inspector.roi = config.roi
    bar.set_postfix_str(f"{data.name}: embedding {len(data.test)} test images")
    t0 = time.perf_counter()
    embedded = embed_images(inspector, data.test, config.batch, bar.update)
    info["embed_seconds"] += time.perf_counter() - t0
    info["images_embedded"] += len(embedded.rows)
    pixel, _ = data.pixel_support()
    for unit in units:
        bar.set_postfix_str(f"{data.name}: {unit.shots}-shot seed {unit.seed}")
        t0 = time.perf_counter()
        memory, failed_refs = None, []
        if unit.references:
            memory, failed_refs = inspector.embed_references([s.path for s in unit.references], config.batch,
                                                             progress=bar.update)
            if memory is None:
                raise EvaluationError(f"class {data.name!r}: none of the {unit.shots} reference image(s) of seed "
                                      f"{unit.seed} could be read: {[r.error for r in failed_refs]}")
        try:
            result = score_unit(inspector, embedded, unit.test, memory, pixel, bar.update)
        except MetricError as err:
            raise EvaluationError(f"class {data.name!r}, {unit.shots}-shot seed {unit.seed}: {err}") from None
        seconds = time.perf_counter() - t0
        info["scoring_seconds"] += seconds
        record = {"class": data.name, "shots": unit.shots, "seed": unit.seed, "prompts": config.prompts,
                  "ablation": config.ablation, "references": [s.path for s in unit.references], **result,
                  "failed": embedded.failed + [r.error for r in failed_refs],
                  "engine": f"{engine.name} ({engine.device})", "seconds": seconds}
        atomic_write_bytes(unit.path(out, config), json.dumps(record).encode())
        records[(data.name, unit.shots, unit.seed)] = record
