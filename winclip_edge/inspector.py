"""The Python API: an Inspector loads a bundle, a product and a backend once, then scores images.

    from winclip_edge import Inspector
    inspector = Inspector("models/b16p", "bottle")            # ONNX Runtime, CPU or GPU
    for r in inspector.inspect(["part1.png", "part2.png"]):
        print(r.path, r.score, r.anomalous, r.anomaly_map.shape)

One expensive call (the engine, batched) and cheap numpy scoring per batch. The next batch is
decoded and resized on a worker thread while the engine runs the current one.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np

from .bundle import Bundle
from .contract import IMAGE_EMBEDDING, PATCH_TOKENS, window_output_name
from .engines import Engine, EngineConfig, EngineError, create_engine
from .heatmap import upsample_map
from .preprocess import ImageError, as_rgb, read_image, resize_to_model
from .products import Memory, Threshold, load_memory, load_text, load_threshold
from .scoring import Scores, ScoringOptions, score_batch

ImageInput = Union[str, os.PathLike, np.ndarray]
DEFAULT_BATCH = 8


@dataclass
class InspectionResult:
    """One input's outcome. ``error`` is set (and the numbers are None) when the input could not be read."""

    path: str  # file path, or "array[i]" for in-memory images
    score: float | None = None  # image anomaly score in [0, 1] (higher = more anomalous)
    anomalous: bool | None = None  # score > threshold; None when the product has no calibrated threshold
    threshold: float | None = None
    anomaly_map: np.ndarray | None = None  # float32 [H, W] at the original image size, values in [0, 1]
    zero_shot_score: float | None = None  # s(f_img), the text-only image score
    image: np.ndarray | None = None  # the decoded RGB image (kept only when asked for, for overlays)
    timings_ms: dict = field(default_factory=dict)  # decode, engine (per image share), scoring, resize
    error: str | None = None


@dataclass
class Decoded:
    name: str
    image: np.ndarray | None  # RGB at original size
    model_input: np.ndarray | None  # RGB at model size
    decode_ms: float
    error: str | None


def name_of(item: ImageInput, index: int) -> str:
    return f"array[{index}]" if isinstance(item, np.ndarray) else str(item)


def _flat_memory(memory: Memory | None) -> tuple[dict[int, np.ndarray] | None, np.ndarray | None]:
    """All references' rows in one matrix per scale (``[R*W_k, D]``) and for the patches (``[R*h*w, C]``):
    matching is position-free (docs/method.md §7.2)."""
    if memory is None:
        return None, None
    windows = {k: v.reshape(-1, v.shape[-1]) for k, v in memory.windows.items()}
    return windows, memory.patch_tokens.reshape(-1, memory.patch_tokens.shape[-1])


def decode(item: ImageInput, size: tuple[int, int], name: str) -> Decoded:
    """Read and resize one input; errors become a message, never an exception (one bad image never stops a batch)."""
    t0 = time.perf_counter()
    try:
        image = as_rgb(item, name) if isinstance(item, np.ndarray) else read_image(item)
        model_input = resize_to_model(image, size)
    except ImageError as err:
        return Decoded(name, None, None, (time.perf_counter() - t0) * 1e3, str(err))
    except Exception as err:  # cv2.error, MemoryError ...: still one input's problem, not the batch's
        return Decoded(name, None, None, (time.perf_counter() - t0) * 1e3, f"{name}: {type(err).__name__}: {err}")
    return Decoded(name, image, model_input, (time.perf_counter() - t0) * 1e3, None)


def iter_decoded(items: Sequence[ImageInput], size: tuple[int, int], batch_size: int) -> Iterator[list[Decoded]]:
    """Decoded batches of ``items``; the next batch is decoded on a worker thread while the caller uses this one."""
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]

    def load(indices: list[int]) -> list[Decoded]:
        return [decode(items[i], size, name_of(items[i], i)) for i in indices]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="winclip-decode") as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for b in range(len(batches)):
            decoded = pending.result()
            pending = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
            yield decoded


