"""Output maps (docs/method.md §8): token map -> original image size, optional smoothing, overlays."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import cv2
import numpy as np

from .fileio import atomic_write_bytes
from .tiles.roi import draw_outline

OVERLAY_ALPHA = 0.45  # heatmap weight over the image
BANNER_HEIGHT_FRACTION = 0.06  # nominal text line height as a fraction of the image height (at least 18 px)
BANNER_FONT = cv2.FONT_HERSHEY_SIMPLEX
BANNER_MARGIN = 4  # pixels around the text, and the gap between lines
MIN_READABLE_SCALE = 0.4  # font scale (~9 px capitals) below which the banner wraps rather than shrinks
WHITE = (255, 255, 255)
SEPARATOR = "  "  # between the parts of a line
BannerPart = Union[str, Tuple[str, Tuple[int, int, int]]]  # text, or (text, BGR colour)


def upsample_map(token_map: np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """Bilinear resize of a ``[h, w]`` token map to ``size = (H, W)``; Gaussian blur (sigma in output pixels) if > 0."""
    h, w = size
    return smooth(cv2.resize(token_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), sigma)


def smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` in pixels (reflecting borders); 0 = unchanged."""
    if sigma <= 0:
        return anomaly_map
    return cv2.GaussianBlur(anomaly_map, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, label: str | Sequence[BannerPart],
            value_range: tuple[float, float], roi: np.ndarray | None = None) -> np.ndarray:
    """A BGR picture: a banner with ``label`` (fitted to the image width: :func:`banner_layout`), above the map (scaled from
    ``value_range`` to the JET colours) over the image; ``roi`` (bool, image size) is outlined."""
    lo, hi = value_range
    scaled = np.clip((anomaly_map - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(bgr, 1.0 - OVERLAY_ALPHA, colours, OVERLAY_ALPHA, 0.0)
    if roi is not None:
        blended = draw_outline(blended, roi)
    parts = [label] if isinstance(label, str) else list(label)
    return np.vstack([draw_banner(parts, blended.shape[1], blended.shape[0]), blended])


@dataclass(frozen=True)
class BannerLayout:
    lines: tuple[tuple[tuple[str, tuple[int, int, int]], ...], ...]  # per line: (text, colour) runs
    scale: float
    thickness: int
    line_height: int  # pixels from one line's top to the next's
    ascent: int  # pixels from a line's top to its baseline
    height: int  # the whole banner


def _thickness(scale: float) -> int:
    return max(1, int(scale * 2))


def _width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, BANNER_FONT, scale, _thickness(scale))[0][0]


def _line_text(runs) -> str:
    return SEPARATOR.join(text for text, _ in runs)


def _wrap(runs, scale: float, available: int):
    """Greedy lines of ``runs`` at ``scale``; a run too wide for a line alone is split at its spaces. None: some
    word is wider than ``available`` at this scale."""
    pieces = []
    for text, colour in runs:
        pieces += [(text, colour)] if _width(text, scale) <= available else [(w, colour) for w in text.split()]
    lines: list[list] = []
    for piece in pieces:
        if _width(piece[0], scale) > available:
            return None
        if lines and _width(_line_text([*lines[-1], piece]), scale) <= available:
            lines[-1].append(piece)
        else:
            lines.append([piece])
    return lines


def banner_layout(parts: Sequence[BannerPart], width: int, image_height: int) -> BannerLayout:
    """Fit ``parts`` into ``width`` pixels, measured with ``cv2.getTextSize``: one line at the nominal size
    (BANNER_HEIGHT_FRACTION of the image height) or smaller, down to MIN_READABLE_SCALE; below that, wrapped onto
    more lines at that size; a single word still too wide is drawn smaller until it fits."""
    runs = [(p, WHITE) if isinstance(p, str) else (p[0], tuple(p[1])) for p in parts]
    runs = [(text, colour) for text, colour in runs if text] or [("", WHITE)]
    available = max(1, width - 2 * BANNER_MARGIN)
    scale = max(18, int(round(image_height * BANNER_HEIGHT_FRACTION))) / 30.0
    one_line = _line_text(runs)
    for _ in range(100):  # one line, shrunk to the width (text width is about proportional to the scale)
        wide = _width(one_line, scale)
        if wide <= available:
            break
        scale *= max(0.5, min(0.98, available / wide))
    lines = [runs]
    if scale < MIN_READABLE_SCALE:  # the nominal scale is at least 0.6: this one line would be too small to read
        scale = MIN_READABLE_SCALE
        wrapped = _wrap(runs, scale, available)
        while wrapped is None:  # a word wider than the image even at the readable size
            scale *= 0.9
            wrapped = _wrap(runs, scale, available)
        lines = wrapped
    (_, ascent), descent = cv2.getTextSize("Ag", BANNER_FONT, scale, _thickness(scale))
    line_height = ascent + descent + BANNER_MARGIN
    return BannerLayout(tuple(tuple(line) for line in lines), scale, _thickness(scale), line_height, ascent,
                        BANNER_MARGIN + line_height * len(lines))


def draw_banner(parts: Sequence[BannerPart], width: int, image_height: int) -> np.ndarray:
    """The black banner (BGR) with ``parts`` laid out by :func:`banner_layout`, each part in its colour."""
    layout = banner_layout(parts, width, image_height)
    banner = np.zeros((layout.height, width, 3), np.uint8)
    for i, line in enumerate(layout.lines):
        y = BANNER_MARGIN + i * layout.line_height + layout.ascent
        for j, (text, colour) in enumerate(line):
            x = BANNER_MARGIN + (_width(_line_text(line[:j]) + SEPARATOR, layout.scale) if j else 0)
            cv2.putText(banner, text, (x, y), BANNER_FONT, layout.scale, colour, layout.thickness, cv2.LINE_AA)
    return banner


def write_png(path: str | os.PathLike, bgr: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, data.tobytes())


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())
