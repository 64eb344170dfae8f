"""The Python API: an Inspector loads a bundle, a product and a backend once, then scores images.

    from winclip_edge import Inspector
    inspector = Inspector("models/b16p", "bottle")            # ONNX Runtime, CPU or GPU
    for r in inspector.inspect(["part1.png", "part2.png"]):
        print(r.path, r.score, r.anomalous, r.anomaly_map.shape)

One expensive call (the engine, batched) and cheap numpy scoring per batch. The next batch is
decoded and resized on a worker thread while the engine runs the current one. Every frame is a plan
of units (tiles/units.py: the whole frame alone is a one-unit plan, tiles and an ROI add to it), and
inspect, register, calibrate and eval all embed frames through ``Inspector.embed_units``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .bundle import Bundle, BundleError
from .contract import IMAGE_EMBEDDING, PATCH_TOKENS, window_output_name
from .engines import Engine, EngineConfig, EngineError, Selection, select
from .engines.serial import serialised
from .errors import WinclipError
from .products import Memory, Threshold, load_memory, load_text, load_threshold, load_tiling
from .samples import Decoded, ImageInput, decode, iter_decoded, name_of  # the decoder (re-exported: callers' names)
from .tiles.roi import Roi, RoiError, load_roi
from .scoring import Scores, ScoringOptions, score_batch
from .tiles.memory import TileMemory, load_tile_memory
from .tiles.units import GLOBAL, POOLED, FramePlan, UnitScores, frame_map, frame_score, plan_frame, reference_plan, \
    score_units, token_masks, unit_inputs
from .tiles.tiling import TilingConfig
from .versions import pinned

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
    roi: np.ndarray | None = None  # bool [H, W]: the inspected region when the product has an ROI (overlays outline it)
    units: int = 1  # model inputs the frame took: the whole frame and/or its tiles (docs/tiling.md)
    timings_ms: dict = field(default_factory=dict)  # decode, engine (per image share), scoring, resize
    error: str | None = None


@dataclass
class FrameUnits:
    """A batch of decoded frames through the engine (:meth:`Inspector.embed_units`): per frame its plan or its
    error, and the outputs of all planned frames' units of one engine call (frame by frame, each in plan order)."""

    plans: list[FramePlan | None]  # per frame; None where it has no plan (unreadable, ROI off the frame, ...)
    errors: list[str | None]  # per frame: why it has no result (also set for every frame when the engine failed)
    outputs: dict[str, np.ndarray] | None  # None when no frame was planned or the engine failed
    engine_error: EngineError | None = None  # the engine's failure, for callers that stop on it (register, eval)
    engine_ms: float = 0.0  # the engine call

    @property
    def planned(self) -> list[int]:
        """Indices of the frames whose units are in ``outputs``, in order."""
        return [i for i, (p, e) in enumerate(zip(self.plans, self.errors)) if p is not None and e is None]


def _flat_memory(memory: Memory | None) -> tuple[dict[int, np.ndarray] | None, np.ndarray | None]:
    """All references' rows in one matrix per scale (``[R*W_k, D]``) and for the patches (``[R*h*w, C]``):
    matching is position-free (docs/method.md §7.2)."""
    if memory is None:
        return None, None
    windows = {k: v.reshape(-1, v.shape[-1]) for k, v in memory.windows.items()}
    return windows, memory.patch_tokens.reshape(-1, memory.patch_tokens.shape[-1])


