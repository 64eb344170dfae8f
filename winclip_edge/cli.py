"""``winclip-edge``: argparse mapped onto one library call per command.

Library code raises typed errors; only this module turns them into one-line messages and exit codes:
0 = all fine, 1 = some inputs failed (the others were processed), 2 = nothing could be done.
"""
from __future__ import annotations

import argparse
import glob
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from .contract import PATCH_LAYERS
from .engines import BACKENDS
from .prompts import PROMPT_STYLES
from .scoring import MEANS

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """A message for the user; the CLI prints it and exits with EXIT_ERROR."""


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def collect_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, folders (image files below them, sorted) and globs. Unmatched names are kept, so they get an error line."""
    from .preprocess import IMAGE_EXTENSIONS

    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            out.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            out += [m for m in matches if Path(m).is_file()] if matches else [item]
    return out


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or total < 2, file=sys.stderr)


def _scoring_options(args: argparse.Namespace):
    from .scoring import ScoringOptions

    return ScoringOptions(
        temperature=args.temperature, scales=args.use_scales, use_image_scale=not args.no_image_scale,
        mean=args.mean, use_memory=not args.zero_shot,
    )


def engine_options(args: argparse.Namespace) -> dict:
    """The backend's constructor options from the flags of :func:`add_engine_options`."""
    engine_options: dict = {}
    if args.backend == "onnxruntime":
        engine_options = {"provider": args.provider, "threads": args.threads}
        if getattr(args, "precision", "fp32") != "fp32":  # a variant made by `winclip-edge quantize`, sha256-checked
            from .bundle import Bundle
            from .precision import load_variant

            engine_options["model_path"] = str(load_variant(Bundle(args.bundle, verify=False), args.precision))
    elif args.backend == "torch":
        engine_options = {"device": args.device, "precision": args.precision, "cuda_graphs": args.cuda_graphs}
    elif args.backend == "tensorrt":
        engine_options = {"precision": args.precision, "engine_dir": args.engine_dir}
    return engine_options


def _inspector(args: argparse.Namespace, zero_shot: bool = False, **overrides):
    """The Inspector of a runtime command; ``zero_shot=True`` never reads the memory (register replaces it)."""
    from dataclasses import replace

    from .inspector import Inspector

    options = _scoring_options(args)
    options = replace(options, use_memory=False) if zero_shot else options
    return Inspector(args.bundle, args.product, backend=args.backend, options=options,
                     sigma=getattr(args, "sigma", 0.0), engine_options=engine_options(args), **overrides)


def _report_failures(failed) -> None:
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)


# ---------------------------------------------------------------- export stage commands
def _export_module():
    try:
        from export import onnx_export
    except ImportError as err:
        raise CliError(f"the export stage needs torch and open_clip ({err}); install with: pip install 'winclip-edge[export]'") from None
    return onnx_export


