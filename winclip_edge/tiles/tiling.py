"""Tiled inspection geometry (docs/tiling.md): tile boxes over a high-resolution frame, the ``auto`` tile
size, and the smooth-window stitching of overlapping tile maps at the original resolution.

Pure functions of sizes and arrays: no engine, no files. Boxes are ``(top, left, height, width)`` in
source pixels; a frame's tiles form a ``rows x cols`` grid numbered row-major (the *position* that
the per-position few-shot memory is keyed by).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence, Tuple, Union

import numpy as np

from ..errors import WinclipError
from ..heatmap import upsample_map

Box = Tuple[int, int, int, int]  # top, left, height, width
TileSize = Union[int, str, None]  # source pixels, "auto", or None (whole frame only)
AUTO = "auto"
MEMORY_MODES = ("position", "pooled")
DEFAULT_OVERLAP = 0.25
MAX_OVERLAP = 0.9  # beyond this the tile count explodes for little gain
DEFAULT_MIN_DEFECT = 32  # source pixels: the smallest defect `auto` keeps visible (one ViT patch)


class TilingError(WinclipError, ValueError):
    """A tiling setting that cannot apply (bad size or overlap, unknown memory mode)."""


@dataclass(frozen=True)
class TilingConfig:
    """A product's tiling setting (stored in its ``tiling.json``, overridable by flags)."""

    tile: TileSize = None  # tile height in source pixels, "auto", or None = whole-frame inspection only
    overlap: float = DEFAULT_OVERLAP  # minimum fraction of a tile shared with its neighbour
    use_global: bool = True  # also run the whole frame (large defects, context); image score = max over all
    memory: str = "position"  # few-shot tile memory: "position" (fixtured parts) or "pooled" (textures)
    min_defect: int = DEFAULT_MIN_DEFECT  # source pixels; used by tile="auto" only

    def __post_init__(self):
        if self.tile is not None and self.tile != AUTO and (isinstance(self.tile, bool) or not isinstance(self.tile, int)
                                                             or self.tile < 1):
            raise TilingError(f"tile must be a size in pixels >= 1, {AUTO!r} or None, got {self.tile!r}")
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise TilingError(f"tile overlap must be in [0, {MAX_OVERLAP}], got {self.overlap}")
        if self.memory not in MEMORY_MODES:
            raise TilingError(f"tile memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.min_defect < 1:
            raise TilingError(f"min defect size must be >= 1 pixel, got {self.min_defect}")

    @property
    def enabled(self) -> bool:
        return self.tile is not None

    def tile_shape(self, model_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of a tile in source pixels; the width follows the model input's aspect ratio."""
        if self.tile is None:
            raise TilingError("tiling is off")
        height = auto_tile_size(self.min_defect, model_size, grid) if self.tile == AUTO else int(self.tile)
        return height, max(1, round(height * model_size[1] / model_size[0]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict) -> "TilingConfig":
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)

    def with_overrides(self, **overrides) -> "TilingConfig":
        """This setting with the given (non-None) fields replaced: flags over the product's file."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def parse_tile(text: str) -> TileSize:
    """``--tile`` value: a size in pixels, ``auto``, or ``off``."""
    value = text.strip().lower()
    if value == AUTO:
        return AUTO
    if value in ("off", "none", "0"):
        return None
    if not value.isdigit():
        raise TilingError(f"--tile expects a size in pixels, {AUTO!r} or 'off', got {text!r}")
    return int(value)


def auto_tile_size(min_defect: int, model_size: tuple[int, int], grid: tuple[int, int]) -> int:
    """The largest tile (height, source pixels) on which a defect of ``min_defect`` pixels still spans one
    ViT patch after the tile is resized to the model input: ``min_defect * model_height / patch_height``
    (32 px on ViT-B-16-plus-240: 32 * 240 / 16 = 480)."""
    patch = model_size[0] / grid[0]
    return max(1, int(math.floor(min_defect * model_size[0] / patch)))


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis: the fewest tiles of ``tile`` pixels whose neighbours share at least
    ``overlap * tile`` pixels, spread evenly so the first starts at 0 and the last ends at ``length``."""
    if length <= tile:
        return [0]
    step = max(1, int(math.floor(tile * (1.0 - overlap))))
    n = math.ceil((length - tile) / step) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def tile_boxes(frame: tuple[int, int], tile: tuple[int, int], overlap: float) -> tuple[list[Box], tuple[int, int]]:
    """Boxes covering every pixel of a ``frame = (H, W)`` and the grid shape (rows, cols), row-major.

    A frame smaller than a tile along an axis gets one tile spanning that axis (clipped to the frame)."""
    (fh, fw), (th, tw) = frame, tile
    if fh < 1 or fw < 1 or th < 1 or tw < 1:
        raise TilingError(f"frame {frame} and tile {tile} must be at least 1x1")
    tops, lefts = axis_starts(fh, th, overlap), axis_starts(fw, tw, overlap)
    boxes = [(t, l, min(th, fh), min(tw, fw)) for t in tops for l in lefts]
    return boxes, (len(tops), len(lefts))


def is_whole_frame(boxes: Sequence[Box], frame: tuple[int, int]) -> bool:
    """True when the layout is one tile equal to the frame (then it is the global pass itself)."""
    return len(boxes) == 1 and tuple(boxes[0]) == (0, 0, frame[0], frame[1])


def smooth_window(height: int, width: int) -> np.ndarray:
    """Stitching weights of one tile: a separable Hann window sampled at pixel centres, so it is largest
    in the tile's centre (where its windows saw the most context) and small but never zero at its edges."""
    def hann(n: int) -> np.ndarray:
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * (np.arange(n) + 0.5) / n)

    return np.outer(hann(height), hann(width))


def stitch(tile_maps: Sequence[np.ndarray], boxes: Sequence[Box], frame: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Token maps of tiles -> one float32 ``[H, W]`` map: each tile's map is resized (bilinear) to its box, and
    overlaps are averaged with :func:`smooth_window` weights. Also returns the bool coverage (pixels of no tile: 0).

    A pixel covered by one tile gets exactly that tile's value, so a single whole-frame tile equals the
    untiled map."""
    total = np.zeros(frame, np.float64)
    weight = np.zeros(frame, np.float64)
    for token_map, (t, l, h, w) in zip(tile_maps, boxes):
        weights = smooth_window(h, w)
        total[t:t + h, l:l + w] += weights * upsample_map(token_map, (h, w))
        weight[t:t + h, l:l + w] += weights
    covered = weight > 0
    out = np.zeros(frame, np.float32)
    out[covered] = (total[covered] / weight[covered]).astype(np.float32)
    return out, covered
