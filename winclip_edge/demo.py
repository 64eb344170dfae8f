"""``winclip-edge demo``: the whole flow on the embedded textile images (PyPI ``conformal-clip-data``).

export (if the bundle is missing) -> register K nominal images -> calibrate on other nominal images ->
inspect a mix of nominal / local-defect / global-defect images -> print where the results are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DEMO_PRODUCT = "textile"
DEMO_OBJECT = "textile"


def _textile_dirs() -> dict[str, Path]:
    from .datasets import textile_root

    root = textile_root()
    return {name: root / name for name in ("nominal", "local", "global")}


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.jpg"))


def cmd_demo(args: argparse.Namespace) -> int:
    from . import cli
    from .bundle import Bundle, BundleError

    dirs = _textile_dirs()
    nominal = _images(dirs["nominal"])
    rng = np.random.default_rng(args.seed)
    picked = [nominal[i] for i in rng.permutation(len(nominal))[: args.shots + args.calibration + args.per_class]]
    references = picked[: args.shots]
    calibration = picked[args.shots: args.shots + args.calibration]
    test_nominal = picked[args.shots + args.calibration:]
    tests = test_nominal + [p for name in ("local", "global")
                            for p in list(np.random.default_rng(args.seed).choice(_images(dirs[name]), args.per_class, replace=False))]

    bundle_dir = Path(args.bundle)
    try:
        bundle = Bundle(bundle_dir)
        if DEMO_PRODUCT not in bundle.products():
            code = cli.main(["add-product", "--bundle", str(bundle_dir), DEMO_PRODUCT, "--object-name", DEMO_OBJECT])
            if code:
                return code
        print(f"[demo] using the existing bundle {bundle_dir} ({bundle.manifest.weights['source']} weights)")
    except BundleError:
        print(f"[demo] 1/4 export {args.model} ({args.pretrained}) -> {bundle_dir}", file=sys.stderr)
        code = cli.main(["export", "--model", args.model, "--pretrained", args.pretrained, "--products", DEMO_PRODUCT,
                         "--out", str(bundle_dir), "--force"])
        if code:
            return code
    common = ["--bundle", str(bundle_dir), "--product", DEMO_PRODUCT, "--batch", str(args.batch)]
    print(f"[demo] 2/4 register {len(references)} nominal reference image(s)", file=sys.stderr)
    if cli.main(["register", *common, *references]):
        return cli.EXIT_ERROR
    print(f"[demo] 3/4 calibrate on {len(calibration)} other nominal image(s)", file=sys.stderr)
    if cli.main(["calibrate", *common, *calibration]):
        return cli.EXIT_ERROR
    print(f"[demo] 4/4 inspect {len(tests)} images ({args.per_class} nominal, {args.per_class} local, "
          f"{args.per_class} global defects)", file=sys.stderr)
    code = cli.main(["infer", *common, "--out", args.out, *tests])
    if Bundle(bundle_dir).manifest.weights["source"] == "none":
        print("[demo] note: random weights (--pretrained none): the pipeline runs end to end, the scores mean nothing")
    print(f"[demo] results: {Path(args.out) / 'results.jsonl'}; overlays: {Path(args.out) / 'overlays'}; "
          f"maps: {Path(args.out) / 'maps'}")
    return code


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole flow on the embedded textile images (export, register, calibrate, infer)")
    p.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip model (default ViT-B-16-plus-240)")
    p.add_argument("--pretrained", default="laion400m_e31", help="tag, checkpoint PATH, or none (offline, random weights)")
    p.add_argument("--bundle", default="models/demo-b16p", help="bundle folder (exported when missing)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--shots", type=int, default=4, help="nominal reference images (default 4)")
    p.add_argument("--calibration", type=int, default=8, help="nominal images for the threshold (default 8)")
    p.add_argument("--per-class", type=int, default=4, help="test images per class nominal/local/global (default 4)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="which images are drawn")
    p.set_defaults(func=cmd_demo)
