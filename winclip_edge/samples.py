"""Images as the model sees them: one decoder for every input (inspected frames, references, calibration and
fidelity images) and one loader of model-input batches, so that int8 calibration, tune and bench measure the
frames the runtime would run, through the runtime's own decode + resize (preprocess.py).

The loader takes given files, else the first fallback with files: the product's registered references (their
files still on disk), the normal images of the textile data set (conformal-clip-data), or synthetic frames.
Unreadable files are skipped and reported, never fatal: the caller decides what an empty result means.
"""
from __future__ import annotations

import itertools
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np

from .bundle import Bundle
from .preprocess import ImageError, as_rgb, read_image, resize_to_model

ImageInput = Union[str, os.PathLike, np.ndarray]
REFERENCES, TEXTILE, SYNTHETIC = "references", "textile", "synthetic"  # the loader's fallbacks
TEXTILE_NORMAL = "nominal"  # the textile data set's folder of normal images
SYNTHETIC_TEXTURE_CELL = 8  # pixels per random value of a synthetic frame's texture (smooth, PNG-compressible)


# ---------------------------------------------------------------- decoding
@dataclass
class Decoded:
    name: str
    image: np.ndarray | None  # RGB at original size
    model_input: np.ndarray | None  # RGB at model size
    decode_ms: float
    error: str | None


def name_of(item: ImageInput, index: int) -> str:
    return f"array[{index}]" if isinstance(item, np.ndarray) else str(item)


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


def iter_decoded(items: Iterable[ImageInput], size: tuple[int, int], batch_size: int) -> Iterator[list[Decoded]]:
    """Decoded batches of ``items``; the next batch is decoded on a worker thread while the caller uses this one.

    ``items`` may be endless (a camera generator): it is read one batch ahead, never further."""
    numbered = enumerate(items)

    def load() -> list[Decoded]:
        return [decode(item, size, name_of(item, i)) for i, item in itertools.islice(numbered, batch_size)]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="winclip-decode") as pool:
        pending = pool.submit(load)
        while True:
            decoded = pending.result()
            if not decoded:
                return
            pending = pool.submit(load)
            yield decoded


# ---------------------------------------------------------------- model-input batches
@dataclass(frozen=True)
class ModelInputs:
    """What the loader read: the images and where they came from."""

    images: np.ndarray  # uint8 [N, H, W, 3] at the model size (N = 0 when nothing was readable)
    source: str  # "given images", "the product's registered reference images", ...
    tried: int  # files read or skipped (the loader stops at ``limit`` images)
    skipped: tuple[tuple[str, str], ...] = ()  # (file, why) of every unreadable file, skipped

    @property
    def described(self) -> str:
        return f"{len(self.images)} {self.source}"


def reference_images(bundle: Bundle, product: str | None = None) -> list[str]:
    """Files of the registered references of ``product`` (every product when None) that are still on disk."""
    from .products import load_memory

    paths: list[str] = []
    for name in [product] if product else bundle.products():
        memory = load_memory(bundle, name)
        paths += [s for s in (memory.sources if memory else []) if s and Path(s).is_file() and s not in paths]
    return paths


def synthetic_images(count: int, size: tuple[int, int], folder: str | os.PathLike, seed: int = 0) -> list[str]:
    """Write ``count`` smooth random-texture RGB PNGs of ``size`` (H, W) into ``folder``; returns their paths."""
    import cv2

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    h, w = size
    for i in range(count):
        cells = rng.integers(0, 256, (max(1, h // SYNTHETIC_TEXTURE_CELL), max(1, w // SYNTHETIC_TEXTURE_CELL), 3),
                             dtype=np.uint8)
        image = cv2.resize(cells, (w, h), interpolation=cv2.INTER_CUBIC)
        path = folder / f"frame_{i:04d}.png"
        if not cv2.imwrite(str(path), image):
            raise OSError(f"cannot write the synthetic image {path}")
        paths.append(str(path))
    return paths


def _read(paths: Sequence[str], size: tuple[int, int], limit: int | None, source: str) -> ModelInputs:
    frames, skipped, tried = [], [], 0
    for path in paths:
        if limit is not None and len(frames) >= limit:
            break
        tried += 1
        d = decode(path, size, str(path))
        if d.error is not None:
            skipped.append((str(path), d.error))
        else:
            frames.append(d.model_input)
    images = np.stack(frames) if frames else np.zeros((0, *size, 3), np.uint8)
    return ModelInputs(images, source, tried, tuple(skipped))


def load_model_inputs(size: tuple[int, int], paths: Sequence[str | os.PathLike] = (), *, bundle: Bundle | None = None,
                      product: str | None = None, fallbacks: Sequence[str] = (), limit: int | None = None) -> ModelInputs:
    """The first ``limit`` readable images (all when None) of ``paths``, as uint8 model inputs of ``size = (H, W)``;
    without paths, of the first of ``fallbacks`` that has files: REFERENCES (``product``'s registered references
    in ``bundle``, every product's when None), TEXTILE (the textile normals) or SYNTHETIC (``limit`` generated
    frames). A source with files is used even when none of them is readable (the result is then empty)."""
    if paths:
        return _read([str(p) for p in paths], size, limit, "given images")
    for fallback in fallbacks:
        if fallback == REFERENCES:
            if bundle is None:
                raise ValueError("the references fallback needs the bundle")
            found = reference_images(bundle, product)
            if found:
                return _read(found, size, limit, "the product's registered reference images")
        elif fallback == TEXTILE:
            from .evaluation.datasets import textile_root

            root = textile_root() / TEXTILE_NORMAL
            return _read(sorted(str(p) for p in root.iterdir() if p.is_file()), size, limit,
                         f"normal images of the textile data set ({root})")
        elif fallback == SYNTHETIC:
            if limit is None:
                raise ValueError("synthetic frames need a count (limit)")
            why = " (no reference images on disk)" if REFERENCES in fallbacks else ""
            with tempfile.TemporaryDirectory(prefix="winclip-frames-") as tmp:
                return _read(synthetic_images(limit, size, tmp), size, limit, f"synthetic frames{why}")
        else:
            raise ValueError(f"unknown fallback {fallback!r}; choose from {(REFERENCES, TEXTILE, SYNTHETIC)}")
    return ModelInputs(np.zeros((0, *size, 3), np.uint8), "no images", 0)


__all__ = ["Decoded", "ImageInput", "ModelInputs", "REFERENCES", "SYNTHETIC", "TEXTILE", "decode", "iter_decoded",
           "load_model_inputs", "name_of", "reference_images", "synthetic_images"]
