"""``tune``: time every engine this machine can run, keep the faithful ones, record the fastest in the bundle.

A candidate is a backend x precision x thread count (ONNX Runtime fp32/int8 and fp16 on CUDA, OpenVINO
fp32/bf16/fp16/int8 on each device OpenVINO sees, torch fp32 (fp16 on CUDA), TensorRT fp16/int8 where a plan was
built). Each is created, warmed up, timed at batch 1 on the fidelity images (engine time only: decoding and scoring
do not depend on the engine) and its image scores and token maps are compared with ONNX Runtime fp32 on the same
images, scored with the same product. A candidate whose scores or maps differ by more than the tolerance is
rejected however fast it is, so a threshold calibrated under one accepted engine holds under another to within
twice the score tolerance. Candidates that cannot run here are listed with the reason (never silently dropped).

The record (ranked table, winner, tolerance, machine identity, load average) is written atomically with a checksum
to ``bundle/tuning/<machine key>.json`` (engines/auto.py reads it for ``--backend auto``).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from ..bundle import VISUAL_ONNX, Bundle, json_with_checksum
from ..engines import create_engine
from ..engines.auto import RECORD_FORMAT, record_path
from ..engines.base import Engine, EngineError
from ..engines.config import EngineConfig
from ..errors import WinclipError
from .fidelity import fidelity
from ..fileio import atomic_write_json
from .machine import machine_identity, machine_key

DEFAULT_MAX_SCORE_DIFF = 2e-3
DEFAULT_MAX_MAP_DIFF = 1e-2
DEFAULT_FIDELITY_IMAGES = 4
REFERENCE = EngineConfig(backend="onnxruntime", precision="fp32")
EngineFactory = Callable[[Bundle, EngineConfig], Engine]


class TuneError(WinclipError, ValueError):
    """tune cannot run (no product to score with, no image, the fp32 reference itself fails)."""


@dataclass(frozen=True)
class TuneConfig:
    product: str | None = None  # scored with this product's text (+ memory); None = the bundle's first product
    images: Sequence[str] = ()  # image files for timing + fidelity; empty = references, else synthetic frames
    max_score_diff: float = DEFAULT_MAX_SCORE_DIFF
    max_map_diff: float = DEFAULT_MAX_MAP_DIFF
    fidelity_images: int = DEFAULT_FIDELITY_IMAGES  # images per candidate (each one a timed batch-1 call)
    rounds: int = 1  # timed passes over the images per candidate (the first also gives the outputs)
    warmup: int = 1  # untimed calls first (first-call allocations, oneDNN kernel selection)
    threads: Sequence[int] = (0,)  # intra-op thread counts for the CPU backends; 0 = the library's default
    build_variants: bool = True  # make missing ONNX int8 / OpenVINO int8 models (minutes for ViT-B)
    backends: Sequence[str] = ()  # only these backends (empty = all installed)
    interleave: bool = True  # keep the faithful engines loaded and time them round-robin (fair on a shared CPU)


@dataclass
class CandidateResult:
    config: EngineConfig
    status: str  # "accepted" | "rejected" (fidelity) | "skipped" (cannot run here) | "failed" (error while running)
    reason: str = ""
    runs_on: str = ""  # the engine's own description of what ran it
    ms_per_image: float | None = None  # median engine time of a batch-1 call
    ms_min: float | None = None
    score_max_abs: float | None = None
    map_max_abs: float | None = None
    embedding_max_abs: dict = field(default_factory=dict)

    def row(self) -> dict:
        c = self.config
        return {"backend": c.backend, "precision": c.resolved_precision, "threads": c.threads,
                "performance_hint": c.performance_hint, "device": c.device, "provider": c.provider,
                **{k: v for k, v in asdict(self).items() if k != "config"}}


# ---------------------------------------------------------------- what can run here
def _installed(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


def _openvino_devices() -> tuple[list[str], dict[str, list[str]]]:
    import openvino as ov

    core = ov.Core()
    devices = list(core.available_devices)
    return devices, {d: list(core.get_property(d, "OPTIMIZATION_CAPABILITIES")) for d in devices}


def candidates(config: TuneConfig, log: Callable[[str], None] = lambda m: None) -> tuple[list[EngineConfig], list[CandidateResult]]:
    """(configs to try, skipped ones with the reason) for this machine."""
    try_: list[EngineConfig] = []
    skipped: list[CandidateResult] = []
    wanted = set(config.backends)

    def want(backend: str) -> bool:
        return not wanted or backend in wanted

    def cpu(cfg: EngineConfig) -> None:
        try_.extend(replace(cfg, threads=t) for t in config.threads)

    def skip(backend: str, precision: str, reason: str, **kw) -> None:
        skipped.append(CandidateResult(EngineConfig(backend=backend, precision=precision, **kw), "skipped", reason))

    try_.append(REFERENCE)  # first: every other candidate is compared with it
    try_.extend(replace(REFERENCE, threads=t) for t in config.threads if t)
    if want("onnxruntime"):
        cpu(EngineConfig(backend="onnxruntime", precision="int8"))
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            try_ += [EngineConfig(backend="onnxruntime", precision=p, provider="cuda") for p in ("fp32", "fp16")]
        else:
            skip("onnxruntime", "fp16", "no CUDA execution provider (onnxruntime-gpu + an NVIDIA GPU)", provider="cuda")
    if want("openvino"):
        if not _installed("openvino"):
            skip("openvino", "fp32", "openvino is not installed (pip install 'winclip-edge[openvino]')")
        else:
            devices, caps = _openvino_devices()
            for device in devices:
                kind = device.split(".")[0]
                base = EngineConfig(backend="openvino", device=device)
                for precision in ("fp32", "bf16", "fp16", "int8"):
                    cap = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16", "int8": "INT8"}[precision]
                    if cap not in caps[device]:
                        skip("openvino", precision, f"{device} has no {precision} kernels ({caps[device]})", device=device)
                    elif kind == "CPU" and precision == "fp16":
                        skip("openvino", precision, "OpenVINO runs fp16 on a CPU as bf16 or fp32", device=device)
                    elif kind == "CPU":
                        cpu(replace(base, precision=precision))
                    else:
                        try_.append(replace(base, precision=precision))
            for kind in ("GPU", "NPU"):
                if not any(d.startswith(kind) for d in devices):
                    skip("openvino", "fp16", f"no Intel {kind} visible to OpenVINO here (not run)", device=kind)
    if want("torch"):
        if not (_installed("torch") and _installed("open_clip")):
            skip("torch", "fp32", "torch / open_clip are not installed (the export extra)")
        else:
            try_.append(EngineConfig(backend="torch", precision="fp32", device="cpu"))
            skip("torch", "bf16", "the torch backend runs fp32 / fp16 only; bf16 on the CPU is OpenVINO's", device="cpu")
            import torch

            if torch.cuda.is_available():
                try_.append(EngineConfig(backend="torch", precision="fp16", device="cuda"))
    if want("tensorrt"):
        if _installed("tensorrt"):
            try_ += [EngineConfig(backend="tensorrt", precision=p) for p in ("fp16", "int8")]
        else:
            skip("tensorrt", "fp16", "TensorRT is not installed (needs an NVIDIA GPU)")
    log(f"{len(try_)} candidate(s) to time, {len(skipped)} cannot run here")
    return try_, skipped


# ---------------------------------------------------------------- measuring
def _fidelity_images(bundle: Bundle, config: TuneConfig, product: str,
                     log: Callable[[str], None] = lambda m: None) -> tuple[np.ndarray, str]:
    """The given images, else the product's references, else synthetic frames (samples.py)."""
    from ..engines.onnx_variants import VariantError
    from ..samples import REFERENCES, SYNTHETIC, load_model_inputs

    loaded = load_model_inputs(bundle.spec.image_size, config.images, bundle=bundle, product=product,
                               fallbacks=(REFERENCES, SYNTHETIC), limit=config.fidelity_images)
    for path, why in loaded.skipped:
        log(f"skipping {path}: {why}")
    if not len(loaded.images):
        raise VariantError(f"no readable calibration image among {loaded.tried} from {loaded.source}")
    return loaded.images, loaded.described


