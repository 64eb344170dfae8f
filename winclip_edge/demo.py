"""The whole flow on the embedded textile images (PyPI ``conformal-clip-data``), as library calls:

export (if the bundle is missing) -> register K nominal images -> calibrate on other nominal images ->
inspect a mix of nominal / local-defect / global-defect images -> results under ``out``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .bundle import Bundle, BundleError
from .calibration import calibrate
from .engines import EngineConfig
from .inspector import Inspector
from .products import save_threshold
from .prompts import PromptSpec
from .registration import register
from .results import ResultWriter, Summary, inspect_into
from .scoring import ScoringOptions

DEMO_PRODUCT = "textile"
DEMO_OBJECT = "textile"

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    model: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e31"  # tag, local checkpoint path, or "none" (random weights)
    bundle: Path = Path("models/demo-b16p")
    out: Path = Path("runs/demo")
    shots: int = 4  # nominal reference images
    calibration: int = 8  # nominal images for the threshold
    per_class: int = 4  # test images per class nominal / local / global
    batch: int = 8
    seed: int = 0  # which images are drawn
    engine: EngineConfig = EngineConfig()
    progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    summary: Summary
    results: Path
    random_weights: bool
    failed_references: int
    failed_calibration: int


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.jpg"))


def pick_images(seed: int, shots: int, calibration: int, per_class: int) -> tuple[list[str], list[str], list[str]]:
    """(references, calibration images, test images): disjoint nominal draws + local and global defects."""
    from .evaluation.datasets import textile_root

    root = textile_root()
    nominal = _images(root / "nominal")
    picked = [nominal[i] for i in np.random.default_rng(seed).permutation(len(nominal))[: shots + calibration + per_class]]
    tests = picked[shots + calibration:] + [
        p for name in ("local", "global")
        for p in list(np.random.default_rng(seed).choice(_images(root / name), per_class, replace=False))]
    return picked[:shots], picked[shots: shots + calibration], tests


def ensure_bundle(config: DemoConfig, log: Log) -> Bundle:
    """The demo bundle with the textile product: exported when missing (needs the export extra)."""
    from .export import onnx_export
    from .export.models import load_from_manifest

    try:
        bundle = Bundle(config.bundle)
    except BundleError:
        log(f"[demo] 1/4 export {config.model} ({config.pretrained}) -> {config.bundle}")
        options = onnx_export.ExportOptions(model=config.model, pretrained=config.pretrained, products=(DEMO_PRODUCT,),
                                            force=True)
        return onnx_export.export_bundle(config.bundle, options, show_progress=config.progress)
    if DEMO_PRODUCT not in bundle.products():
        onnx_export.add_product(bundle, DEMO_PRODUCT, load_from_manifest(bundle.manifest),
                                spec=PromptSpec(object_name=DEMO_OBJECT), show_progress=config.progress)
    log(f"[demo] using the existing bundle {config.bundle} ({bundle.manifest.weights['source']} weights)")
    return bundle


def run_demo(config: DemoConfig, log: Log = print) -> DemoResult:
    references, calibration, tests = pick_images(config.seed, config.shots, config.calibration, config.per_class)
    bundle = ensure_bundle(config, log)
    log(f"[demo] 2/4 register {len(references)} nominal reference image(s)")
    zero_shot = Inspector(bundle, DEMO_PRODUCT, engine=config.engine, options=ScoringOptions(use_memory=False),
                          with_threshold=False)
    _, failed_refs = register(zero_shot, references, config.batch)
    engine = zero_shot.engine  # one engine for the whole flow
    log(f"[demo] 3/4 calibrate on {len(calibration)} other nominal image(s)")
    few_shot = Inspector(bundle, DEMO_PRODUCT, engine=engine, with_threshold=False)
    threshold, failed_cal = calibrate(few_shot, calibration, batch_size=config.batch)
    save_threshold(bundle, DEMO_PRODUCT, threshold)
    log(f"[demo] 4/4 inspect {len(tests)} images ({config.per_class} nominal, {config.per_class} local, "
        f"{config.per_class} global defects)")
    inspector = Inspector(bundle, DEMO_PRODUCT, engine=engine)
    with ResultWriter(config.out) as writer:
        summary = inspect_into(writer, inspector, tests, config.batch)
    engine.close()
    return DemoResult(summary=replace(summary), results=writer.path,
                      random_weights=bundle.manifest.weights["source"] == "none",
                      failed_references=len(failed_refs), failed_calibration=len(failed_cal))
