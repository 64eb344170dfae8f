"""``demo``: the whole flow on the embedded textile images (winclip_edge/demo.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import Commands
from .common import EXIT_OK, EXIT_SOME_FAILED, CliError


def run_demo_command(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    config = DemoConfig(model=args.model, pretrained=args.pretrained, bundle=Path(args.bundle), out=Path(args.out),
                        shots=args.shots, calibration=args.calibration, per_class=args.per_class, batch=args.batch,
                        seed=args.seed, progress=not args.quiet)
    try:
        result = run_demo(config, log=lambda message: print(message, file=sys.stderr))
    except ImportError as err:  # the export stage is needed when the bundle is missing
        raise CliError(f"the demo exports its bundle with the export stage ({err}); "
                       "install it with: pip install 'winclip-edge[export]'") from None
    s = result.summary
    print(f"[demo] {s.inspected}/{s.total} inspected, {s.anomalous} anomalous, {s.failed} failed")
    if result.random_weights:
        print("[demo] note: random weights (--pretrained none): the pipeline runs end to end, the scores mean nothing")
    out = Path(args.out)
    print(f"[demo] results: {result.results}; overlays: {out / 'overlays'}; maps: {out / 'maps'}")
    failed = s.failed + result.failed_references + result.failed_calibration
    return EXIT_SOME_FAILED if failed else EXIT_OK


def register(sub: Commands) -> None:
    p = sub.add_parser("demo", help="the whole flow on the embedded textile images (export, register, calibrate, infer)")
    p.add_argument("--model", default="ViT-B-16-plus-240",
                   help="open_clip model, winclip-tiny (shipped, seconds), or config JSON (default ViT-B-16-plus-240)")
    p.add_argument("--pretrained", default="laion400m_e31", help="tag, checkpoint PATH, or none (offline, random weights)")
    p.add_argument("--bundle", default="models/demo-b16p", help="bundle folder (exported when missing)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--shots", type=int, default=4, help="nominal reference images (default 4)")
    p.add_argument("--calibration", type=int, default=8, help="nominal images for the threshold (default 8)")
    p.add_argument("--per-class", type=int, default=4, help="test images per class nominal/local/global (default 4)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="which images are drawn")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_demo_command)