class Inspector:
    """Bundle + product + engine. Thread-safe: engine calls queue on the engine's one lock (engines/serial.py),
    shared with every Inspector given the same engine."""

    def __init__(self, bundle: str | os.PathLike | Bundle, product: str, engine: EngineConfig | Engine = EngineConfig(),
                 options: ScoringOptions = ScoringOptions(), sigma: float = 0.0, with_threshold: bool = True,
                 tiling: TilingConfig | None | str = "product", roi: Roi | None | str = "product"):
        """``engine``: what to run (an EngineConfig: ``select`` decides which engine it means and why, kept as
        ``self.selection``), or an engine already made for this bundle (shared between Inspectors, or a test double;
        ``self.selection`` is then None; serialised here unless it is already, as another Inspector's ``engine`` is).
        ``with_threshold=False`` skips the product's threshold (register and calibrate replace it anyway);
        ``options.use_memory=False`` runs zero-shot without reading the memory.
        ``tiling`` / ``roi``: "product" = the product's stored setting (docs/tiling.md), None = off, or a given one."""
        # Pinned to the product's live version once (versions.py): every file of this load comes from one version
        # even if a teach or rollback moves the pointer meanwhile; ``version`` says which (None: unversioned files).
        self.bundle, live = pinned(bundle if isinstance(bundle, Bundle) else Bundle(bundle), product)
        self.version: int | None = None if live is None else live.number
        self.product = product
        self.options = options.resolved(self.bundle.manifest.scales, self.bundle.manifest.temperature)
        self.sigma = sigma  # Gaussian smoothing of the output map, in pixels of the original image (0 = off)
        self.text = load_text(self.bundle, product)
        # Zero-shot runs never read the memory, so `register` can replace a damaged one.
        self.memory: Memory | None = load_memory(self.bundle, product) if options.use_memory else None
        tiling = load_tiling(self.bundle, product) if isinstance(tiling, str) else tiling
        self.tiling: TilingConfig | None = tiling if tiling is not None and tiling.enabled else None
        self.roi: Roi | None = load_roi(self.bundle, product) if isinstance(roi, str) else roi
        self.tile_memory: TileMemory | None = self._load_tile_memory()
        self.threshold: Threshold | None = load_threshold(
            self.bundle, product, self.memory, self.decision_record()) if with_threshold else None
        self.selection: Selection | None = select(self.bundle, engine) if isinstance(engine, EngineConfig) else None
        self.engine = serialised(self.selection.create(self.bundle) if self.selection is not None else engine)
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
        """Like :meth:`inspect`, yielding results as batches finish; decoding overlaps the engine. ``images`` may be
        an endless iterable: at most one batch beyond the current one is read."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        for decoded in iter_decoded(images, self.model_size, batch_size):
            yield from self.inspect_decoded(decoded, keep_images)

    def inspect_decoded(self, decoded: list[Decoded], keep_images: bool) -> list[InspectionResult]:
        """Results of a decoded batch (the line batcher's entry): its frames' units through :meth:`embed_units`,
        scored and mapped per frame. An engine failure fails this batch only (e.g. a Triton server that is down)."""
        frames = self.embed_units(decoded)
        results: list[InspectionResult | None] = [None] * len(decoded)
        if frames.outputs is not None:
            planned = frames.planned
            t1 = time.perf_counter()
            units = self.score_frames([frames.plans[i] for i in planned], frames.outputs)
            t2 = time.perf_counter()
            engine_ms, scoring_ms = frames.engine_ms / len(planned), (t2 - t1) * 1e3 / len(planned)
            threshold = self.threshold.value if self.threshold is not None else None
            for i, frame_units in zip(planned, units):
                t3 = time.perf_counter()
                d, plan = decoded[i], frames.plans[i]
                score, zero_shot = frame_score(frame_units)
                results[i] = InspectionResult(
                    path=d.name, score=score, anomalous=None if threshold is None else bool(score > threshold),
                    threshold=threshold, anomaly_map=frame_map(plan, frame_units.token_map, self.sigma),
                    zero_shot_score=zero_shot, image=d.image if keep_images else None, roi=plan.inside,
                    timings_ms={"decode": d.decode_ms, "engine": engine_ms, "scoring": scoring_ms,
                                "resize": (time.perf_counter() - t3) * 1e3}, units=len(plan))
        return [r or InspectionResult(path=d.name, error=e, timings_ms={"decode": d.decode_ms})
                for d, r, e in zip(decoded, results, frames.errors)]

    def embed_units(self, decoded: Sequence[Decoded], references: bool = False) -> FrameUnits:
        """The one way frames reach the engine (inspect, register, calibrate, eval): every readable frame of
        ``decoded`` is planned (:meth:`plan`; the whole frame is a one-unit plan whose input is the decoder's
        ``model_input``) and all units of all frames go through one engine call. A frame that cannot be planned
        is that frame's error; an engine failure is every planned frame's (``engine_error`` says so).
        ``references``: the units a reference stores (whole frame, and every tile when tiled; no ROI)."""
        plans: list[FramePlan | None] = []
        errors: list[str | None] = []
        inputs: list[np.ndarray] = []
        for d in decoded:
            plan, error = None, d.error
            if error is None:
                try:
                    plan = self._reference_plan(d.image.shape[:2]) if references else self.plan(d.image.shape[:2])
                except WinclipError as err:  # this frame's problem (ROI off the frame, other grid), not the batch's
                    error = f"{d.name}: {err}"
            if plan is not None:
                crops = iter(unit_inputs(d.image, plan, self.model_size, skip_global=True))
                inputs += [d.model_input if key == GLOBAL else next(crops) for key in plan.keys]
            plans.append(plan)
            errors.append(error)
        if not inputs:
            return FrameUnits(plans, errors, None)
        t0 = time.perf_counter()
        try:
            outputs = self.embed(np.stack(inputs))
        except EngineError as err:
            failed = [e if p is None else f"{d.name}: {err}" for d, p, e in zip(decoded, plans, errors)]
            return FrameUnits(plans, failed, None, engine_error=err)
        return FrameUnits(plans, errors, outputs, engine_ms=(time.perf_counter() - t0) * 1e3)

    # ------------------------------------------------------------ references
    def embed_references(self, images: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH,
                         progress: Any = None) -> tuple[Memory | None, list[InspectionResult]]:
        """Embed normal reference images into a Memory (and, tiled, its TileMemory); unreadable ones are returned
        as error results. The whole frames' rows go to memory.npz, the tiles' to the tile memory."""
        from .fileio import sha256_file

        items = list(images)
        whole: list[dict[str, np.ndarray]] = []
        tiles: list[dict[str, np.ndarray]] = []
        reference, position, grids, sizes = [], [], [], []
        sources, hashes, failed = [], [], []
        for start in range(0, len(items), batch_size):
            decoded = [decode(items[i], self.model_size, name_of(items[i], i)) for i in range(start, min(start + batch_size, len(items)))]
            frames = self.embed_units(decoded, references=True)
            if frames.engine_error is not None:
                raise frames.engine_error
            failed += [InspectionResult(path=d.name, error=e) for d, e in zip(decoded, frames.errors) if e is not None]
            plans = [frames.plans[i] for i in frames.planned]
            if frames.outputs is not None:
                keys = np.array([k for p in plans for k in p.keys])
                tile = keys != GLOBAL
                whole.append({name: value[~tile] for name, value in frames.outputs.items()})
                if self.tiling is not None:
                    tiles.append({name: value[tile] for name, value in frames.outputs.items()})
                    reference.append(np.repeat(np.arange(len(sources), len(sources) + len(plans)),
                                               [len(p) for p in plans])[tile])
                    position.append(keys[tile])
                    grids += [p.grid for p in plans]
                    sizes += [p.size for p in plans]
            for i in frames.planned:
                name = decoded[i].name
                sources.append(str(Path(name).resolve()) if not name.startswith("array[") else name)
                hashes.append(sha256_file(name) if not name.startswith("array[") else "")
            if progress is not None:
                progress(len(decoded))
        if not sources:
            return None, failed
        cat = {name: np.concatenate([part[name] for part in whole]) for name in whole[0]}
        memory = Memory(
            image_embeddings=cat[IMAGE_EMBEDDING],
            windows={k: cat[window_output_name(k)] for k in self.bundle.spec.scales},
            patch_tokens=cat[PATCH_TOKENS], sources=sources, source_sha256=hashes,
        )
        if self.tiling is not None:
            memory.tiles = TileMemory.from_outputs(
                {name: np.concatenate([part[name] for part in tiles]) for name in tiles[0]}, self.bundle.spec.scales,
                np.concatenate(reference), np.concatenate(position), grids, sizes,
                self.tiling.tile_shape(self.model_size, self.bundle.spec.grid), self.tiling.overlap, hashes)
        return memory, failed

    # ------------------------------------------------------------ tiles and ROI (docs/tiling.md)
    def _load_tile_memory(self) -> TileMemory | None:
        """The tile memory a few-shot tiled run needs, checked against this run's tiling."""
        if self.tiling is None or self.memory is None:
            return None
        register = (f"`winclip-edge register --bundle {self.bundle.root} --product {self.product} "
                    f"--tile {self.tiling.tile} --tile-overlap {self.tiling.overlap} IMAGES...`")
        tiles = load_tile_memory(self.bundle, self.product, self.memory.source_sha256)
        if tiles is None:
            raise BundleError(f"product {self.product!r} has no tile memory for tiled few-shot inspection; "
                              f"register its references with tiling: {register} (or run with --tile off)")
        shape = self.tiling.tile_shape(self.model_size, self.bundle.spec.grid)
        if tiles.tile != shape or (self.tiling.memory == "position" and tiles.overlap != self.tiling.overlap):
            raise BundleError(f"the tile memory of {self.product!r} was registered with tile {list(tiles.tile)}, overlap "
                              f"{tiles.overlap}; this run uses tile {list(shape)}, overlap {self.tiling.overlap}: "
                              f"use those or re-register: {register}")
        if self.tiling.memory == "position" and tiles.position_grid() is None:
            raise BundleError(f"the references of {self.product!r} have different tile grids (frame sizes "
                              f"{sorted(set(tiles.frame_sizes))}): position matching needs one; use --tile-memory pooled")
        return tiles

    def decision_record(self) -> dict:
        """What an image score depends on besides the memory (thresholds store it and are refused when it changes):
        the scoring options, and the tiling and ROI when there are any."""
        record = self.options.decision_record()
        if self.tiling is not None:
            record["tiling"] = {"tile": list(self.tiling.tile_shape(self.model_size, self.bundle.spec.grid)),
                                "overlap": self.tiling.overlap, "global": self.tiling.use_global,
                                "memory": self.tiling.memory,
                                "tile_memory_sha256": self.tile_memory.checksum if self.tile_memory else ""}
        if self.roi is not None:
            record["roi"] = self.roi.identity
        return record

    def plan(self, size: tuple[int, int]) -> FramePlan:
        """The units (whole frame, tiles) to compute for a frame of ``size``; a frame whose tile grid differs from the
        references' under position matching is refused (BundleError)."""
        plan = plan_frame(size, self.tiling, self.model_size, self.bundle.spec.grid, self.roi)
        tiles = self.tile_memory
        if tiles is not None and self.tiling.memory == "position" and plan.grid != tiles.grids[0]:
            raise BundleError(f"this {size[0]}x{size[1]} frame has a {plan.grid[0]}x{plan.grid[1]} tile grid, the "
                              f"references' ({tiles.frame_sizes[0][0]}x{tiles.frame_sizes[0][1]}) a "
                              f"{tiles.grids[0][0]}x{tiles.grids[0][1]} one: position matching needs frames of one size "
                              "(use --tile-memory pooled for mixed sizes)")
        return plan

    def score_frames(self, plans: Sequence[FramePlan], outputs: dict[str, np.ndarray],
                     memory: Memory | None | str = "product", tile_memory: TileMemory | None | str = "product") -> list[UnitScores]:
        """Scores of the units of ``plans`` (``outputs`` rows in plan order), one UnitScores per frame. Whole-frame units
        match ``memory``, tiles ``tile_memory`` (the product's by default) by position or pooled."""
        windows, patches = (self._memory_windows, self._memory_patches) if isinstance(memory, str) else _flat_memory(memory)
        tiles = self.tile_memory if isinstance(tile_memory, str) else tile_memory
        spec = self.bundle.spec

        def score(o: dict, key: int, mask: np.ndarray | None) -> Scores:
            w, p = (windows, patches) if key == GLOBAL else (None, None) if tiles is None else \
                tiles.rows(None if key == POOLED else key)
            return score_batch(o, self.text.t_normal, self.text.t_anomalous, spec.grid, spec.stride, spec.scales,
                               self.options, w, p, token_mask=mask)

        masks = None if self.roi is None else np.concatenate([token_masks(p, spec.grid) for p in plans])
        pooled = tiles is None or self.tiling is None or self.tiling.memory == "pooled"
        units = score_units(outputs, [k for p in plans for k in p.keys], masks, score, pooled)
        ends = np.cumsum([len(p) for p in plans])
        return [UnitScores(units.image_score[e - len(p):e], units.token_map[e - len(p):e], units.zero_shot_score[e - len(p):e])
                for p, e in zip(plans, ends)]

    def _reference_plan(self, size: tuple[int, int]) -> FramePlan:
        """The units a reference stores: the whole frame, and every tile when tiled; ROI or not, so that the
        references serve any ROI (and the global pass on or off)."""
        if self.tiling is None:
            return plan_frame(size, None, self.model_size, self.bundle.spec.grid)
        return reference_plan(size, self.tiling, self.model_size, self.bundle.spec.grid)

    def leave_one_out_scores(self) -> list[float]:
        """Each reference frame scored against the others from the stored embeddings (no engine call), through the
        same units, ROI and maximum as an inspected frame. Whole-frame references are one unit each; tiled ones are
        planned from the frame sizes the tile memory keeps (whole-frame memories keep none: no ROI then)."""
        memory, tiles = self.memory, self.tile_memory
        if tiles is None and self.roi is not None:
            raise RoiError("leave-one-out scoring with an ROI needs the references' frame sizes, which only a tile "
                           "memory keeps")
        scores = []
        for r in range(memory.size):
            whole = {IMAGE_EMBEDDING: memory.image_embeddings[r:r + 1], PATCH_TOKENS: memory.patch_tokens[r:r + 1],
                     **{window_output_name(k): v[r:r + 1] for k, v in memory.windows.items()}}
            if tiles is None:
                plan, outputs = plan_frame(self.model_size, None, self.model_size, self.bundle.spec.grid), whole
            else:
                plan = self.plan(tiles.frame_sizes[r])
                outputs = tiles.outputs_of(r, [k for k in plan.keys if k != GLOBAL])
                if GLOBAL in plan.keys:  # plans list the whole frame first
                    outputs = {name: np.concatenate([whole[name], value]) for name, value in outputs.items()}
            units = self.score_frames([plan], outputs, memory.without(r), None if tiles is None else tiles.without(r))[0]
            scores.append(frame_score(units)[0])
        return scores

    def close(self) -> None:
        self.engine.close()
