"""What the commands share: exit codes, the user-facing error, engine / scoring flags and their typed objects.

Flags are registered here once and turned into the library's typed configs (EngineConfig, ScoringOptions);
no argparse Namespace crosses into library code.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..engines import BACKENDS, EngineConfig
from ..engines.config import ENGINE_PRECISIONS
from ..errors import WinclipError
from ..scoring import MEANS, ScoringOptions

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(WinclipError):
    """A message for the user; main() prints it and exits with EXIT_ERROR."""


def csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or total < 2, file=sys.stderr)


def report_failures(failed: Any) -> None:
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)


# ---------------------------------------------------------------- engine flags
def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--backend and its options (every command that runs the graph)."""
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="engine (default auto: the winner `winclip-edge tune` recorded for this machine, else onnxruntime "
                        "fp32; with --precision P: the fastest engine of precision P tune accepted here, e.g. "
                        "--precision fp32 = the fastest exact one; --provider without --backend means onnxruntime)")
    p.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto|cpu|cuda|tensorrt (default auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime / OpenVINO intra-op threads (0 = its default)")
    p.add_argument("--precision", choices=ENGINE_PRECISIONS, default=None,
                   help="default: fp16 for tensorrt (as build-engine), fp32 otherwise. onnxruntime: runs the bundle's "
                        "fp16/int8 variant (make it with `winclip-edge quantize`); torch: fp16 casts the model "
                        "(LayerNorm stays fp32); tensorrt: loads the cached engine of that precision (make it with "
                        "`winclip-edge build-engine`); openvino: fp32 | bf16 | fp16 (precision hint) | int8 (NNCF model)")
    p.add_argument("--device", default="auto", help="torch backend: auto (cuda when available) | cpu | cuda | cuda:<i>; "
                                                    "onnxruntime --provider cuda|tensorrt: the GPU, cuda:<i>; "
                                                    "openvino: auto (CPU) | cpu | gpu | npu")
    p.add_argument("--performance-hint", choices=("latency", "throughput"), default="latency",
                   help="openvino: latency (one request on every core) or throughput (the images of a batch in parallel)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch backend on CUDA: capture the forward pass per batch size, replay it (first call slower)")
    p.add_argument("--engine-dir", default=None,
                   help="--backend tensorrt: engine cache folder of build-engine; --provider tensorrt: where ONNX "
                        "Runtime keeps its TensorRT engine and timing caches (default <bundle>/engines)")
    p.add_argument("--triton-url", default=None,
                   help="--backend triton: HOST:PORT of the Triton server (default 127.0.0.1:8001 gRPC, :8000 HTTP)")
    p.add_argument("--triton-protocol", choices=("grpc", "http"), default="grpc", help="--backend triton (default grpc)")
    p.add_argument("--triton-model", default="winclip_visual", help="--backend triton: model name (default winclip_visual)")
    p.add_argument("--triton-timeout", type=float, default=30.0,
                   help="--backend triton: seconds per request before it is retried (default 30)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the flags of :func:`add_engine_options`; ``auto`` is resolved here and the choice printed."""
    config = EngineConfig(backend=args.backend, precision=args.precision, provider=args.provider, threads=args.threads,
                          device=args.device, cuda_graphs=args.cuda_graphs,
                          engine_dir=Path(args.engine_dir) if args.engine_dir else None,
                          triton_url=args.triton_url, triton_protocol=args.triton_protocol,
                          triton_model=args.triton_model, triton_timeout=args.triton_timeout,
                          performance_hint=args.performance_hint)
    if config.backend != "auto":
        return config
    if args.provider != "auto":  # an ONNX Runtime provider asked for: ONNX Runtime, as before auto existed
        print(f"engine: onnxruntime {config.resolved_precision} (--provider given without --backend)", file=sys.stderr)
        return replace(config, backend="onnxruntime")
    from ..bundle import Bundle
    from ..engines.auto import resolve

    selection = resolve(Bundle(args.bundle, verify=False), config)  # the Inspector verifies the files
    print(f"engine: {selection.reason}", file=sys.stderr)
    return selection.config


# ---------------------------------------------------------------- runtime flags
def add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: the bundle's, 0.07)")
    p.add_argument("--use-scales", type=csv_ints, default=None, help="ablation: window scales to use, e.g. 2 (default all)")
    p.add_argument("--no-image-scale", action="store_true", help="ablation: leave s(f_img) out of the zero-shot map")
    p.add_argument("--mean", choices=MEANS, default="harmonic", help="ablation: averaging")
    p.add_argument("--zero-shot", action="store_true", help="ignore the few-shot memory (plain WinCLIP)")


def scoring_options(args: argparse.Namespace) -> ScoringOptions:
    return ScoringOptions(temperature=args.temperature, scales=args.use_scales, use_image_scale=not args.no_image_scale,
                          mean=args.mean, use_memory=not args.zero_shot)


def add_runtime_options(p: argparse.ArgumentParser, tiling: bool = True) -> None:
    """Bundle, product, engine, batch and scoring flags of the commands that score images (and the tiling / ROI
    flags, unless ``tiling=False``: commands that time the engine use the product's setting)."""
    p.add_argument("--bundle", required=True, help="bundle folder made by `winclip-edge export`")
    p.add_argument("--product", required=True, help="product name inside the bundle")
    add_engine_options(p)
    p.add_argument("--batch", type=int, default=8, help="images per engine call (default 8)")
    add_scoring_options(p)
    from .tiling_options import add_tiling_options

    if tiling:
        add_tiling_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def inspector(args: argparse.Namespace, zero_shot: bool = False, with_threshold: bool = True) -> Any:
    """The Inspector of a runtime command; ``zero_shot=True`` never reads the memory (register replaces it)."""
    from dataclasses import replace

    from ..inspector import Inspector
    from .tiling_options import tiling_and_roi

    options = scoring_options(args)
    options = replace(options, use_memory=False) if zero_shot else options
    tiling, roi = tiling_and_roi(args)
    return Inspector(args.bundle, args.product, engine=engine_config(args), options=options,
                     sigma=getattr(args, "sigma", 0.0), with_threshold=with_threshold, tiling=tiling, roi=roi)
