"""``roi``: set, show or clear a product's region of interest (docs/tiling.md)."""
from __future__ import annotations

import argparse

from .commands import Commands
from .common import EXIT_OK, CliError


def run_roi(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..tiles.roi import ROI_FILE, Roi, clear_roi, load_roi, parse_rect, read_mask, save_roi

    bundle = Bundle(args.bundle, verify=False)
    given = [x for x in (args.mask, args.rect, args.clear or None) if x is not None]
    if len(given) > 1:
        raise CliError("give one of MASK, --rect or --clear")
    folder = bundle.product_dir(args.product)
    if args.clear:
        print(f"ROI of {args.product!r} {'removed' if clear_roi(bundle, args.product) else 'was not set'}")
    elif args.mask is not None or args.rect is not None:
        roi = read_mask(args.mask) if args.mask is not None else Roi(rect=parse_rect(args.rect), source=args.rect)
        save_roi(bundle, args.product, roi)
        what = f"mask {roi.mask.shape[1]}x{roi.mask.shape[0]} ({roi.mask.mean() / 2.55:.0f}% inspected)" \
            if roi.mask is not None else f"rectangle x,y,w,h = {args.rect}"
        print(f"ROI of {args.product!r}: {what} -> {folder / ROI_FILE}; thresholds calibrated without it are refused "
              f"until `winclip-edge calibrate` runs again")
    else:
        roi = load_roi(bundle, args.product)
        print(f"{args.product!r}: " + ("no ROI (the whole frame is inspected)" if roi is None else
                                       f"ROI {roi.identity} from {roi.source or '?'} in {folder / ROI_FILE}"))
    return EXIT_OK


def register(sub: Commands) -> None:
    p = sub.add_parser("roi", help="set, show or clear a product's region of interest (white = inspect, black = ignore)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--product", required=True)
    p.add_argument("mask", nargs="?", default=None, help="mask image of any size (scaled to each frame)")
    p.add_argument("--rect", default=None, metavar="x,y,w,h", help="a rectangle in frame pixels instead of a mask")
    p.add_argument("--clear", action="store_true", help="remove the product's ROI")
    p.set_defaults(run=run_roi)