def cmd_export(args: argparse.Namespace) -> int:
    ox = _export_module()
    options = ox.ExportOptions(
        model=args.model, pretrained=args.pretrained, seed=args.seed, products=args.products, scales=args.scales,
        stride=args.stride, patch_layer=args.patch_layer, temperature=args.temperature or ox.DEFAULT_TEMPERATURE,
        opset=args.opset, tolerance=args.tolerance, force=args.force,
    )
    t0 = time.perf_counter()
    bundle = ox.export_bundle(args.out, options, show_progress=not args.quiet)
    diffs = bundle.manifest.verification["max_abs_diff"]
    print(f"bundle {args.out}: {bundle.manifest.model}, weights {bundle.manifest.weights['source']}, "
          f"products {bundle.products() or 'none'}; ONNX vs torch max abs diff {max(diffs.values()):.2e}; "
          f"{time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def cmd_add_product(args: argparse.Namespace) -> int:
    ox = _export_module()
    from export.models import load_from_manifest

    from .bundle import Bundle
    from .prompts import PromptSpec, object_name_for

    bundle = Bundle(args.bundle)
    if args.product in bundle.products() and not args.force:
        raise CliError(f"product {args.product!r} is already in {args.bundle}; pass --force to re-encode it")
    spec = PromptSpec(
        object_name=args.object_name or object_name_for(args.product), style=args.prompt_style,
        extra_normal_states=tuple(args.normal_state), extra_anomalous_states=tuple(args.anomalous_state),
        extra_templates=tuple(args.template),
    )
    loaded = load_from_manifest(bundle.manifest)  # refuses other weights
    ox.add_product(bundle, args.product, loaded, spec=spec, show_progress=not args.quiet)
    print(f"product {args.product!r} ({spec.object_name!r}) added to {args.bundle}")
    return EXIT_OK


# ---------------------------------------------------------------- runtime commands
def cmd_register(args: argparse.Namespace) -> int:
    from .products import MEMORY, THRESHOLD, load_memory, save_memory

    inspector = _inspector(args, zero_shot=True, with_threshold=False)
    images = collect_inputs(args.images)
    if not images:
        raise CliError("no reference images given")
    with _progress(len(images), "embedding references", args.quiet) as bar:
        memory, failed = inspector.embed_references(images, args.batch, progress=bar.update)
    _report_failures(failed)
    if memory is None:
        raise CliError("none of the reference images could be read; memory unchanged")
    if args.append:
        previous = load_memory(inspector.bundle, args.product)
        memory = previous.merged(memory) if previous is not None else memory
    save_memory(inspector.bundle, args.product, memory)
    folder = inspector.bundle.product_dir(args.product)
    print(f"memory of {args.product!r}: {memory.size} reference image(s) -> {folder / MEMORY}")
    if (folder / THRESHOLD).is_file():
        print(f"note: the threshold in {folder / THRESHOLD} belongs to the previous memory; "
              f"re-run `winclip-edge calibrate --bundle {args.bundle} --product {args.product}`", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate
    from .products import THRESHOLD, save_threshold

    inspector = _inspector(args, with_threshold=False)
    images = collect_inputs(args.images)
    with _progress(len(images), "scoring normal images", args.quiet) as bar:
        threshold, failed = calibrate(inspector, images, args.false_alarm_rate, args.batch, progress=bar.update)
    _report_failures(failed)
    save_threshold(inspector.bundle, args.product, threshold)
    how = "leave-one-out over the memory" if threshold.leave_one_out else "normal images"
    print(f"threshold {threshold.value:.6f} (image score, [0,1]) for {args.product!r}, {threshold.mode}: "
          f"{threshold.n_images} {how}, false alarms on them {threshold.false_alarm_rate:.1%} "
          f"(target {threshold.target_false_alarm_rate:.1%}) -> {inspector.bundle.product_dir(args.product) / THRESHOLD}")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _unique_stem(path: str, used: set[str]) -> str:
    """The file stem, made unique among the outputs of this run (a/part.png, b/part.png, part-2.png)."""
    stem = Path(path).stem or "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def run_infer(args: argparse.Namespace, inputs: Sequence[str]) -> dict:
    """Inspect ``inputs`` and write results.jsonl, maps/ and overlays/ under ``args.out``; returns a summary."""
    from .heatmap import overlay, write_npy, write_png

    inspector = _inspector(args)
    out = Path(args.out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    # running sums, not lists: one infer call may stream for weeks
    summary = {"total": 0, "failed": 0, "anomalous": 0, "engine_ms": 0.0, "total_ms": 0.0}
    print(f"inspecting {len(inputs)} input(s) with {inspector.engine.name} ({inspector.engine.device}), "
          f"product {args.product!r}, {inspector.mode}, threshold "
          f"{'none (decisions are null: run calibrate)' if inspector.threshold is None else f'{inspector.threshold.value:.6f}'}",
          file=sys.stderr)
    with open(out / "results.jsonl", "w", encoding="utf-8") as jsonl, _progress(len(inputs), "inspecting", args.quiet) as bar:
        for r in inspector.iter_inspect(inputs, args.batch, keep_images=not args.no_overlays):
            record = {"path": r.path, "score": r.score, "anomalous": r.anomalous, "threshold": r.threshold,
                      "zero_shot_score": r.zero_shot_score, "mode": inspector.mode, "map": None, "overlay": None,
                      "image_size": None, "timings_ms": None, "error": r.error}
            if r.error is None:
                try:
                    stem = _unique_stem(r.path, used)
                    t0 = time.perf_counter()
                    if not args.no_maps:
                        record["map"] = str(out / "maps" / f"{stem}.npy")
                        write_npy(record["map"], r.anomaly_map)
                    if not args.no_overlays:
                        record["overlay"] = str(out / "overlays" / f"{stem}.png")
                        decision = {None: "no threshold", True: "ANOMALOUS", False: "normal"}[r.anomalous]
                        hi = max(float(r.anomaly_map.max()), r.threshold or 0.0)
                        write_png(record["overlay"], overlay(r.image, r.anomaly_map, f"score {r.score:.4f}  {decision}",
                                                             (float(r.anomaly_map.min()), hi)))
                    r.timings_ms["write"] = (time.perf_counter() - t0) * 1e3
                    record["image_size"] = list(r.anomaly_map.shape)
                except OSError as err:
                    record["error"] = f"{r.path}: cannot write outputs ({err})"
                record["timings_ms"] = {k: round(v, 3) for k, v in r.timings_ms.items()}
            summary["total"] += 1
            if record["error"] is not None:
                summary["failed"] += 1
                print(f"error: {record['error']}", file=sys.stderr)
            else:
                summary["anomalous"] += bool(r.anomalous)
                summary["engine_ms"] += r.timings_ms["engine"]
                summary["total_ms"] += sum(r.timings_ms.values())
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            bar.update(1)
    return summary


def cmd_infer(args: argparse.Namespace) -> int:
    inputs = collect_inputs(args.inputs)
    if not inputs:
        raise CliError("no inputs")
    s = run_infer(args, inputs)
    ok = s["total"] - s["failed"]
    timing = (f"; per image: engine {s['engine_ms'] / ok:.1f} ms, end to end {s['total_ms'] / ok:.1f} ms "
              f"(mean, batch {args.batch})") if ok else ""
    print(f"{ok}/{s['total']} inspected, {s['anomalous']} anomalous, {s['failed']} failed{timing}; "
          f"results in {Path(args.out) / 'results.jsonl'}, overlays in {Path(args.out) / 'overlays'}")
    return EXIT_SOME_FAILED if s["failed"] else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import Bundle, BundleError
    from .products import load_memory, load_threshold

    bundle = Bundle(args.bundle)
    m = bundle.manifest
    print(f"{bundle.root}: {m.model} ({m.weights['source']}, weights id {m.weights_id[:12]}), input {m.image_size}, "
          f"grid {m.grid}, scales {list(m.scales)} stride {m.stride}, patch layer {m.patch_layer}, D={m.embed_dim}, C={m.width}")
    for product in bundle.products():
        try:
            memory = load_memory(bundle, product)
            threshold = load_threshold(bundle, product, memory)
        except BundleError as err:  # one broken product must not hide the others
            print(f"  {product}: {err}")
            continue
        print(f"  {product}: memory {memory.size if memory else 0} image(s), threshold "
              f"{'none' if threshold is None else f'{threshold.value:.6f} ({threshold.mode}, {threshold.n_images} images)'}")
    return EXIT_OK


# ---------------------------------------------------------------- parser
def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--backend and its options (shared by every command that runs the graph)."""
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="engine (default: onnxruntime)")
    p.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto|cpu|cuda|tensorrt (default auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="default: fp16 for tensorrt (as build-engine), fp32 otherwise. onnxruntime: runs the bundle's fp16/int8 variant (make it with `winclip-edge "
                        "quantize`); torch: fp16 casts the model (LayerNorm stays fp32); tensorrt: loads the cached "
                        "engine of that precision (make it with `winclip-edge build-engine`)")
    p.add_argument("--device", default="auto", help="torch backend: auto (cuda when available) | cpu | cuda | cuda:<i>")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch backend on CUDA: capture the forward pass per batch size, replay it (first call slower)")
    p.add_argument("--engine-dir", default=None,
                   help="--backend tensorrt: engine cache folder of build-engine (default <bundle>/engines)")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--product", required=True, help="product name inside the bundle")
    add_engine_options(p)
    p.add_argument("--batch", type=int, default=8, help="images per engine call (default 8)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: the bundle's, 0.07)")
    p.add_argument("--use-scales", type=_csv_ints, default=None, help="ablation: window scales to use, e.g. 2 (default all)")
    p.add_argument("--no-image-scale", action="store_true", help="ablation: leave s(f_img) out of the zero-shot map")
    p.add_argument("--mean", choices=MEANS, default="harmonic", help="ablation: averaging")
    p.add_argument("--zero-shot", action="store_true", help="ignore the few-shot memory (plain WinCLIP)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winclip-edge", description="Zero-/few-shot visual anomaly detection (WinCLIP/WinCLIP+).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="open_clip model -> verified ONNX bundle (needs the [export] extra; "
                                      "ViT-B-16-plus-240 takes ~1-2 min on 2 CPU cores)")
    p.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip model name or model-config JSON path")
    p.add_argument("--pretrained", default="laion400m_e31",
                   help="open_clip pretrained tag (downloads), a local checkpoint PATH (offline), or 'none' (random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --pretrained none")
    p.add_argument("--products", type=_csv, default=(), help="comma-separated product names, e.g. bottle,metal_nut")
    p.add_argument("--scales", type=_csv_ints, default=(2, 3), help="window scales in tokens (default 2,3)")
    p.add_argument("--stride", type=int, default=1, help="window stride in tokens (default 1)")
    p.add_argument("--patch-layer", choices=PATCH_LAYERS, default="penultimate",
                   help="patch tokens for few-shot: penultimate block (default) or last block + ln_post")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature stored in the bundle (0.07)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference ONNX vs torch (default 1e-4)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("add-product", help="encode the text prototypes of a product into a bundle (needs [export])")
    p.add_argument("--bundle", required=True)
    p.add_argument("product", help="product name, e.g. metal_nut")
    p.add_argument("--object-name", help="text for the object (default: product name with _ -> space)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="cpe",
                   help="cpe (paper, default), clip_ac or templates_only (the paper's baselines)")
    p.add_argument("--normal-state", action="append", default=[], help="extra normal state, '{o}' = object (repeatable)")
    p.add_argument("--anomalous-state", action="append", default=[], help="extra anomalous state (repeatable)")
    p.add_argument("--template", action="append", default=[], help="extra template, '{c}' = state phrase (repeatable)")
    p.add_argument("--force", action="store_true", help="re-encode an existing product")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_add_product)

    p = sub.add_parser("register", help="few-shot: embed normal reference images into products/<p>/memory.npz "
                                         "(one engine pass per image)")
    _add_runtime_options(p)
    p.add_argument("--append", action="store_true", help="add to the existing memory instead of replacing it")
    p.add_argument("images", nargs="+", help="normal images: files, folders, globs")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("calibrate", help="store a decision threshold from normal images (leave-one-out over the "
                                          "memory when no images are given)")
    _add_runtime_options(p)
    p.add_argument("--false-alarm-rate", type=float, default=0.0,
                   help="target fraction of normal images above the threshold (default 0: the highest normal score)")
    p.add_argument("images", nargs="*", help="normal images: files, folders, globs")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("infer", help="inspect images: results.jsonl, maps/*.npy, overlays/*.png")
    _add_runtime_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the map, pixels (default off)")
    p.add_argument("--no-maps", action="store_true", help="do not write maps/*.npy")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/*.png")
    p.add_argument("inputs", nargs="+", help="images: files, folders, globs")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("info", help="show a bundle's model, geometry and products")
    p.add_argument("--bundle", required=True)
    p.set_defaults(func=cmd_info)

    from .demo import add_demo_parser

    add_demo_parser(sub)
    from .bench import add_bench_parser; add_bench_parser(sub)
    from .engines.trt_build import add_build_engine_parser; add_build_engine_parser(sub)
    from .evaluation import add_eval_parser; add_eval_parser(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from .bundle import BundleError
    from .calibration import CalibrationError
    from .contract import ContractError
    from .datasets import DatasetError
    from .engines import EngineError
    from .preprocess import ImageError
    from .prompts import PromptError
    from .scoring import ScoringError
    from .windows import GeometryError

    errors: list[type[BaseException]] = [CliError, BundleError, CalibrationError, ContractError, DatasetError, EngineError,
                                         GeometryError, ImageError, PromptError, ScoringError,
                                         FileNotFoundError, FileExistsError, PermissionError]
    if "export.onnx_export" in sys.modules:  # only when the export stage was loaded (it needs torch)
        from export.models import ModelNotFoundError, WeightsUnavailableError
        from export.onnx_export import BundleExistsError, ExportVerificationError
        from export.windowed_clip import UnsupportedModelError

        errors += [ModelNotFoundError, WeightsUnavailableError, ExportVerificationError, UnsupportedModelError,
                   BundleExistsError]
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "precision", "") is None:  # engine flags: the backend's own default (build-engine makes fp16)
        args.precision = "fp16" if args.backend == "tensorrt" else "fp32"
    args.command_line = shlex.join(["winclip-edge", *(sys.argv[1:] if argv is None else argv)])  # for reports
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("winclip-edge: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:
        if isinstance(err, _known_errors()):
            print(f"winclip-edge {args.command}: error: {err}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