def prepare_engine(bundle: Bundle, cfg: EngineConfig, product: str | None, log: Callable[[str], None],
                   build: bool = True) -> None:
    """Make the int8 model ``cfg`` needs when it is missing (once per bundle; minutes for ViT-B)."""
    from ..engines.onnx_variants import VariantError, load_variant
    from ..engines.openvino import load_int8

    if cfg.resolved_precision != "int8" or not build:
        return
    if cfg.backend == "onnxruntime":
        try:
            load_variant(bundle, "int8")
        except VariantError:
            from ..builders.variants import make_variant

            log("making the ONNX Runtime int8 variant (dynamic quantisation) ...")
            make_variant(bundle, "int8")
    elif cfg.backend == "openvino":
        try:
            load_int8(bundle)
        except VariantError:
            from ..builders.openvino import calibration_images, make_int8

            frames, described = calibration_images(bundle, product)
            make_int8(bundle, frames, described)


def _measure(engine: Engine, images: np.ndarray, rounds: int, warmup: int) -> tuple[list[float], dict[str, np.ndarray]]:
    """Batch-1 engine calls on ``images`` (``rounds`` passes, after ``warmup`` untimed calls): ms per call, and the
    outputs of the first pass."""
    import time

    for _ in range(warmup):
        engine.run(images[:1])
    samples, parts = [], {}
    for r in range(rounds):
        for i in range(len(images)):
            t0 = time.perf_counter()
            out = engine.run(images[i:i + 1])
            samples.append((time.perf_counter() - t0) * 1e3)
            if r == 0:
                for name, value in out.items():
                    parts.setdefault(name, []).append(value)
    return samples, {name: np.concatenate(v) for name, v in parts.items()}


