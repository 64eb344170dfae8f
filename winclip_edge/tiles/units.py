"""Tiled inspection of one frame (docs/tiling.md): which units (the whole frame and the tiles) to compute,
their model inputs, and how their scores and maps become the frame's.

A *unit* is the global pass (the whole frame, key ``GLOBAL``) or one tile (key = its grid position).
The image score is the maximum over the units' image scores (WinCLIP's image score is a maximum);
the map is the tiles' maps stitched at the original resolution, and where a global pass ran, the
pixel-wise maximum of that and the global map. With an ROI, the map is zeroed outside it (at the
token grid before each unit's maximum, and at full resolution), and tiles fully outside it are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..heatmap import smooth, upsample_map
from ..preprocess import resize_to_model
from .roi import Roi, RoiError, token_mask
from ..scoring import Scores
from .tiling import Box, TilingConfig, is_whole_frame, stitch, tile_boxes

GLOBAL = -1  # the unit key of the whole-frame pass
POOLED = -2  # the key of every tile when tile matching is pooled

# score(outputs of some units, their key, their token masks or None) -> Scores; the key (GLOBAL, POOLED or a
# tile position) picks the memory they are matched against.
ScoreFn = Callable[[dict, int, "np.ndarray | None"], Scores]


@dataclass(frozen=True)
class FramePlan:
    """The units of one frame: ``boxes[i]`` is unit i's region, ``keys[i]`` GLOBAL or its tile position."""

    size: tuple[int, int]
    boxes: tuple[Box, ...]
    keys: tuple[int, ...]
    grid: tuple[int, int]  # the tile grid (rows, cols); (1, 1) without tiling
    inside: np.ndarray | None  # bool [H, W] ROI, None = everything is inspected

    def __len__(self) -> int:
        return len(self.boxes)


def plan_frame(size: tuple[int, int], tiling: TilingConfig | None, model_size: tuple[int, int],
               grid: tuple[int, int], roi: Roi | None = None) -> FramePlan:
    """Units to compute for a frame of ``size = (H, W)``."""
    size = (int(size[0]), int(size[1]))
    inside = roi.for_frame(size) if roi is not None else None
    if inside is not None and not inside.any():
        raise RoiError(f"the ROI ({roi.source}) does not overlap this {size[0]}x{size[1]} frame")
    whole = (0, 0, size[0], size[1])
    if tiling is None or not tiling.enabled:
        return FramePlan(size, (whole,), (GLOBAL,), (1, 1), inside)
    boxes, tile_grid = tile_boxes(size, tiling.tile_shape(model_size, grid), tiling.overlap)
    units = [(whole, GLOBAL)] if tiling.use_global else []
    if not (tiling.use_global and is_whole_frame(boxes, size)):  # a single whole-frame tile is the global pass
        units += [(b, p) for p, b in enumerate(boxes)
                  if inside is None or inside[b[0]:b[0] + b[2], b[1]:b[1] + b[3]].any()]
    return FramePlan(size, tuple(b for b, _ in units), tuple(k for _, k in units), tile_grid, inside)


def reference_plan(size: tuple[int, int], tiling: TilingConfig, model_size: tuple[int, int],
                   grid: tuple[int, int]) -> FramePlan:
    """Units of a reference frame: the whole frame (memory.npz) and every tile (the tile memory), ROI or not, so
    that the references serve any ROI and the global pass on or off."""
    size = (int(size[0]), int(size[1]))
    boxes, tile_grid = tile_boxes(size, tiling.tile_shape(model_size, grid), tiling.overlap)
    return FramePlan(size, ((0, 0, size[0], size[1]), *boxes), (GLOBAL, *range(len(boxes))), tile_grid, None)


def unit_inputs(image: np.ndarray, plan: FramePlan, model_size: tuple[int, int],
                skip_global: bool = False) -> list[np.ndarray]:
    """Model inputs of the plan's units (each region resized like a whole frame: preprocess.resize_to_model);
    ``skip_global`` leaves the whole frame out (the decoder already made it)."""
    return [resize_to_model(image[t:t + h, l:l + w], model_size) for (t, l, h, w), key in zip(plan.boxes, plan.keys)
            if not (skip_global and key == GLOBAL)]


def token_masks(plan: FramePlan, grid: tuple[int, int]) -> np.ndarray | None:
    """bool ``[U, h, w]``: ROI token cells of each unit, or None without an ROI."""
    if plan.inside is None:
        return None
    return np.stack([token_mask(plan.inside, box, grid) for box in plan.boxes])


@dataclass(frozen=True)
class UnitScores:
    image_score: np.ndarray  # [U]
    token_map: np.ndarray  # [U, h, w]
    zero_shot_score: np.ndarray  # [U]


def score_units(outputs: dict[str, np.ndarray], keys: Sequence[int], masks: np.ndarray | None,
                score: ScoreFn, pooled: bool) -> UnitScores:
    """Score the units of a batch (rows of ``outputs``), one scoring call per memory they use: the global
    units together, and the tiles per position (``pooled=False``) or all together (``pooled=True``)."""
    keys = np.asarray(keys)
    groups = np.where(keys == GLOBAL, GLOBAL, POOLED if pooled else keys)
    n = len(keys)
    image, zero_shot, maps = np.zeros(n, np.float32), np.zeros(n, np.float32), None
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        if len(rows) == n:  # one memory for the batch (whole frames): its outputs as they are, no copy
            s = score(outputs, int(group), masks)
        else:
            s = score({name: v[rows] for name, v in outputs.items()}, int(group), None if masks is None else masks[rows])
        if maps is None:
            maps = np.zeros((n, *s.token_map.shape[1:]), np.float32)
        image[rows], zero_shot[rows], maps[rows] = s.image_score, s.zero_shot_score, s.token_map
    return UnitScores(image, maps, zero_shot)


def frame_score(units: UnitScores) -> tuple[float, float]:
    """(image score, zero-shot score) of a frame: the maxima over its units."""
    return float(units.image_score.max()), float(units.zero_shot_score.max())


def frame_map(plan: FramePlan, token_maps: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """float32 ``[H, W]`` map of a frame from its units' token maps (in plan order)."""
    keys = np.asarray(plan.keys)
    tiles = [i for i, k in enumerate(keys) if k != GLOBAL]
    out = None
    if tiles:
        out, covered = stitch([token_maps[i] for i in tiles], [plan.boxes[i] for i in tiles], plan.size)
    for i in np.flatnonzero(keys == GLOBAL):
        full = upsample_map(token_maps[i], plan.size)
        out = full if out is None else np.where(covered, np.maximum(out, full), full)
    out = smooth(out, sigma)
    if plan.inside is not None:
        out = np.where(plan.inside, out, 0.0).astype(np.float32)
    return out
