"""A run's tiling / ROI settings over a product's stored ones (docs/tiling.md), as data: the commands' flags and the
``[tiling]`` table of a station file are the same :class:`TilingOverrides`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..bundle import Bundle
from .roi import parse_roi
from .tiling import TilingConfig, TilingError, parse_tile


@dataclass(frozen=True)
class TilingOverrides:
    """What a run changes about a product's tiling and ROI; None / False: the product's own setting."""

    tile: Optional[str] = None  # SIZE | auto | off
    tile_overlap: Optional[float] = None
    no_global: bool = False  # tiles only: skip the whole-frame pass
    tile_memory: Optional[str] = None  # position | pooled
    min_defect: Optional[int] = None  # tile auto: smallest defect to keep visible, px
    roi: Optional[str] = None  # x,y,w,h (frame pixels) or a mask image
    no_roi: bool = False  # ignore the product's ROI

    def __post_init__(self) -> None:
        if self.tile is not None:
            parse_tile(self.tile)  # a bad size is refused where it is written, not when the product loads


def resolve_tiling(bundle: str | os.PathLike | Bundle, product: str, overrides: TilingOverrides) -> tuple:
    """(tiling, roi) for the Inspector: "product" where nothing is overridden, else the product's setting with the
    overrides applied (None = off)."""
    from ..products import load_tiling

    o = overrides
    flags = {"overlap": o.tile_overlap, "use_global": False if o.no_global else None, "memory": o.tile_memory,
             "min_defect": o.min_defect}
    tiling: object = "product"
    if o.tile is not None or any(v is not None for v in flags.values()):
        bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=False)
        stored = load_tiling(bundle, product) or TilingConfig()
        tile = parse_tile(o.tile) if o.tile is not None else stored.tile
        if tile is None and o.tile is None:
            raise TilingError(f"product {product!r} is not tiled: --tile-overlap, --no-global, --tile-memory and "
                              "--min-defect need --tile SIZE|auto")
        tiling = None if tile is None else stored.with_overrides(tile=tile, **flags)
    roi: object = None if o.no_roi else parse_roi(o.roi) if o.roi is not None else "product"
    return tiling, roi
