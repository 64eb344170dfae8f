"""``winclip-edge engine tune``: find the fastest faithful engine on this machine and record it for ``--backend auto``."""
from __future__ import annotations

import argparse
import sys


from ..bundle import Bundle
from ..engines.auto import fastest_accepted
from ..engines.registry import backends
from ..performance.tuning import DEFAULT_FIDELITY_IMAGES, DEFAULT_MAX_MAP_DIFF, DEFAULT_MAX_SCORE_DIFF, TuneConfig, render_table, \
    run_tune, save_record
from .commands import Commands
from .common import EXIT_OK, CliError, csv_ints



def backend_choices() -> tuple[str, ...]:
    """The backends that have tune candidates (their records say what to time here)."""
    return tuple(n for n, r in backends().items() if r.candidates is not None)


def _log(message: str) -> None:
    print(f"[tune] {message}", file=sys.stderr, flush=True)


def cmd_tune(args: argparse.Namespace) -> int:
    from ..inputs import collect_inputs

    images: list[str] = []
    if args.images:
        images = collect_inputs(args.images)
        if not images:
            raise CliError(f"--images {args.images}: no image files there")
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else []
    unknown = sorted(set(wanted) - set(backend_choices()))
    if unknown:
        raise CliError(f"--backends: unknown {unknown}; choose from {backend_choices()}")
    config = TuneConfig(product=args.product, images=images, max_score_diff=args.max_score_diff,
                        max_map_diff=args.max_map_diff, fidelity_images=args.fidelity_images, rounds=args.rounds,
                        warmup=args.warmup, threads=tuple(args.threads), build_variants=not args.no_build,
                        backends=tuple(wanted), interleave=not args.sequential)
    bundle = Bundle(args.bundle)
    record = run_tune(bundle, config, log=_log)
    path = save_record(bundle, record)
    print(render_table(record))
    w = record["winner"]
    print(f"\nwinner on this machine: {w['backend']} {w['precision']}"
          f"{' ' + str(w['threads']) + ' threads' if w['threads'] else ''} ({w['ms_per_image']:.0f} ms/image, "
          f"{record['reference_ms_per_image'] / w['ms_per_image']:.2f}x onnxruntime fp32); recorded in {path}. "
          "register/calibrate/infer/serve/eval use it by default (--backend auto).")
    exact = fastest_accepted(record, "fp32")
    if exact is not None:
        print(f"fastest exact engine: {exact['backend']} fp32{' ' + str(exact['threads']) + ' threads' if exact['threads'] else ''} "
              f"({exact['ms_per_image']:.0f} ms/image, {record['reference_ms_per_image'] / exact['ms_per_image']:.2f}x "
              "onnxruntime fp32); --precision fp32 runs it.")
    return EXIT_OK


def register(commands: Commands) -> None:
    def _tune_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", required=True)
        p.add_argument("--product", help="product whose scores are compared (default: the bundle's first)")
        p.add_argument("--images", action="append", default=[], metavar="PATH",
                       help="images for timing + fidelity (files, folders, globs; repeatable); default: the product's "
                            "registered references, else synthetic frames")
        p.add_argument("--max-score-diff", type=float, default=DEFAULT_MAX_SCORE_DIFF,
                       help=f"largest image-score difference vs ONNX Runtime fp32 to accept (default {DEFAULT_MAX_SCORE_DIFF})")
        p.add_argument("--max-map-diff", type=float, default=DEFAULT_MAX_MAP_DIFF,
                       help=f"largest token-map difference vs fp32 to accept (default {DEFAULT_MAX_MAP_DIFF})")
        p.add_argument("--fidelity-images", type=int, default=DEFAULT_FIDELITY_IMAGES,
                       help=f"images per candidate, each a timed batch-1 call (default {DEFAULT_FIDELITY_IMAGES})")
        p.add_argument("--rounds", type=int, default=1, help="timed passes over the images per engine (default 1)")
        p.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first (default 1)")
        p.add_argument("--threads", type=csv_ints, default=(0,),
                       help="intra-op thread counts to try on the CPU backends, e.g. 1,2 (default 0 = library default)")
        p.add_argument("--backends", help=f"comma-separated subset of {','.join(backend_choices())} (default: all installed)")
        p.add_argument("--sequential", action="store_true",
                       help="time each engine alone and close it before the next (less memory; default: every faithful "
                            "engine stays loaded and they are timed in turn, so load changes hit all alike)")
        p.add_argument("--no-build", action="store_true", help="do not make missing int8 models (skip those candidates)")
        p.set_defaults(run=cmd_tune)

    commands.add("engine tune", _tune_args, old="tune",
                 help="time every engine this machine can run (backend x precision x threads), reject those whose "
                      "scores/maps differ from fp32, record the fastest for --backend auto (ViT-B-16-plus-240 on 2 "
                      "cores: ~5-10 min, int8 models made once)")
