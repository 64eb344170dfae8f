"""Few-shot registration: normal reference images -> the product's memory (WinCLIP+'s only "training")."""
from __future__ import annotations

from typing import Any, Sequence

from .errors import WinclipError
from .inspector import DEFAULT_BATCH, ImageInput, InspectionResult, Inspector
from .products import TILING, Memory, load_memory, save_memory, save_tiling
from .tiles.memory import load_tile_memory, save_tile_memory
from .tiles.tiling import TilingConfig


class RegistrationError(WinclipError, ValueError):
    """No usable reference image."""


def register(inspector: Inspector, images: Sequence[ImageInput], batch_size: int = DEFAULT_BATCH, append: bool = False,
             progress: Any = None) -> tuple[Memory, list[InspectionResult]]:
    """Embed ``images`` and store them as the memory of the Inspector's product (added to the old one with
    ``append``); returns the memory written and the inputs that could not be read. ``inspector`` should run
    zero-shot (``ScoringOptions(use_memory=False)``) so that a damaged old memory can be replaced. With the Inspector's
    tiling, each reference's tiles are stored too (tile_memory.npz) and the tiling becomes the product's setting."""
    if not images:
        raise RegistrationError("no reference images given")
    memory, failed = inspector.embed_references(images, batch_size, progress=progress)
    if memory is None:
        raise RegistrationError("none of the reference images could be read; memory unchanged")
    bundle, product = inspector.bundle, inspector.product
    if append:
        previous = load_memory(bundle, product)
        if previous is not None:
            tiles = memory.tiles
            if tiles is not None:
                stored = load_tile_memory(bundle, product, previous.source_sha256)
                if stored is None:
                    raise RegistrationError("cannot append tiles: the stored references have no tile memory; "
                                            "register all references again with --tile (without --append)")
                tiles = stored.merged(tiles)
            memory = previous.merged(memory)
            memory.tiles = tiles
    save_memory(bundle, product, memory)
    if memory.tiles is not None:  # after memory.npz: the tile memory names its references
        save_tile_memory(bundle, product, memory.tiles)
        save_tiling(bundle, product, inspector.tiling)
    elif (bundle.product_dir(product) / TILING).is_file():  # registered whole-frame now: the product is no longer tiled
        save_tiling(bundle, product, TilingConfig())
    return memory, failed