class Inspector:
    """Bundle + product + engine. Thread-safe: concurrent callers are serialised around the engine."""

    def __init__(self, bundle: str | os.PathLike | Bundle, product: str, engine: EngineConfig | Engine = EngineConfig(),
                 options: ScoringOptions = ScoringOptions(), sigma: float = 0.0, with_threshold: bool = True):
        """``engine``: what to run (an EngineConfig), or an engine already made for this bundle (shared between
        Inspectors, or a test double). ``with_threshold=False`` skips the product's threshold (register and calibrate
        replace it anyway); ``options.use_memory=False`` runs zero-shot without reading the memory."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.product = product
        self.options = options.resolved(self.bundle.manifest.scales, self.bundle.manifest.temperature)
        self.sigma = sigma  # Gaussian smoothing of the output map, in pixels of the original image (0 = off)
        self.text = load_text(self.bundle, product)
        # Zero-shot runs never read the memory, so `register` can replace a damaged one.
        self.memory: Memory | None = load_memory(self.bundle, product) if options.use_memory else None
        self.threshold: Threshold | None = load_threshold(
            self.bundle, product, self.memory, self.options.decision_record()) if with_threshold else None
        self.engine = create_engine(self.bundle, engine) if isinstance(engine, EngineConfig) else engine
        self._lock = threading.Lock()
        self._set_memory(self.memory)

    # ------------------------------------------------------------ building blocks
    def _set_memory(self, memory: Memory | None) -> None:
        self.memory = memory
        self._memory_windows, self._memory_patches = _flat_memory(memory)

    @property
    def mode(self) -> str:
        return "zero-shot" if self.memory is None else f"few-shot (K={self.memory.size})"

    @property
    def model_size(self) -> tuple[int, int]:
        return self.bundle.spec.image_size

    def embed(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[N, H, W, 3]`` at the model size -> the graph contract's outputs."""
        with self._lock:
            return self.engine.run(batch)

    def score(self, outputs: dict[str, np.ndarray], memory: Memory | None | str = "product") -> Scores:
        """Scores and token maps of embedded images; ``memory`` = "product" (default), another Memory, or None."""
        windows, patches = (self._memory_windows, self._memory_patches) if isinstance(memory, str) else _flat_memory(memory)
        spec = self.bundle.spec
        return score_batch(outputs, self.text.t_normal, self.text.t_anomalous, spec.grid, spec.stride, spec.scales,
                           self.options, windows, patches)

    # ------------------------------------------------------------ the main call
    def inspect(self, images: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH, keep_images: bool = False) -> list[InspectionResult]:
        """Score images (paths or RGB uint8 arrays). Returns one result per input, in order."""
        return list(self.iter_inspect(images, batch_size, keep_images))

    def iter_inspect(self, images: Iterable[ImageInput], batch_size: int = DEFAULT_BATCH,
                     keep_images: bool = False) -> Iterator[InspectionResult]:
        """Like :meth:`inspect`, yielding results as batches finish; decoding overlaps the engine."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        for decoded in iter_decoded(list(images), self.model_size, batch_size):
            yield from self.inspect_decoded(decoded, keep_images)

    def inspect_decoded(self, decoded: list[Decoded], keep_images: bool) -> list[InspectionResult]:
        good = [d for d in decoded if d.error is None]
        results = {}
        if good:
            t0 = time.perf_counter()
            try:
                outputs = self.embed(np.stack([d.model_input for d in good]))
            except EngineError as err:  # e.g. a Triton server that is down: this batch fails, later ones still run
                return [InspectionResult(path=d.name, error=d.error or f"{d.name}: {err}",
                                         timings_ms={"decode": d.decode_ms}) for d in decoded]
            t1 = time.perf_counter()
            scores = self.score(outputs)
            t2 = time.perf_counter()
            engine_ms, scoring_ms = (t1 - t0) * 1e3 / len(good), (t2 - t1) * 1e3 / len(good)
            threshold = self.threshold.value if self.threshold is not None else None
            for i, d in enumerate(good):
                t3 = time.perf_counter()
                full_map = upsample_map(scores.token_map[i], d.image.shape[:2], self.sigma)
                score = float(scores.image_score[i])
                results[id(d)] = InspectionResult(
                    path=d.name, score=score, anomalous=None if threshold is None else bool(score > threshold),
                    threshold=threshold, anomaly_map=full_map, zero_shot_score=float(scores.zero_shot_score[i]),
                    image=d.image if keep_images else None,
                    timings_ms={"decode": d.decode_ms, "engine": engine_ms, "scoring": scoring_ms,
                                "resize": (time.perf_counter() - t3) * 1e3},
                )
        return [results.get(id(d)) or InspectionResult(path=d.name, error=d.error, timings_ms={"decode": d.decode_ms})
                for d in decoded]

    # ------------------------------------------------------------ references
    def embed_references(self, images: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH,
                         progress: Any = None) -> tuple[Memory | None, list[InspectionResult]]:
        """Embed normal reference images into a Memory; unreadable ones are returned as error results."""
        from .fileio import sha256_file

        items = list(images)
        parts: dict[str, list[np.ndarray]] = {}
        sources, hashes, failed = [], [], []
        for start in range(0, len(items), batch_size):
            decoded = [decode(items[i], self.model_size, name_of(items[i], i)) for i in range(start, min(start + batch_size, len(items)))]
            good = [d for d in decoded if d.error is None]
            failed += [InspectionResult(path=d.name, error=d.error) for d in decoded if d.error is not None]
            if good:
                outputs = self.embed(np.stack([d.model_input for d in good]))
                for name, value in outputs.items():
                    parts.setdefault(name, []).append(value)
                for d in good:
                    sources.append(str(Path(d.name).resolve()) if not d.name.startswith("array[") else d.name)
                    hashes.append(sha256_file(d.name) if not d.name.startswith("array[") else "")
            if progress is not None:
                progress(len(decoded))
        if not sources:
            return None, failed
        cat = {name: np.concatenate(v) for name, v in parts.items()}
        memory = Memory(
            image_embeddings=cat[IMAGE_EMBEDDING],
            windows={k: cat[window_output_name(k)] for k in self.bundle.spec.scales},
            patch_tokens=cat[PATCH_TOKENS], sources=sources, source_sha256=hashes,
        )
        return memory, failed

    def close(self) -> None:
        self.engine.close()
