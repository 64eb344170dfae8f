#!/usr/bin/env python
"""Verdict -> live: how long an operator's correction takes to serve, and what drift tracking costs per verdict.

A station (a Catalog, its engine loaded once) serves a product registered on ``--references`` goods and calibrated
leave-one-out. Each round, a new good part the memory does not know is inspected (a false alarm, or at least a
result to correct), an operator's good verdict is recorded in the review database with the exact pixels, and
``teach_from_review`` (sharing the station's engine) makes a new version, which ``Catalog.reload`` swaps in; the
round ends when the next inspection is decided by the new version. Reported per stage (median over the rounds,
and the last round's memory size): verdict committed, teach (embed + calibrate + write + verify + switch),
reload, first inspection; the total is verdict -> live. Then the cost of one DriftTracker update (a verdict and a
score) for several window sizes.

The tiny random-weight model is exported when no ``--bundle`` is given (in a subprocess: torch stays out of the
measured process); ``--bundle DIR --product P`` measures a real one (on a copy: the bundle is not changed). Run
from the repository root::

    python benchmarks/teach.py [--rounds 5] [--references 8] [--bundle models/b16p --product bottle]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from winclip_edge.performance.bench import machine_info, markdown_table, software_versions, write_report  # noqa: E402

TINY_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "patch_size": 16,
                                               "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def part(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A synthetic good part: smooth random texture (the same statistics for every seed), RGB uint8."""
    import cv2

    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (size[0] // 8, size[1] // 8, 3)).clip(0, 255).astype(np.uint8)
    image = cv2.resize(base, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return cv2.add(image, rng.integers(0, 12, image.shape, dtype=np.uint8))


def export_tiny(work: Path) -> tuple[Path, str]:
    config = work / "tiny240.json"
    config.write_text(json.dumps(TINY_CONFIG))
    bundle = work / "bundle"
    run = subprocess.run([sys.executable, "-m", "winclip_edge.cli", "export", "--model", str(config), "--pretrained",
                          "none", "--products", "widget", "--out", str(bundle), "--quiet"], capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise SystemExit(f"export failed:\n{run.stderr}")
    return bundle, "widget"


def drift_cost(windows: list[int], calls: int = 5000) -> list[dict]:
    from winclip_edge.drift import DriftTracker

    rng = np.random.default_rng(0)
    rows = []
    for window in windows:
        tracker = DriftTracker(rng.normal(0.4, 0.02, 50), threshold=0.46, window=window)
        scores = rng.normal(0.41, 0.02, calls)
        for s in scores[:window]:  # a full window first
            tracker.add_score(s)
            tracker.add_verdict("good", bool(s > 0.46))
        t0 = time.perf_counter()
        for s in scores:
            tracker.add_score(s)
        t1 = time.perf_counter()
        for s in scores:
            tracker.add_verdict("good", bool(s > 0.46))
        t2 = time.perf_counter()
        rows.append({"window": window, "calibration_scores": 50, "score_us": (t1 - t0) / calls * 1e6,
                     "verdict_us": (t2 - t1) / calls * 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="a bundle to measure (copied; default: the tiny model)")
    parser.add_argument("--product", default=None, help="its product (with --bundle)")
    parser.add_argument("--rounds", type=int, default=5, help="teach rounds (default 5)")
    parser.add_argument("--references", type=int, default=8, help="references registered first (default 8)")
    parser.add_argument("--size", type=int, default=480, help="part images are SIZE x SIZE pixels (default 480)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of the tables")
    args = parser.parse_args()
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])

    from winclip_edge import Inspector
    from winclip_edge.bundle import Bundle
    from winclip_edge.calibration import calibrate
    from winclip_edge.catalog import Catalog
    from winclip_edge.products import save_threshold
    from winclip_edge.registration import register
    from winclip_edge.review import ReviewDB
    from winclip_edge.scoring import ScoringOptions
    from winclip_edge.teaching import teach_from_review

    load_before = machine_info()["load_average"]
    with tempfile.TemporaryDirectory(prefix="winclip-teach-bench-") as tmp:
        work = Path(tmp)
        if args.bundle is None:
            bundle, product = export_tiny(work)
        else:
            if not args.product:
                raise SystemExit("--bundle needs --product")
            bundle, product = work / "bundle", args.product
            shutil.copytree(args.bundle, bundle, ignore=shutil.ignore_patterns("engines", "variants", "tuning"))
        size = (args.size, args.size)
        refs = [part(s, size) for s in range(args.references)]
        register(Inspector(bundle, product, options=ScoringOptions(use_memory=False), with_threshold=False), refs)
        threshold, _ = calibrate(Inspector(bundle, product, with_threshold=False))
        save_threshold(Bundle(bundle), product, threshold)
        catalog = Catalog(bundle, [product])
        catalog.warm_up(1)
        db = ReviewDB(work / "review" / "verdicts.sqlite")
        rounds = []
        for r in range(args.rounds):
            image = part(1000 + r, size)
            result = catalog.get(product).inspect([image], keep_images=True)[0]
            t0 = time.perf_counter()
            db.record(f"{r + 1:032x}", product, "good", "bench", score=result.score, threshold=result.threshold,
                      anomalous=True, image=result.image)  # counted as a false alarm whatever it scored
            t1 = time.perf_counter()
            taught = teach_from_review(db, catalog.bundle, product, "bench", engine=catalog.engine,
                                       options=catalog.options)
            t2 = time.perf_counter()
            inspector = catalog.reload(product)
            t3 = time.perf_counter()
            after = inspector.inspect([image])[0]
            t4 = time.perf_counter()
            rounds.append({"round": r + 1, "version": taught.version.number, "references": taught.version.references["count"],
                           "flagged_before": bool(result.anomalous), "score_before": result.score,
                           "score_after": after.score, "flagged_after": bool(after.anomalous),
                           "verdict_ms": (t1 - t0) * 1e3, "teach_ms": (t2 - t1) * 1e3, "reload_ms": (t3 - t2) * 1e3,
                           "inspect_ms": (t4 - t3) * 1e3, "total_ms": (t4 - t0) * 1e3})
        engine = f"{catalog.engine.name} ({catalog.engine.device})"
        model = Bundle(bundle).manifest.model
        catalog.close()
        db.close()
    drift = drift_cost([50, 200, 1000])
    machine = machine_info()
    machine["load_average_before"] = load_before
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    med = {k: statistics.median(r[k] for r in rounds) for k in ("verdict_ms", "teach_ms", "reload_ms", "inspect_ms",
                                                                 "total_ms")}
    report = {"command": command, "date": stamp, "machine": machine, "versions": software_versions(), "model": model,
              "engine": engine, "image_size": list(size), "references_first": args.references, "rounds": rounds,
              "median": med, "drift": drift}
    stage_rows = [[r["round"], r["references"], f"{r['score_before']:.4f} -> {r['score_after']:.4f}",
                   f"{'yes' if r['flagged_before'] else 'no'} -> {'yes' if r['flagged_after'] else 'no'}",
                   f"{r['verdict_ms']:.1f}", f"{r['teach_ms']:.0f}", f"{r['reload_ms']:.0f}", f"{r['inspect_ms']:.0f}",
                   f"{r['total_ms']:.0f}"] for r in rounds]
    stage_rows.append(["median", "", "", "", *(f"{med[k]:.1f}" if k == "verdict_ms" else f"{med[k]:.0f}"
                                               for k in ("verdict_ms", "teach_ms", "reload_ms", "inspect_ms",
                                                         "total_ms"))])
    md = "\n\n".join([
        f"# Verdict -> live: teach, reload, first inspection ({model}, {engine})",
        f"Date (UTC): {stamp}. Machine: {machine['cpu']}, {machine['cores']} logical cores, {machine['ram_gib']} GiB; "
        f"load average before {load_before}, after {machine['load_average']} (shared machine: numbers are slower "
        f"under load). Command: `{command}`.",
        f"Parts {size[0]}x{size[1]} px; the product starts with {args.references} references (leave-one-out "
        "threshold); each round teaches one more good part from its good verdict and serves it. Times in ms: "
        "verdict = committed to SQLite (WAL, synchronous=FULL) with its PNG; teach = teach_from_review (embed, "
        "leave-one-out calibration, version written and verified, pointer moved) on the station's engine; reload = "
        "Catalog.reload; inspect = the first inspection by the new version.",
        markdown_table(["round", "references", "score before -> after", "flagged", "verdict", "teach", "reload",
                        "inspect", "verdict -> live"], stage_rows),
        "Drift tracking per observation (DriftTracker, 50 calibration scores; KS recomputed on every score), "
        "microseconds:",
        markdown_table(["window", "add_score (us)", "add_verdict (us)"],
                       [[d["window"], f"{d['score_us']:.1f}", f"{d['verdict_us']:.1f}"] for d in drift]),
    ])
    slug = model.replace("/", "_")
    paths = write_report(args.out, f"teach_{slug}_{stamp}", report, md)
    print(md)
    print(f"\nwritten: {paths[0]}, {paths[1]}")


if __name__ == "__main__":
    main()