def _interleaved(engines: dict[int, Engine], images: np.ndarray, rounds: int) -> dict[int, list[float]]:
    """ms per batch-1 call of every engine, one call of each in turn: a change of load hits all of them alike."""
    import time

    samples: dict[int, list[float]] = {i: [] for i in engines}
    try:
        for _ in range(rounds):
            for k in range(len(images)):
                for i, engine in engines.items():
                    t0 = time.perf_counter()
                    engine.run(images[k:k + 1])
                    samples[i].append((time.perf_counter() - t0) * 1e3)
    finally:
        for engine in engines.values():
            engine.close()
    return samples


def run_tune(bundle: Bundle, config: TuneConfig = TuneConfig(), factory: EngineFactory = create_engine,
             log: Callable[[str], None] = lambda m: None) -> dict:
    """Measure every candidate and return the record (not yet saved; :func:`save_record` writes it)."""
    from ..inspector import Inspector

    if config.max_score_diff < 0 or config.max_map_diff < 0:
        raise TuneError("--max-score-diff and --max-map-diff must be >= 0")
    if config.fidelity_images < 1 or config.rounds < 1:
        raise TuneError("tune needs at least one image and one round")
    products = bundle.products()
    product = config.product or (products[0] if products else None)
    if product is None:
        raise TuneError(f"bundle {bundle.root} has no product to score with; add one with `winclip-edge add-product`")
    load_before = [round(v, 2) for v in os.getloadavg()]
    images, described = _fidelity_images(bundle, config, product, log)
    log(f"timing + fidelity on {described}, scored with product {product!r}")
    tries, skipped = candidates(config, log)
    scorer = Inspector(bundle, product, engine=_NoEngine(), with_threshold=False)
    reference: tuple | None = None
    results: list[CandidateResult] = []
    kept: dict[int, Engine] = {}  # result index -> engine, timed together afterwards (interleaved)
    for cfg in tries:
        label = _label(cfg)
        try:
            prepare_engine(bundle, cfg, product, log, config.build_variants)
            engine = factory(bundle, cfg)
        except (WinclipError, OSError, RuntimeError, ImportError) as err:
            if cfg == REFERENCE:
                raise TuneError(f"the fp32 reference cannot run: {err}") from None
            results.append(CandidateResult(cfg, "skipped", f"{type(err).__name__}: {err}".splitlines()[0]))
            log(f"{label}: cannot run here ({results[-1].reason})")
            continue
        try:
            samples, outputs = _measure(engine, images, 1 if config.interleave else config.rounds, config.warmup)
            result = CandidateResult(cfg, "accepted", runs_on=engine.device, ms_per_image=float(np.median(samples)),
                                     ms_min=float(np.min(samples)))
            scored = (outputs, scorer.score(outputs))
        except (WinclipError, RuntimeError, ValueError) as err:
            engine.close()
            if cfg == REFERENCE:
                raise TuneError(f"the fp32 reference fails on the tune images: {err}") from None
            results.append(CandidateResult(cfg, "failed", f"{type(err).__name__}: {err}".splitlines()[0]))
            log(f"{label}: failed ({results[-1].reason})")
            continue
        if cfg == REFERENCE:  # the first candidate
            reference = scored
        fid = fidelity(reference, scored)
        result.score_max_abs, result.map_max_abs = fid.score_max_abs, fid.map_max_abs
        result.embedding_max_abs = fid.embedding_max_abs
        if fid.score_max_abs > config.max_score_diff or fid.map_max_abs > config.max_map_diff:
            result.status = "rejected"
            result.reason = (f"unfaithful: score diff {fid.score_max_abs:.1e} (limit {config.max_score_diff:.0e}), "
                             f"map diff {fid.map_max_abs:.1e} (limit {config.max_map_diff:.0e})")
        log(f"{label}: {result.ms_per_image:.1f} ms/image (first pass), score diff {fid.score_max_abs:.1e}, map diff "
            f"{fid.map_max_abs:.1e} -> {result.status}")
        if config.interleave and result.status == "accepted":
            kept[len(results)] = engine
        else:
            engine.close()
        results.append(result)
    if kept:
        log(f"timing {len(kept)} faithful engine(s) interleaved: {config.rounds} round(s) x {len(images)} image(s)")
        timed = _interleaved(kept, images, config.rounds)
        for index, samples in timed.items():
            results[index].ms_per_image, results[index].ms_min = float(np.median(samples)), float(np.min(samples))
            log(f"{_label(results[index].config)}: {results[index].ms_per_image:.1f} ms/image")
    accepted = sorted((r for r in results if r.status == "accepted"), key=lambda r: r.ms_per_image)
    ref_rows = [r for r in results if r.config == REFERENCE and r.status == "accepted"]
    ref_ms = ref_rows[0].ms_per_image if ref_rows else accepted[0].ms_per_image
    ranked = accepted + [r for r in results if r.status != "accepted"] + skipped
    identity = machine_identity()
    return {
        "format": RECORD_FORMAT, "machine_key": machine_key(identity), "machine": identity,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "visual_sha256": bundle.manifest.files[VISUAL_ONNX], "product": product, "images": described,
        "tolerance": {"score": config.max_score_diff, "map": config.max_map_diff},
        "reference": _label(REFERENCE), "reference_ms_per_image": ref_ms,
        "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "candidates": [r.row() for r in ranked], "winner": accepted[0].row(),
    }


