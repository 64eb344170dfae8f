"""Regions of interest (docs/tiling.md): what is inspected and what is ignored (fixtures, conveyor, background).

An ROI is a mask image (white = inspect, black = ignore; any size, scaled to each frame) or a rectangle in
frame pixels. A product's ROI is stored beside its other files (``roi.json`` + ``roi.png``) and checked on
load. Inspection zeroes the map outside the ROI before the image score's maximum, and does not compute
tiles that lie fully outside it.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple

import cv2
import numpy as np

from ..bundle import Bundle, json_with_checksum, read_checked_json
from ..errors import WinclipError
from ..fileio import atomic_write_bytes, atomic_write_json, sha256_file

ROI_FILE = "roi.json"
ROI_MASK = "roi.png"
Rect = Tuple[int, int, int, int]  # x, y, width, height in frame pixels
OUTLINE_BGR = (0, 255, 255)  # the ROI's outline on overlays (yellow)


class RoiError(WinclipError, ValueError):
    """An ROI that cannot be used (unreadable or empty mask, bad rectangle, damaged file)."""


@dataclass(frozen=True)
class Roi:
    """A mask (uint8 0/255, any size) or a rectangle; ``identity`` is what thresholds record."""

    mask: np.ndarray | None = None
    rect: Rect | None = None
    source: str = ""  # where it came from (file path or the rectangle's text)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if (self.mask is None) == (self.rect is None):
            raise RoiError("an ROI is a mask or a rectangle")

    @property
    def identity(self) -> dict:
        if self.rect is not None:
            return {"rect": list(self.rect)}
        return {"mask_sha256": _mask_digest(self.mask)}

    def for_frame(self, size: tuple[int, int]) -> np.ndarray:
        """bool ``[H, W]``: True where a frame of ``size = (H, W)`` is inspected."""
        size = (int(size[0]), int(size[1]))
        if size not in self._cache:
            if len(self._cache) > 8:  # frames of a line have one or a few sizes
                self._cache.clear()
            if self.rect is not None:
                x, y, w, h = self.rect
                inside = np.zeros(size, bool)
                inside[max(0, y):max(0, y + h), max(0, x):max(0, x + w)] = True
            else:
                inside = cv2.resize(self.mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 127
            inside.setflags(write=False)
            self._cache[size] = inside
        return self._cache[size]


def _mask_digest(mask: np.ndarray) -> str:
    import hashlib

    digest = hashlib.sha256(f"{mask.shape}".encode())
    digest.update(np.ascontiguousarray(mask).tobytes())
    return digest.hexdigest()


def parse_rect(text: str) -> Rect:
    """``x,y,w,h`` (pixels) -> Rect."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts):
        raise RoiError(f"an ROI rectangle is x,y,w,h in pixels (e.g. 100,80,1800,1600), got {text!r}")
    x, y, w, h = (int(p) for p in parts)
    if w < 1 or h < 1 or x < 0 or y < 0:
        raise RoiError(f"ROI rectangle {text!r}: x, y must be >= 0 and w, h >= 1")
    return x, y, w, h


def mask_from_array(image: np.ndarray, source: str = "array") -> Roi:
    """A mask ROI from a grey or colour uint8 image: pixels >= 128 (grey level) are inspected."""
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    if image.ndim != 2 or image.size == 0:
        raise RoiError(f"{source}: expected a 2-D mask image, got shape {image.shape}")
    binary = np.where(image >= 128, 255, 0).astype(np.uint8)
    if not binary.any():
        raise RoiError(f"{source}: the ROI mask is all black (nothing would be inspected); white = inspect")
    return Roi(mask=binary, source=source)


def read_mask(path: str | Path) -> Roi:
    """A mask ROI from an image file (PNG, BMP, JPEG ...)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise RoiError(f"{path}: cannot read the ROI mask ({err.strerror or err})") from None
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        raise RoiError(f"{path}: expected an image (white = inspect, black = ignore); cannot decode it")
    return mask_from_array(image, str(path))


def parse_roi(text: str) -> Roi:
    """``--roi`` value: ``x,y,w,h`` or the path of a mask image."""
    if "," in text and not Path(text).exists():
        return Roi(rect=parse_rect(text), source=text)
    return read_mask(text)


# ---------------------------------------------------------------- the product's ROI
def save_roi(bundle: Bundle, product: str, roi: Roi) -> Path:
    """Store ``roi`` with the product: ``roi.png`` (a mask) and ``roi.json`` (kind, checksum, source)."""
    bundle.check_product(product)
    folder = bundle.product_dir(product)
    body = {"weights_id": bundle.manifest.weights_id, "source": roi.source,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if roi.rect is not None:
        body["rect"] = list(roi.rect)
    else:
        ok, png = cv2.imencode(".png", roi.mask)
        if not ok:
            raise RoiError("PNG encoding of the ROI mask failed")
        atomic_write_bytes(folder / ROI_MASK, png.tobytes())
        body.update(mask=ROI_MASK, mask_sha256=sha256_file(folder / ROI_MASK), mask_size=list(roi.mask.shape))
    atomic_write_json(folder / ROI_FILE, json_with_checksum(body))  # written last: it names the mask's checksum
    if roi.rect is not None:
        (folder / ROI_MASK).unlink(missing_ok=True)  # a previous mask, no longer named by roi.json
    return folder / ROI_FILE


def load_roi(bundle: Bundle, product: str) -> Roi | None:
    """The product's ROI, or None when it has none; a damaged or mismatched file is refused."""
    bundle.check_product(product)
    folder = bundle.product_dir(product)
    path = folder / ROI_FILE
    if not path.is_file():
        return None
    remedy = f"set it again with `winclip-edge roi --bundle {bundle.root} --product {product} MASK.png` (or --clear)"
    obj = read_checked_json(path, remedy)
    if "rect" in obj:
        return Roi(rect=tuple(int(v) for v in obj["rect"]), source=obj.get("source", ""))
    mask_path = folder / obj["mask"]
    if not mask_path.is_file() or sha256_file(mask_path) != obj["mask_sha256"]:
        raise RoiError(f"{mask_path} is missing or does not match its checksum in {path}; {remedy}")
    roi = read_mask(mask_path)
    return Roi(mask=roi.mask, source=obj.get("source", ""))


def clear_roi(bundle: Bundle, product: str) -> bool:
    """Remove the product's ROI; True when there was one."""
    bundle.check_product(product)
    folder = bundle.product_dir(product)
    had = (folder / ROI_FILE).is_file()
    (folder / ROI_FILE).unlink(missing_ok=True)  # first: without it the mask is not used
    (folder / ROI_MASK).unlink(missing_ok=True)
    return had


# ---------------------------------------------------------------- use in inspection
def token_mask(inside: np.ndarray, box: tuple[int, int, int, int], grid: tuple[int, int]) -> np.ndarray:
    """bool ``[h, w]``: token cells of the unit at ``box`` (top, left, height, width) that hold any ROI pixel."""
    t, l, h, w = box
    crop = inside[t:t + h, l:l + w].astype(np.float32)
    return cv2.resize(crop, (grid[1], grid[0]), interpolation=cv2.INTER_AREA) > 0


def draw_outline(bgr: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``bgr`` with the ROI's outline drawn on it (``inside`` at the picture's size)."""
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(inside.shape) / 400))
    return cv2.drawContours(bgr.copy(), contours, -1, OUTLINE_BGR, thickness, cv2.LINE_AA)
