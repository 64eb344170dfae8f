"""``teach``, ``product versions``, ``product rollback``: operators' corrections as product versions
(docs/service.md, "Verdicts, versions and drift")."""
from __future__ import annotations

import argparse
import getpass
import json
import sys

from ..inputs import collect_inputs
from . import common
from .commands import Commands
from .common import EXIT_OK, EXIT_SOME_FAILED, CliError, add_engine_options, add_scoring_options, progress, \
    report_failures


def _operator(args: argparse.Namespace) -> str:
    return args.operator or getpass.getuser()


def run_teach(args: argparse.Namespace) -> int:
    from ..review import ReviewDB
    from ..teaching import NothingToTeach, TeachConfig, teach, teach_from_review

    images = collect_inputs(args.images) if args.images else []
    if not images and args.review is None:
        raise CliError("nothing to teach from: give good images, or --review DB (the verdicts of the review page)")
    if images and args.review is not None:
        raise CliError("give either good images or --review DB, not both")
    calibration = collect_inputs(args.calibration_images) if args.calibration_images else []
    config = TeachConfig(target_false_alarm_rate=args.false_alarm_rate, batch_size=args.batch,
                         flagged_only=not args.all_good, note=args.note)
    common_kwargs = dict(calibration_images=calibration, config=config, engine=common.engine_config(args),
                         options=common.scoring_options(args))
    try:
        with progress(len(images), "embedding references", args.quiet) as bar:
            if args.review is not None:
                with ReviewDB(args.review) as db:
                    taught = teach_from_review(db, args.bundle, args.product, _operator(args), progress=bar.update,
                                               **common_kwargs)
            else:
                taught = teach(args.bundle, args.product, images, _operator(args), progress=bar.update, **common_kwargs)
    except NothingToTeach as err:
        print(f"winclip-edge teach: {err}; the live version is unchanged", file=sys.stderr)
        return EXIT_OK
    report_failures(taught.failed)
    v, t = taught.version, taught.threshold
    before = "none" if taught.previous_threshold is None else f"{taught.previous_threshold:.6f}"
    how = "leave-one-out over the memory" if t.leave_one_out else "good images that are not references"
    print(f"{args.product!r} version {v.number} (from {v.parent}) is live: {len(taught.added)} reference(s) added "
          f"({v.references['count']} in all), {len(taught.skipped)} already references; threshold {before} -> "
          f"{t.value:.6f} on {t.n_images} {how}, false alarms on them {t.false_alarm_rate:.1%} "
          f"(target {t.target_false_alarm_rate:.1%}); a running station serves it after "
          f"`POST /v1/products/{args.product}/reload`")
    return EXIT_SOME_FAILED if taught.failed else EXIT_OK


def run_versions(args: argparse.Namespace) -> int:
    from ..teaching import product_versions

    rows = [s.to_dict() for s in product_versions(args.bundle, args.product)]
    if args.json:
        print(json.dumps({"product": args.product, "versions": rows}, indent=2))
        return EXIT_OK
    if not rows:
        print(f"{args.product!r} has no versions: its files beside text.npz serve (the first teach makes versions)")
        return EXIT_OK
    for r in rows:
        mark = "*" if r["live"] else " "
        if r["error"] is not None:
            print(f"{mark} {r['version']:>4}  DAMAGED: {r['error']}")
            continue
        threshold = "none" if r["threshold"] is None else f"{r['threshold']:.6f}"
        far = "" if r["false_alarm_rate"] is None else \
            f", false alarms {r['false_alarm_rate']:.1%} (target {r['target_false_alarm_rate']:.1%})"
        print(f"{mark} {r['version']:>4}  {r['action']:<6} from {str(r['parent']):<4} by {r['who']} at {r['created']}: "
              f"{r['references']} reference(s) (+{r['added']}), threshold {threshold} "
              f"({r['calibration'] or 'none'}{far})")
    return EXIT_OK


def run_rollback(args: argparse.Namespace) -> int:
    from ..review import ReviewDB
    from ..teaching import rollback

    if args.review is not None:
        with ReviewDB(args.review) as db:
            pointer = rollback(args.bundle, args.product, args.version, _operator(args), review=db)
    else:
        pointer = rollback(args.bundle, args.product, args.version, _operator(args))
    print(f"{args.product!r} version {pointer['version']} is live (was {pointer['previous']}); a running station "
          f"serves it after `POST /v1/products/{args.product}/reload`")
    return EXIT_OK


def _product_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--product", required=True, help="product name inside the bundle")


def register(commands: Commands) -> None:
    p = commands.add_parser("teach", help="append good images (or the good verdicts of a review database) to a product's "
                                     "references, re-calibrate, and make it a new live product version")
    _product_flags(p)
    p.add_argument("--review", default=None, help="the review database (SQLite) of `serve --http`: teach its good "
                                                  "verdicts that were never taught")
    p.add_argument("--all-good", action="store_true",
                   help="with --review: every good verdict with a kept image, not only false alarms (flagged goods)")
    p.add_argument("--calibration-images", nargs="+", default=None,
                   help="good images that are not references to calibrate on (default: leave-one-out over the memory)")
    p.add_argument("--false-alarm-rate", type=float, default=None,
                   help="target false-alarm rate (default: the live threshold's target)")
    p.add_argument("--operator", default=None, help="who teaches, recorded in the version (default: the user name)")
    p.add_argument("--note", default="", help="a note kept in the version")
    add_engine_options(p)
    p.add_argument("--batch", type=int, default=8, help="images per engine call (default 8)")
    add_scoring_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("images", nargs="*", help="good images: files, folders, globs")
    p.set_defaults(run=run_teach)

    def versions_args(p: argparse.ArgumentParser) -> None:
        _product_flags(p)
        p.add_argument("--json", action="store_true", help="as JSON")
        p.set_defaults(run=run_versions)

    def rollback_args(p: argparse.ArgumentParser) -> None:
        _product_flags(p)
        p.add_argument("--version", type=int, required=True, help="the version to serve")
        p.add_argument("--operator", default=None, help="who rolls back (default: the user name)")
        p.add_argument("--review", default=None, help="audit the rollback in this review database")
        p.set_defaults(run=run_rollback)

    commands.add("product versions", versions_args,
                 help="every version of a product, the live one marked *, damaged ones named")
    commands.add("product rollback", rollback_args, help="make an earlier (or later) version live again")
