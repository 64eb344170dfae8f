"""``engine tune``: time every engine this machine can run, keep the faithful ones, record the fastest in the bundle.

A candidate is a backend x precision x thread count (ONNX Runtime fp32/int8 and fp16 on CUDA, OpenVINO
fp32/bf16/fp16/int8 on each device OpenVINO sees, torch fp32 (fp16 on CUDA), TensorRT fp16/int8 where a plan was
built). Each is created, warmed up, timed at batch 1 on the fidelity images (engine time only: decoding and scoring
do not depend on the engine) and its image scores and token maps are compared with ONNX Runtime fp32 on the same
images, scored with the same product. A candidate whose scores or maps differ by more than the tolerance is
rejected however fast it is, so a threshold calibrated under one accepted engine holds under another to within
twice the score tolerance. Candidates that cannot run here are listed with the reason (never silently dropped).

What each backend contributes (its candidates on this machine, the int8 model a candidate needs) comes from its
record in the backend registry (engines/registry.py); the fp32 ONNX Runtime reference is tune's own.

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
from ..engines.auto import RECORD_FORMAT, config_row, record_path, row_config
from ..engines.base import Engine, EngineError
from ..engines.config import EngineConfig
from ..engines.registry import backend, backends, describe, machine_identity, machine_key, options_values
from ..errors import WinclipError
from ..fileio import atomic_write_json
from .fidelity import fidelity

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
    backends: Sequence[str] = ()  # only these backends (empty = every one with tune candidates)
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
        return {**config_row(self.config), **{k: v for k, v in asdict(self).items() if k != "config"}}


# ---------------------------------------------------------------- what can run here
def candidates(config: TuneConfig, log: Callable[[str], None] = lambda m: None) -> tuple[list[EngineConfig], list[CandidateResult]]:
    """(configs to try, skipped ones with the reason) for this machine: the fp32 reference first, then each
    backend's own candidates (its record), in the registry's order."""
    try_: list[EngineConfig] = [REFERENCE]  # first: every other candidate is compared with it
    try_.extend(replace(REFERENCE, threads=t) for t in config.threads if t)
    skipped: list[CandidateResult] = []
    wanted = set(config.backends)
    for name, record in backends().items():
        if record.candidates is None or wanted and name not in wanted:
            continue
        tries, cannot = record.candidates(config)
        try_ += tries
        skipped += [CandidateResult(cfg, "skipped", reason) for cfg, reason in cannot]
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
    """Make what ``cfg`` needs when it is missing (an int8 model: once per bundle, minutes for ViT-B); the backend's
    record knows what that is."""
    record = backend(cfg.backend)
    if record.prepare is not None:
        record.prepare(bundle, cfg, product, log, build)


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
        raise TuneError(f"bundle {bundle.root} has no product to score with; add one with `winclip-edge product add`")
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
    """``<backend> <precision>`` and what sets the candidate apart: threads, a device, an option not at its default."""
    record = backend(cfg.backend)
    defaults = options_values(record, None)
    changed = [str(v) for k, v in options_values(record, cfg.options).items() if v != defaults[k]]
    extra = [f"{cfg.threads} threads" if cfg.threads else "", cfg.device if cfg.device.lower() not in ("auto", "cpu") else "",
             *changed]
    return " ".join([describe(cfg), *(e for e in extra if e)])


def _row_label(row: dict) -> str:
    """The label of a record's row; a row of a backend no longer installed keeps its plain name."""
    try:
        return _label(row_config(row))
    except EngineError:
        return f"{row['backend']} {row['precision']}"


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
        ms = c["ms_per_image"]
        rows.append([i if c["status"] == "accepted" else "-", _row_label(c), c["runs_on"],
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
    from ..engines.auto import TUNING_DIR, fastest_accepted, select

    selection = select(bundle, EngineConfig())
    lines = [f"engine (--backend auto) on this machine: {selection.reason}"]
    record = selection.record
    exact = fastest_accepted(record, "fp32") if record is not None else None
    if exact is not None:
        lines.append(f"fastest exact engine on this machine (--precision fp32): {describe(row_config(exact))}")
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