class _NoEngine:
    """Stands in for an engine in the Inspector that only scores (tune runs the candidates' engines itself)."""

    name, device = "none", "none"

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise EngineError("the tune scorer runs no engine")

    def close(self) -> None:
        pass


def _label(cfg: EngineConfig) -> str:
    extra = [f"{cfg.threads} threads" if cfg.threads else "", cfg.device if cfg.device.lower() not in ("auto", "cpu") else "",
             cfg.provider if cfg.provider != "auto" else ""]
    return " ".join([cfg.backend, cfg.resolved_precision, *(e for e in extra if e)])


def save_record(bundle: Bundle, record: dict) -> str:
    """Write the record for its machine (atomically, checksummed); returns the path."""
    path = record_path(bundle, record["machine_key"])
    atomic_write_json(path, json_with_checksum(record))
    return str(path)


def render_table(record: dict) -> str:
    """The ranked candidates as Markdown (the table ``tune`` prints)."""
    from .bench import markdown_table

    ref = record["reference_ms_per_image"]
    rows = []
    for i, c in enumerate(record["candidates"], 1):
        cfg = EngineConfig(backend=c["backend"], precision=c["precision"], threads=c["threads"], device=c["device"],
                           provider=c["provider"])
        ms = c["ms_per_image"]
        rows.append([i if c["status"] == "accepted" else "-", _label(cfg), c["runs_on"],
                     f"{ms:.1f}" if ms is not None else "", f"{ref / ms:.2f}x" if ms else "",
                     f"{c['score_max_abs']:.1e}" if c["score_max_abs"] is not None else "",
                     f"{c['map_max_abs']:.1e}" if c["map_max_abs"] is not None else "", c["status"], c["reason"]])
    m = record["machine"]
    head = [f"machine: {m['cpu']} (key {record['machine_key']}; ISA {' '.join(m['isa_flags'])}; GPU "
            f"{', '.join(m['gpus']) or 'none'}), {record['date']}, load average {record['load_average_before']} -> "
            f"{record['load_average_after']} (a shared CPU makes every row slower alike: compare rows, not runs)",
            f"images: {record['images']}; product {record['product']!r}; tolerance: score {record['tolerance']['score']:.0e},"
            f" map {record['tolerance']['map']:.0e} vs {record['reference']}", ""]
    return "\n".join(head) + "\n" + markdown_table(
        ["rank", "engine", "runs on", "ms / image (batch 1)", "speed-up vs fp32", "score diff", "map diff", "status",
         "why"], rows)


