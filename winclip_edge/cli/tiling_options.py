"""The tiling / ROI flags of the commands that score images, and their typed objects (docs/tiling.md)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..tiles.overrides import TilingOverrides


def add_tiling_options(p: argparse.ArgumentParser, of_product: bool = True) -> None:
    """--tile, --tile-overlap, --no-global, --tile-memory, --min-defect, --roi, --no-roi: override the product's
    stored tiling (register records its flags as the product's setting) and ROI for this run (``of_product=False``:
    eval, where they are the run's setting)."""
    g = p.add_argument_group("tiling and ROI (docs/tiling.md)" + (" (default: the product's setting)" if of_product else ""))
    g.add_argument("--tile", default=None, metavar="SIZE|auto|off",
                   help="inspect in tiles of SIZE source pixels (height; width follows the model's aspect), 'auto' "
                        "(the largest tile on which a --min-defect defect spans one ViT patch) or 'off'")
    g.add_argument("--tile-overlap", type=float, default=None, help="fraction shared by neighbouring tiles (default 0.25)")
    g.add_argument("--no-global", action="store_true", help="tiles only: skip the whole-frame pass")
    g.add_argument("--tile-memory", choices=("position", "pooled"), default=None,
                   help="few-shot tiles: compare with the same position of the references (fixtured parts, default) "
                        "or with any reference tile (textures, unfixtured parts)")
    g.add_argument("--min-defect", type=int, default=None, help="--tile auto: smallest defect to keep visible, px (32)")
    g.add_argument("--roi", default=None, metavar="x,y,w,h|MASK",
                   help="inspect only this rectangle (frame pixels) or mask image (white = inspect)")
    if of_product:
        g.add_argument("--no-roi", action="store_true", help="ignore the product's ROI")


def run_tiling(args: argparse.Namespace) -> tuple:
    """(TilingConfig or None, Roi or None) of the flags alone (eval: no product setting applies)."""
    from ..tiles.roi import parse_roi
    from ..tiles.tiling import TilingConfig, parse_tile

    tile = parse_tile(args.tile) if args.tile is not None else None
    tiling = None if tile is None else TilingConfig(tile=tile).with_overrides(
        overlap=args.tile_overlap, use_global=False if args.no_global else None, memory=args.tile_memory,
        min_defect=args.min_defect)
    return tiling, parse_roi(args.roi) if args.roi is not None else None


def tiling_overrides(args: argparse.Namespace) -> "TilingOverrides":
    """The TilingOverrides of the flags of :func:`add_tiling_options`."""
    from ..tiles.overrides import TilingOverrides

    return TilingOverrides(tile=args.tile, tile_overlap=args.tile_overlap, no_global=args.no_global,
                           tile_memory=args.tile_memory, min_defect=args.min_defect, roi=args.roi,
                           no_roi=getattr(args, "no_roi", False))


def tiling_and_roi(args: argparse.Namespace, bundle: Any) -> tuple:
    """(tiling, roi) for the Inspector: "product" where no flag was given, else the product's setting (read from
    ``bundle``, the command's one opened Bundle) with the flags applied (None = off)."""
    from ..tiles.overrides import resolve_tiling

    return resolve_tiling(bundle, args.product, tiling_overrides(args))
