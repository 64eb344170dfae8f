"""Output maps (docs/method.md §8): token map -> original image size, optional smoothing, overlays."""
from __future__ import annotations

import os

import cv2
import numpy as np

from .fileio import atomic_write_bytes
from .tiles.roi import draw_outline

OVERLAY_ALPHA = 0.45  # heatmap weight over the image
BANNER_HEIGHT_FRACTION = 0.06  # banner height as a fraction of the image height (at least 18 px)


def upsample_map(token_map: np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """Bilinear resize of a ``[h, w]`` token map to ``size = (H, W)``; Gaussian blur (sigma in output pixels) if > 0."""
    h, w = size
    return smooth(cv2.resize(token_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), sigma)


def smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` in pixels (reflecting borders); 0 = unchanged."""
    if sigma <= 0:
        return anomaly_map
    return cv2.GaussianBlur(anomaly_map, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, label: str, value_range: tuple[float, float],
            roi: np.ndarray | None = None) -> np.ndarray:
    """A BGR picture: the map (scaled from ``value_range`` to the JET colours) over the image, and a banner;
    ``roi`` (bool, image size) is outlined."""
    lo, hi = value_range
    scaled = np.clip((anomaly_map - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(bgr, 1.0 - OVERLAY_ALPHA, colours, OVERLAY_ALPHA, 0.0)
    if roi is not None:
        blended = draw_outline(blended, roi)
    banner_h = max(18, int(round(blended.shape[0] * BANNER_HEIGHT_FRACTION)))
    banner = np.zeros((banner_h, blended.shape[1], 3), np.uint8)
    scale = banner_h / 30.0
    cv2.putText(banner, label, (4, int(banner_h * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                max(1, int(scale * 2)), cv2.LINE_AA)
    return np.vstack([banner, blended])


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
