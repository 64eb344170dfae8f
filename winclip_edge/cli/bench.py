"""``bench`` and ``bench-table``: the benchmark tables of winclip_edge/performance/bench.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .commands import Commands
from ..performance.bench import (
    DEFAULT_BATCHES,
    DEFAULT_FIDELITY_IMAGES,
    DEFAULT_OUT,
    DEFAULT_SYNTHETIC_SIZE,
    BenchConfig,
    render_markdown,
    report_stem,
    run_bench,
    summary_table,
    write_report,
)
from .common import EXIT_OK, CliError, add_runtime_options, csv_ints, engine_config, scoring_options


def run_bench_command(args: argparse.Namespace) -> int:
    config = BenchConfig(
        bundle=Path(args.bundle), product=args.product, engine=engine_config(args), options=scoring_options(args),
        batches=args.batch, images=args.images, synthetic_size=args.synthetic_size, warmup=args.warmup,
        iters=args.iters, fidelity_images=args.fidelity_images, cold_start=not args.no_cold_start,
        roofline=not args.no_roofline,
        progress=not args.quiet, command=args.command_line)
    report = run_bench(config)
    if args.backend == "auto":
        print(f"engine: {report['engine_selection']}", file=sys.stderr)
    markdown = render_markdown(report)
    md, js = write_report(args.out, report_stem(report), report, markdown)
    print(markdown)
    print(f"\nwritten: {md} and {js}", file=sys.stderr)
    return EXIT_OK


def run_bench_table(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_bytes

    reports = []
    for path in args.results:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise CliError(f"{path}: not a bench result JSON ({err})") from None
    table = summary_table(reports)
    if args.out:
        atomic_write_bytes(args.out, (table + "\n").encode())
    print(table)
    return EXIT_OK


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 1024x1024, got {text!r}") from None
    return h, w


def register(sub: Commands) -> None:
    """``bench`` and ``bench-table``."""
    # conflict_handler="resolve": bench takes a list of batch sizes where the runtime options take one.
    p = sub.add_parser("bench", conflict_handler="resolve",
                       help="latency / throughput / stage split / cold start / memory (and fidelity vs fp32) of one "
                            "backend and precision -> Markdown + JSON (ViT-B-16-plus-240 on 2 CPU cores: ~5 s per image)")
    add_runtime_options(p, tiling=False)
    p.add_argument("--batch", type=csv_ints, default=DEFAULT_BATCHES, help="batch sizes, e.g. 1,4,8 (default)")
    p.add_argument("--images", default="8", help="a count of synthetic frames (default 8) or a folder/glob of images")
    p.add_argument("--synthetic-size", type=_size, default=DEFAULT_SYNTHETIC_SIZE,
                   help="HxW of synthetic frames (default 1024x1024)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size (default 1)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per batch size (default 5)")
    p.add_argument("--fidelity-images", type=int, default=DEFAULT_FIDELITY_IMAGES,
                   help="images compared with fp32 when --precision is not fp32 (default 4)")
    p.add_argument("--no-roofline", action="store_true",
                   help="skip the GFLOP/s and GEMM-peak probe (needs openvino to count the graph's FLOPs)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start measurement")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the .md/.json tables (default {DEFAULT_OUT})")
    p.set_defaults(run=run_bench_command)

    p = sub.add_parser("bench-table", help="one comparison table from several bench result JSON files")
    p.add_argument("results", nargs="+", help="bench .json files")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.set_defaults(run=run_bench_table)
