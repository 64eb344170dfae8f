"""Lower-precision variants of a bundle's visual graph, made by ONNX Runtime's own tools, and their fidelity.

    bundle/variants/visual.fp16.onnx   fp16 weights and maths, LayerNorm and L2 norms kept fp32, uint8 in /
                                        float32 out (same contract); for GPU execution providers
    bundle/variants/visual.int8.onnx   int8 MatMul/Gemm weights: dynamic activation quantisation, or static
                                        (QDQ) with calibration images; for CPUs with int8 dot products
    bundle/variants/visual.<p>.json    how it was made, its sha256 and the sha256 of the visual.onnx it came from

A variant is an opt-in trade-off (DESIGN.md): it is written atomically, verified by sha256 on load and
refused when the bundle's visual.onnx has changed since. Whether it is faithful enough is measured, not
assumed: :func:`fidelity` compares maps and scores with the fp32 graph on the same images (`winclip-edge
bench --precision ...` reports it). Needs the ``onnx`` package (the export extra) to create variants.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .bundle import VISUAL_ONNX, Bundle, BundleError, atomic_write_bytes, atomic_write_json, json_with_checksum, \
    read_checked_json, sha256_file
from .contract import INPUT_NAME
from .scoring import Scores

PRECISIONS = ("fp32", "fp16", "int8")
VARIANTS = "variants"
# Kept in fp32 in the fp16 graph: LayerNorm's variance and ReduceL2's sum of squares overflow in half.
FP16_BLOCKED_OPS = ("LayerNormalization", "ReduceL2")
INT8_OP_TYPES = ("MatMul", "Gemm")  # the transformer's weight GEMMs: ~all of the FLOPs
CALIBRATION_BATCH = 1  # images per calibration call: the calibrator keeps every MatMul input of a call in memory
# "Faithful" = a decision threshold calibrated in fp32 stays meaningful: image scores and token maps
# (both in [0, 1]) within these of the fp32 graph's on every benchmark image.
FAITHFUL_SCORE_MAX_ABS = 5e-3
FAITHFUL_MAP_MAX_ABS = 2e-2


class VariantError(BundleError):
    """A precision variant is missing, damaged, stale or cannot be made."""


def _log(message: str) -> None:
    print(f"[quantize] {message}", file=sys.stderr, flush=True)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise VariantError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")


def variant_path(bundle: Bundle, precision: str) -> Path:
    _check_precision(precision)
    return bundle.onnx_path if precision == "fp32" else bundle.root / VARIANTS / f"visual.{precision}.onnx"


def sidecar_path(bundle: Bundle, precision: str) -> Path:
    return variant_path(bundle, precision).with_suffix(".json")


@dataclass(frozen=True)
class VariantInfo:
    precision: str
    path: Path
    sha256: str
    method: str  # the converter call, in words
    size_mib: float
    seconds: float  # time to make it


def load_variant(bundle: Bundle, precision: str) -> Path:
    """The verified graph file of ``precision`` (fp32 = the bundle's own visual.onnx)."""
    path = variant_path(bundle, precision)
    if precision == "fp32":
        return path
    make = f"`winclip-edge quantize --bundle {bundle.root} --precision {precision}`"
    side = sidecar_path(bundle, precision)
    if not side.is_file() or not path.is_file():
        raise VariantError(f"bundle {bundle.root} has no {precision} variant ({path} missing); create it with {make}")
    meta = read_checked_json(side)
    source = bundle.manifest.files[VISUAL_ONNX]
    if meta.get("source_sha256") != source:
        raise VariantError(f"{path} was made from another visual.onnx (sha256 {str(meta.get('source_sha256'))[:12]}..., "
                           f"the bundle's is {source[:12]}...); re-create it with {make}")
    actual = sha256_file(path)
    if actual != meta.get("file_sha256"):
        raise VariantError(f"{path} fails its sha256 check (expected {str(meta.get('file_sha256'))[:12]}..., got "
                           f"{actual[:12]}...): damaged or partly copied; re-create it with {make}")
    return path


def variant_metadata(bundle: Bundle, precision: str) -> dict:
    """The sidecar of a variant (how it was made, checksums), verified; ``{}`` for fp32."""
    if precision == "fp32":
        return {}
    load_variant(bundle, precision)
    return read_checked_json(sidecar_path(bundle, precision))


# ---------------------------------------------------------------- making variants
def _fp16(source: Path, out: Path) -> str:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_BLOCKED_OPS))
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=blocked)
    onnx.save(model, str(out))
    return f"onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True), fp32 ops: {list(FP16_BLOCKED_OPS)}"


