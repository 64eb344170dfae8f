"""``eval``: the paper's protocol on MVTec-AD, VisA, a folder or the textile set (winclip_edge/evaluation/runner.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import Commands
from ..evaluation.runner import DATASETS, DEFAULT_BATCH, DEFAULT_SEEDS, DEFAULT_SHOTS
from ..prompts import PROMPT_STYLES
from .common import EXIT_OK, EXIT_SOME_FAILED, CliError, add_engine_options, csv, csv_ints, engine_config
from .tiling_options import add_tiling_options, run_tiling


def _format_mean(summary: dict, shots: str) -> str:
    s = summary["shots"][shots]
    parts = []
    for key in summary["metric_keys"]:
        value = s["mean"][key]
        paper = (s["paper"] or {}).get("values", {}).get(key)
        text = "n/a" if value is None else f"{100 * value:.1f}"
        parts.append(f"{key} {text}" + (f" (paper {100 * paper['mean']:.1f})" if paper else ""))
    return ", ".join(parts)


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.datasets import DatasetError
    from ..evaluation.runner import EvalConfig, EvaluationError, run_evaluation
    from ..evaluation.report import ReportError

    tiling, roi = run_tiling(args)
    config = EvalConfig(
        bundle=Path(args.bundle), dataset=args.dataset, out=Path(args.out), root=Path(args.root) if args.root else None,
        classes=args.classes, shots=args.shots, seeds=args.seeds, ablation=args.ablation, prompts=args.prompts,
        engine=engine_config(args), batch=args.batch, limit=args.limit,
        pictures=not args.no_pictures, progress=not args.quiet, tiling=tiling, roi=roi,
    )
    try:
        result = run_evaluation(config)
    except (DatasetError, EvaluationError, ReportError) as err:
        raise CliError(str(err)) from None
    summary = result.summary
    if summary["warning"]:
        print(summary["warning"])
    for shots in summary["shots"]:
        print(f"{shots}-shot, mean over {len(summary['dataset']['classes'])} class(es) (%): {_format_mean(summary, shots)}")
    run = summary["run"]
    per_image = f", engine {1e3 * run['embed_seconds'] / run['images_embedded']:.1f} ms/test image" \
        if run["images_embedded"] else ""
    print(f"{result.computed} unit(s) computed, {result.skipped} skipped (finished before){per_image}; "
          f"{run['wall_seconds']:.1f} s; report: {Path(args.out) / 'report.md'}")
    for message in result.failed_images:
        print(f"error: {message}", file=sys.stderr)
    return EXIT_SOME_FAILED if result.failed_images else EXIT_OK


def register(sub: Commands) -> None:
    p = sub.add_parser("eval", help="the paper's evaluation (image/pixel AUROC, AUPR, PRO, F1-max) on MVTec-AD, VisA, "
                                    "a folder or the textile set; cost: one engine pass per test image and reference")
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="mvtec | visa (official split_csv/1cls.csv) | folder (good/ or nominal/ + defect folders, "
                        "optional masks/) | textile (conformal-clip-data, no masks)")
    p.add_argument("--root", help="data set root (optional for textile)")
    p.add_argument("--classes", type=csv, default=(), help="comma-separated classes (default: all)")
    p.add_argument("--shots", type=csv_ints, default=DEFAULT_SHOTS, help="shot counts, e.g. 0,1,2,4 (default)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="reference draws per shot count > 0 (default 5)")
    p.add_argument("--ablation", default="none",
                   help="none | no_image_scale | no_scale_<k> (drop window scale k) | arithmetic (default none)")
    p.add_argument("--prompts", choices=PROMPT_STYLES, default="cpe",
                   help="cpe (default) | clip_ac | templates_only: the paper's prompt baselines")
    add_engine_options(p)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per engine call (default 8)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N test images per defect type (good included), a fixed random subset: quick runs")
    p.add_argument("--no-pictures", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--out", required=True, help="output folder; re-running with the same folder resumes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tiling_options(p, of_product=False)
    p.set_defaults(run=run_eval)