__all__ = ["CandidateResult", "DEFAULT_MAX_MAP_DIFF", "DEFAULT_MAX_SCORE_DIFF", "TuneConfig", "TuneError", "engine_notes",
           "prepare_engine",
           "candidates", "render_table", "run_tune", "save_record"]


def engine_notes(bundle: Bundle) -> list[str]:
    """What ``info`` says about engines: what auto runs here and how far a threshold carries between engines."""
    from ..engines.auto import TUNING_DIR, fastest_accepted, resolve, row_config

    selection = resolve(bundle, EngineConfig(backend="auto"))
    lines = [f"engine (--backend auto) on this machine: {selection.reason}"]
    record = selection.record
    exact = fastest_accepted(record, "fp32") if record is not None else None
    if exact is not None:
        lines.append(f"fastest exact engine on this machine (--precision fp32): "
                     f"{row_config(exact, EngineConfig()).describe()}")
    if record is None:
        lines.append("thresholds: exact only under the engine they were calibrated with (onnxruntime fp32 is the "
                     "reference); `tune` measures how far the other engines' scores differ here")
    else:
        accepted = [c for c in record["candidates"] if c["status"] == "accepted"]
        worst = max(c["score_max_abs"] for c in accepted)
        lines.append(f"thresholds: on this machine the {len(accepted)} accepted engines "
                     f"({', '.join(c['backend'] + ' ' + c['precision'] for c in accepted)}) score within {worst:.1e} of "
                     f"onnxruntime fp32 (tolerance {record['tolerance']['score']:.0e}), so a threshold calibrated under "
                     f"one holds under another to within {2 * worst:.1e}; a rejected or unmeasured engine needs "
                     "`calibrate` again")
    others = sorted(p.stem for p in (bundle.root / TUNING_DIR).glob("*.json") if p.stem != machine_key())
    if others:
        lines.append(f"tune records of other machines / library versions (not used here): {', '.join(others)}")
    return lines
