"""``engine quantize`` and ``engine build``: artefacts built from a bundle on the machine that runs it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..builders.tensorrt import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_GIB
from ..engines.config import PRECISIONS
from ..engines.onnx_variants import GRAPHS
from ..engines.registry import backends
from ..inputs import collect_inputs
from .commands import Commands
from .common import EXIT_OK, CliError


def run_quantize(args: argparse.Namespace) -> int:
    from ..builders.variants import make_variant
    from ..engines.onnx_variants import source_graph
    from ..bundle import Bundle
    from ..samples import load_model_inputs

    bundle = Bundle(args.bundle)
    if args.backend == "openvino":
        return _quantize_openvino(args, bundle)
    calibration = None
    if args.calibration_images:
        if args.precision != "int8":
            raise CliError("--calibration-images is for --precision int8 (static quantisation)")
        if args.graph != "visual":
            raise CliError("--calibration-images is for the visual graph; the text graph's int8 variant is dynamic")
        paths = collect_inputs(args.calibration_images)
        loaded = load_model_inputs(bundle.spec.image_size, paths)
        for _, why in loaded.skipped:
            print(f"error: {why}", file=sys.stderr)
        if not len(loaded.images):
            raise CliError(f"none of the {len(paths)} calibration image(s) could be read")
        calibration = loaded.images
    print(f"[quantize] making the {args.precision} variant of {source_graph(bundle, args.graph)[0]} "
         f"({'static, ' + str(len(calibration)) + ' calibration images' if calibration is not None else 'no calibration'}) ...", file=sys.stderr)
    info = make_variant(bundle, args.precision, calibration, graph=args.graph)
    if args.graph == "text":
        print(f"{info.precision} text variant {info.path} ({info.size_mib:.0f} MiB) in {info.seconds:.1f} s; {info.method}. "
              f"Use it with `winclip-edge product add --bundle {args.bundle} --text-precision {info.precision} NAME`")
        return EXIT_OK
    print(f"{info.precision} variant {info.path} ({info.size_mib:.0f} MiB, sha256 {info.sha256[:12]}...) in "
          f"{info.seconds:.1f} s; {info.method}. Use it with --precision {info.precision}; measure its fidelity with "
          f"`winclip-edge bench --bundle {args.bundle} --product P --precision {info.precision}`")
    return EXIT_OK


def _quantize_openvino(args: argparse.Namespace, bundle) -> int:
    from ..builders.openvino import calibration_images, make_int8

    if args.precision != "int8" or args.graph != "visual":
        raise CliError("--backend openvino makes the int8 model of the visual graph (fp32/bf16/fp16 need none: "
                       "they are OpenVINO precision hints)")
    frames, described = calibration_images(bundle, paths=collect_inputs(args.calibration_images))
    info = make_int8(bundle, frames, described)
    print(f"OpenVINO int8 model {info.path} (weights sha256 {info.sha256[:12]}...) in {info.seconds:.1f} s; "
          f"{info.method}. Use it with --backend openvino --precision int8; `winclip-edge engine tune` measures its fidelity")
    return EXIT_OK


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True)
    p.add_argument("--precision", required=True, choices=PRECISIONS[1:],
                   help="fp16 (GPU execution providers) or int8 (CPU; dynamic unless calibration images are given)")
    makers = {n: r for n, r in backends().items() if r.build_command == "quantize" and r.builtin}
    p.add_argument("--backend", choices=tuple(makers), default="onnxruntime",
                   help="; ".join(f"{n}: {r.builds}" for n, r in makers.items()) + " (default onnxruntime; openvino's "
                        "calibration images: the given ones, else the products' registered references, else the "
                        "textile normals)")
    p.add_argument("--graph", choices=GRAPHS, default="visual",
                   help="visual (default) or text: the text encoder's text.onnx (add-product --text-precision)")
    p.add_argument("--calibration-images", action="append", default=[], metavar="PATH",
                   help="int8 only: normal images (files, folders, globs; repeatable) for static QDQ quantisation")
    p.set_defaults(run=run_quantize)


def run_build_engine(args: argparse.Namespace) -> int:
    from ..builders.tensorrt import BuildOptions, build_engine, describe_precisions
    from ..bundle import Bundle
    from ..engines.engine_cache import BatchProfile

    images: tuple[str, ...] = ()
    if args.calibration_images is not None:
        if not Path(args.calibration_images).is_dir():
            raise CliError(f"--calibration-images {args.calibration_images} is not a folder")
        if args.precision != "int8":
            raise CliError(f"--calibration-images is for --precision int8 (got {args.precision}); leave it out")
        images = tuple(collect_inputs([args.calibration_images]))
        if not images:
            raise CliError(f"no images in {args.calibration_images}")
    bundle = Bundle(args.bundle)
    profile = BatchProfile(min=1, opt=args.opt_batch if args.opt_batch is not None else args.max_batch,
                           max=args.max_batch)
    cached = build_engine(bundle, BuildOptions(precision=args.precision, profile=profile,
                                               workspace_gib=args.workspace_gib, calibration_images=images,
                                               engine_dir=args.engine_dir))
    d = cached.key.device
    print(f"engine {cached.plan}: {d.gpu} ({d.sm}), TensorRT {d.trt_version}, {cached.key.precision}, batch "
          f"1..{profile.max} (opt {profile.opt}), built in {cached.build['seconds']:.0f} s; "
          f"{describe_precisions(cached.build['layer_precisions'])}")
    return EXIT_OK


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="fp32 (reference, no TF32), fp16 (default; LayerNorm and L2 norm stay FP32) or int8 (calibrated)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest batch the engine runs (default {DEFAULT_MAX_BATCH}); larger runtime batches are split")
    p.add_argument("--opt-batch", type=int, default=None, help="batch size TensorRT tunes for (default: --max-batch)")
    p.add_argument("--calibration-images", default=None,
                   help="int8: folder of normal images of the product (a few hundred); without it the calibration "
                        "cache of an earlier int8 build is reused")
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB,
                   help=f"TensorRT scratch memory limit in GiB (default {DEFAULT_WORKSPACE_GIB})")
    p.add_argument("--engine-dir", default=None, help="engine cache folder (default <bundle>/engines)")
    p.set_defaults(run=run_build_engine)


def register(commands: Commands) -> None:
    commands.add("engine quantize", _quantize_args, old="quantize",
                 help="make an fp16 or int8 variant of the bundle's visual graph (needs onnx; ViT-B-16-plus-240: ~1 "
                      "min, static int8 ~1 min per calibration image on 2 cores)")
    commands.add("engine build", _build_args, old="build-engine",
                 help="build the TensorRT engine of a bundle for this GPU (needs TensorRT; takes minutes, once per "
                      "device, TensorRT version and precision)")
