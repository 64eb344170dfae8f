"""Window geometry on the ViT token grid (docs/method.md §4.1).

A window of scale ``k`` is a ``k x k`` block of patch tokens. Windows are laid with a stride;
the last window of every row/column is always included so that every token is covered by at
least one window (with stride 1 this changes nothing; with stride 2 on a 15x15 grid it adds the
window that covers the last row/column, which plain ``range`` would drop).

Windows are ordered row-major over their origins, tokens inside a window row-major: the same
order the export graph uses and the scoring functions assume.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import WinclipError


class GeometryError(WinclipError, ValueError):
    """A window scale or stride that does not fit the token grid."""


Grid = Tuple[int, int]  # (h, w) tokens (typing.Tuple: the runtime also runs on JetPack 5's Python 3.8)


def window_starts(length: int, k: int, stride: int) -> np.ndarray:
    """Origins along one axis: 0, stride, 2*stride, ... and always ``length - k``."""
    if not 1 <= k <= length:
        raise GeometryError(f"window scale k={k} must be in [1, {length}] for a grid side of {length}")
    if not 1 <= stride <= k:
        raise GeometryError(f"window stride must be in [1, k={k}] so that every token is covered, got {stride}")
    starts = list(range(0, length - k + 1, stride))
    if starts[-1] != length - k:
        starts.append(length - k)
    return np.asarray(starts, dtype=np.int64)


def window_layout(grid: Grid, k: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column origins of the windows of scale ``k``: the window grid is their outer product."""
    h, w = grid
    return window_starts(h, k, stride), window_starts(w, k, stride)


def window_count(grid: Grid, k: int, stride: int) -> int:
    rows, cols = window_layout(grid, k, stride)
    return len(rows) * len(cols)


def window_token_index(grid: Grid, k: int, stride: int) -> np.ndarray:
    """Flat patch-token indices (row-major, 0-based, CLS excluded) of every window: ``[W_k, k*k]``."""
    h, w = grid
    rows, cols = window_layout(grid, k, stride)
    dr, dc = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")  # [k, k]
    r = rows[:, None, None, None] + dr[None, None]  # [nr, 1, k, k]
    c = cols[None, :, None, None] + dc[None, None]  # [1, nc, k, k]
    return (r * w + c).reshape(len(rows) * len(cols), k * k)


def window_cover_mask(grid: Grid, k: int, stride: int) -> np.ndarray:
    """Boolean ``[W_k, h*w]``: which tokens each window covers. For tests and small grids only."""
    index = window_token_index(grid, k, stride)
    mask = np.zeros((index.shape[0], grid[0] * grid[1]), dtype=bool)
    np.put_along_axis(mask, index, True, axis=1)
    return mask
