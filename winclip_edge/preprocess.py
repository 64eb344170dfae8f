"""Pre-processing (WINCLIP.md section 1), OpenCV only, shared by the runtime, the export verification
and the evaluation so that every path scores the same tensor.

Decode -> RGB uint8 -> resize the *whole* frame to the model input (no centre crop: the map must cover
every pixel). Normalisation is inside the graph (contract.py).

Conversions (documented in the README): EXIF orientation is applied; grayscale is replicated to RGB;
16-bit images are scaled to 8 bit; an alpha channel is dropped (the colour channels are kept as
stored); palette images are expanded to RGB.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

# cv2.INTER_AREA averages the source pixels (anti-aliased) when shrinking; bilinear when enlarging.
SHRINK_INTERPOLATION = cv2.INTER_AREA
ENLARGE_INTERPOLATION = cv2.INTER_LINEAR


class ImageError(ValueError):
    """An input cannot be turned into an RGB image; the message names the file and the reason."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a file into RGB uint8 ``[H, W, 3]`` with its EXIF orientation applied."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work everywhere
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from None
    if data.size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)  # applies EXIF orientation; 16-bit -> 8-bit; gray -> 3 channels
    if image is None:
        raise ImageError(f"{path}: not a decodable image (unknown format, truncated or damaged)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb(image: np.ndarray, name: str = "array") -> np.ndarray:
    """Validate an in-memory image (RGB ``[H, W, 3]`` or gray ``[H, W]``, uint8) and return RGB uint8."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"{name}: expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8, got {image.dtype}")
    return image


def resize_to_model(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Whole-frame resize of RGB uint8 ``[H, W, 3]`` to the model input ``size = (H, W)``."""
    h, w = size
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    shrinking = image.shape[0] * image.shape[1] >= h * w
    interpolation = SHRINK_INTERPOLATION if shrinking else ENLARGE_INTERPOLATION
    return cv2.resize(image, (w, h), interpolation=interpolation)  # cv2 takes (width, height)