def _preprocessed(source: Path, folder: Path) -> Path:
    """ONNX Runtime's recommended pre-quantisation pass (shape inference + graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = folder / "pre.onnx"
    quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
    return out


def _int8_dynamic(source: Path, out: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(_preprocessed(source, out.parent)), str(out), op_types_to_quantize=list(INT8_OP_TYPES),
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    return f"onnxruntime.quantization.quantize_dynamic: int8 weights of {list(INT8_OP_TYPES)} with constant weights, " \
           "activations quantised per call (uint8)"


def _int8_static(source: Path, out: Path, calibration: np.ndarray) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (calibration[i:i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(str(_preprocessed(source, out.parent)), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(INT8_OP_TYPES), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    return f"onnxruntime.quantization.quantize_static (QDQ, MinMax on {len(calibration)} calibration image(s)): " \
           f"int8 weights and uint8 activations of {list(INT8_OP_TYPES)} with constant weights"


def make_variant(bundle: Bundle, precision: str, calibration: np.ndarray | None = None) -> VariantInfo:
    """Create ``variants/visual.<precision>.onnx`` (atomically) and its sidecar from the bundle's fp32 graph.

    ``calibration``: uint8 ``[N, H, W, 3]`` model-size images for static int8; None = dynamic int8.
    """
    _check_precision(precision)
    if precision == "fp32":
        raise VariantError("fp32 is the bundle's own visual.onnx; choose fp16 or int8")
    if calibration is not None and precision != "int8":
        raise VariantError(f"calibration images are for int8 only (precision {precision!r} needs none)")
    if calibration is not None and len(calibration) == 0:
        raise VariantError("static int8 needs at least one calibration image; none given")
    try:
        import onnx  # noqa: F401  (the converters need it)
    except ImportError as err:
        raise VariantError(f"making a {precision} variant needs the onnx package ({err}); "
                           "pip install 'winclip-edge[export]'") from None
    t0 = time.perf_counter()
    target = variant_path(bundle, precision)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        if precision == "fp16":
            method = _fp16(bundle.onnx_path, out)
        elif calibration is None:
            method = _int8_dynamic(bundle.onnx_path, out)
        else:
            method = _int8_static(bundle.onnx_path, out, calibration)
        _check_contract(bundle, out)
        atomic_write_bytes(target, out.read_bytes())
    import onnxruntime

    sha = sha256_file(target)
    atomic_write_json(sidecar_path(bundle, precision), json_with_checksum({
        "precision": precision, "file": str(target.relative_to(bundle.root)), "file_sha256": sha,
        "source": VISUAL_ONNX, "source_sha256": bundle.manifest.files[VISUAL_ONNX], "method": method,
        "calibration_images": 0 if calibration is None else int(len(calibration)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }))
    return VariantInfo(precision=precision, path=target, sha256=sha, method=method,
                       size_mib=target.stat().st_size / 2**20, seconds=time.perf_counter() - t0)


def _check_contract(bundle: Bundle, path: Path) -> None:
    """The variant must load in ONNX Runtime (CPU) with the bundle's input and output names and shapes."""
    from .engines.onnxruntime import OnnxRuntimeEngine

    OnnxRuntimeEngine(bundle, provider="cpu", model_path=str(path)).close()


