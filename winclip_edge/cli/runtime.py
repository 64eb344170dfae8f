"""``register``, ``calibrate``, ``infer``, ``info``: the runtime commands (device; no torch)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import Commands
from ..inputs import collect_inputs
from . import common
from .common import EXIT_OK, EXIT_SOME_FAILED, CliError, add_runtime_options, progress, report_failures


def run_register(args: argparse.Namespace) -> int:
    from ..products import MEMORY, THRESHOLD
    from ..registration import register as register_references

    inspector = common.inspector(args, zero_shot=True, with_threshold=False)
    images = collect_inputs(args.images)
    with progress(len(images), "embedding references", args.quiet) as bar:
        memory, failed = register_references(inspector, images, args.batch, append=args.append, progress=bar.update)
    report_failures(failed)
    folder = inspector.bundle.product_dir(args.product)
    print(f"memory of {args.product!r}: {memory.size} reference image(s) -> {folder / MEMORY}")
    if (folder / THRESHOLD).is_file():
        print(f"note: the threshold in {folder / THRESHOLD} belongs to the previous memory; "
              f"re-run `winclip-edge calibrate --bundle {args.bundle} --product {args.product}`", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run_calibrate(args: argparse.Namespace) -> int:
    from ..calibration import calibrate
    from ..products import THRESHOLD, save_threshold, save_tiling
    from ..tiles.tiling import TilingConfig

    inspector = common.inspector(args, with_threshold=False)
    images = collect_inputs(args.images)
    with progress(len(images), "scoring normal images", args.quiet) as bar:
        threshold, failed = calibrate(inspector, images, args.false_alarm_rate, args.batch, progress=bar.update)
    report_failures(failed)
    save_threshold(inspector.bundle, args.product, threshold)
    if args.tile is not None:  # the threshold belongs to this tiling: make it the product's setting (docs/tiling.md)
        save_tiling(inspector.bundle, args.product, inspector.tiling or TilingConfig())
    how = "leave-one-out over the memory" if threshold.leave_one_out else "normal images"
    print(f"threshold {threshold.value:.6f} (image score, [0,1]) for {args.product!r}, {threshold.mode}: "
          f"{threshold.n_images} {how}, false alarms on them {threshold.false_alarm_rate:.1%} "
          f"(target {threshold.target_false_alarm_rate:.1%}) -> {inspector.bundle.product_dir(args.product) / THRESHOLD}")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run_infer(args: argparse.Namespace) -> int:
    from ..results import ResultWriter, inspect_into

    inputs = collect_inputs(args.inputs)
    if not inputs:
        raise CliError("no inputs")
    inspector = common.inspector(args)
    threshold = ("none (decisions are null: run calibrate)" if inspector.threshold is None
                 else f"{inspector.threshold.value:.6f}")
    print(f"inspecting {len(inputs)} input(s) with {inspector.engine.name} ({inspector.engine.device}), "
          f"product {args.product!r}, {inspector.mode}, threshold {threshold}", file=sys.stderr)

    def on_row(row: dict) -> None:
        if row["error"] is not None:
            print(f"error: {row['error']}", file=sys.stderr)
        bar.update(1)

    with ResultWriter(args.out, maps=not args.no_maps, overlays=not args.no_overlays) as writer, \
            progress(len(inputs), "inspecting", args.quiet) as bar:
        s = inspect_into(writer, inspector, inputs, args.batch, on_row)
    timing = (f"; per image: engine {s.engine_ms / s.inspected:.1f} ms, end to end {s.total_ms / s.inspected:.1f} ms "
              f"(mean, batch {args.batch})") if s.inspected else ""
    print(f"{s.inspected}/{s.total} inspected, {s.anomalous} anomalous, {s.failed} failed{timing}; "
          f"results in {writer.path}, overlays in {Path(args.out) / 'overlays'}")
    return EXIT_SOME_FAILED if s.failed else EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..errors import WinclipError
    from ..products import load_memory, load_threshold, load_tiling
    from ..tiles.roi import load_roi
    from ..versions import live_version

    bundle = Bundle(args.bundle)
    m = bundle.manifest
    print(f"{bundle.root}: {m.model} ({m.weights['source']}, weights id {m.weights_id[:12]}), input {m.image_size}, "
          f"grid {m.grid}, scales {list(m.scales)} stride {m.stride}, patch layer {m.patch_layer}, D={m.embed_dim}, C={m.width}")
    text = m.text_encoder
    print(f"  text encoder: {text['onnx']} + {text['tokenizer']} (add-product runs without torch)" if text else
          "  text encoder: none (add-product needs the export stage; `winclip-edge add-text-encoder` adds it)")
    for product in bundle.products():
        try:
            memory = load_memory(bundle, product)
            threshold = load_threshold(bundle, product, memory)
            tiling, roi = load_tiling(bundle, product), load_roi(bundle, product)
            live = live_version(bundle, product)
        except WinclipError as err:  # one broken product must not hide the others
            print(f"  {product}: {err}")
            continue
        tiles = ("whole frame" if tiling is None or not tiling.enabled else
                 f"tiles {tiling.tile} overlap {tiling.overlap} {tiling.memory} memory"
                 f"{'' if tiling.use_global else ', no whole-frame pass'}")
        print(f"  {product}: memory {memory.size if memory else 0} image(s), threshold "
              f"{'none' if threshold is None else f'{threshold.value:.6f} ({threshold.mode}, {threshold.n_images} images)'}"
              f", {tiles}, ROI {'none' if roi is None else roi.identity}"
              f"{'' if live is None else f', version {live.number} (winclip-edge product versions)'}")
    from ..performance.tuning import engine_notes

    for line in engine_notes(bundle):
        print(f"  {line}")
    from ..engines.cache_dir import engine_dir
    from .cache import summary

    print(f"  {summary(engine_dir(bundle))}")
    for line in backend_lines():
        print(f"  {line}")
    return EXIT_OK


def backend_lines() -> list[str]:
    """What info says about the registered backends: installed versions, precisions, flags, what they build."""
    from ..engines.registry import backends, broken_backends
    from ..performance.machine import installed_versions

    lines = ["backends (--backend; plugins register in the entry-point group winclip_edge.backends):"]
    flags = common.engine_flags()
    for name, record in backends().items():
        versions = installed_versions(record.packages)
        have = ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else \
            f"not installed ({record.install})" if record.packages else record.install
        takes = [f.flag for f in flags if name in f.backends()]
        parts = [f"{name}{'' if record.builtin else f' (plugin {record.origin})'}: {have}",
                 f"precisions {', '.join(record.precisions) if record.precisions else 'any'}",
                 f"flags {', '.join(takes) or 'none'}"]
        if record.builds:
            parts.append(f"builds {record.builds}")
        lines.append("  " + "; ".join(parts))
    lines += [f"  {name}: plugin failed to load ({why})" for name, why in broken_backends().items()]
    return lines


def register(sub: Commands) -> None:
    p = sub.add_parser("register", help="few-shot: embed normal reference images into products/<p>/memory.npz "
                                         "(one engine pass per image)")
    add_runtime_options(p)
    p.add_argument("--append", action="store_true", help="add to the existing memory instead of replacing it")
    p.add_argument("images", nargs="+", help="normal images: files, folders, globs")
    p.set_defaults(run=run_register)

    p = sub.add_parser("calibrate", help="store a decision threshold from normal images (leave-one-out over the "
                                          "memory when no images are given)")
    add_runtime_options(p)
    p.add_argument("--false-alarm-rate", type=float, default=0.0,
                   help="target fraction of normal images above the threshold (default 0: the highest normal score)")
    p.add_argument("images", nargs="*", help="normal images: files, folders, globs")
    p.set_defaults(run=run_calibrate)

    p = sub.add_parser("infer", help="inspect images: results.jsonl, maps/*.npy, overlays/*.png")
    add_runtime_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the map, pixels (default off)")
    p.add_argument("--no-maps", action="store_true", help="do not write maps/*.npy")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/*.png")
    p.add_argument("inputs", nargs="+", help="images: files, folders, globs")
    p.set_defaults(run=run_infer)

    p = sub.add_parser("info", help="show a bundle's model, geometry and products")
    p.add_argument("--bundle", required=True)
    p.set_defaults(run=run_info)