# ---------------------------------------------------------------- fidelity
@dataclass(frozen=True)
class Fidelity:
    """A variant against its fp32 reference on the same images (max / mean absolute differences)."""

    images: int
    score_max_abs: float  # final image score, [0, 1]
    score_mean_abs: float
    map_max_abs: float  # final token map, [0, 1]
    map_mean_abs: float
    embedding_max_abs: dict  # graph output -> max abs difference (unit vectors)

    @property
    def faithful(self) -> bool:
        return self.score_max_abs <= FAITHFUL_SCORE_MAX_ABS and self.map_max_abs <= FAITHFUL_MAP_MAX_ABS


def embed_and_score(embed: Callable[[np.ndarray], dict], score: Callable[[dict], Scores], images: np.ndarray,
                    batch: int) -> tuple[dict[str, np.ndarray], Scores]:
    """Outputs and scores of model-size uint8 ``images`` (e.g. ``Inspector.embed`` / ``Inspector.score``)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch):
        for name, value in embed(images[start:start + batch]).items():
            parts.setdefault(name, []).append(value)
    outputs = {name: np.concatenate(v) for name, v in parts.items()}
    return outputs, score(outputs)


def fidelity(reference: tuple[dict, Scores], candidate: tuple[dict, Scores]) -> Fidelity:
    """Compare the (outputs, scores) of a variant with those of the fp32 graph on the same images."""
    (ref_out, ref), (cand_out, cand) = reference, candidate
    score = np.abs(cand.image_score.astype(np.float64) - ref.image_score)
    maps = np.abs(cand.token_map.astype(np.float64) - ref.token_map)
    return Fidelity(
        images=int(len(ref.image_score)), score_max_abs=float(score.max()), score_mean_abs=float(score.mean()),
        map_max_abs=float(maps.max()), map_mean_abs=float(maps.mean()),
        embedding_max_abs={name: float(np.abs(cand_out[name] - ref_out[name]).max()) for name in ref_out},
    )


# ---------------------------------------------------------------- CLI
def cmd_quantize(args: argparse.Namespace) -> int:
    from .cli import EXIT_OK, CliError, collect_inputs
    from .inspector import decode

    bundle = Bundle(args.bundle)
    calibration = None
    if args.calibration_images:
        if args.precision != "int8":
            raise CliError("--calibration-images is for --precision int8 (static quantisation)")
        paths = collect_inputs(args.calibration_images)
        decoded = [decode(p, bundle.spec.image_size, p) for p in paths]
        for d in decoded:
            if d.error is not None:
                print(f"error: {d.error}", file=sys.stderr)
        good = [d.model_input for d in decoded if d.error is None]
        if not good:
            raise CliError(f"none of the {len(paths)} calibration image(s) could be read")
        calibration = np.stack(good)
    _log(f"making the {args.precision} variant of {bundle.onnx_path} "
         f"({'static, ' + str(len(calibration)) + ' calibration images' if calibration is not None else 'no calibration'}) ...")
    info = make_variant(bundle, args.precision, calibration)
    print(f"{info.precision} variant {info.path} ({info.size_mib:.0f} MiB, sha256 {info.sha256[:12]}...) in "
          f"{info.seconds:.1f} s; {info.method}. Use it with --precision {info.precision}; measure its fidelity with "
          f"`winclip-edge bench --bundle {args.bundle} --product P --precision {info.precision}`")
    return EXIT_OK


def add_quantize_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="make an fp16 or int8 variant of the bundle's visual graph (needs onnx; "
                                        "ViT-B-16-plus-240: ~1 min, static int8 ~1 min per calibration image on 2 cores)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--precision", required=True, choices=PRECISIONS[1:],
                   help="fp16 (GPU execution providers) or int8 (CPU; dynamic unless calibration images are given)")
    p.add_argument("--calibration-images", action="append", default=[], metavar="PATH",
                   help="int8 only: normal images (files, folders, globs; repeatable) for static QDQ quantisation")
    p.set_defaults(func=cmd_quantize)


__all__ = ["FAITHFUL_MAP_MAX_ABS", "FAITHFUL_SCORE_MAX_ABS", "Fidelity", "PRECISIONS", "VariantError", "VariantInfo",
           "add_quantize_parser", "embed_and_score", "fidelity", "load_variant", "make_variant", "variant_metadata",
           "variant_path"]
