"""Making lower-precision variants of a bundle's visual graph with ONNX Runtime's own tools.

    bundle/variants/visual.fp16.onnx   fp16 weights and maths, LayerNorm and L2 norms kept fp32, uint8 in /
                                        float32 out (same contract); for GPU execution providers
    bundle/variants/visual.int8.onnx   int8 MatMul/Gemm weights: dynamic activation quantisation, or static
                                        (QDQ) with calibration images; for CPUs with int8 dot products
    bundle/variants/visual.<p>.json    how it was made, its sha256 and the sha256 of the visual.onnx it came from
    bundle/variants/text.<p>.onnx|json the same for the text encoder's text.onnx (fp16; dynamic int8 only)

A variant is an opt-in trade-off (docs/method.md §11): it is written atomically, verified by sha256 on load and
refused when the bundle's visual.onnx has changed since. Whether it is faithful enough is measured, not
assumed: winclip_edge/performance/fidelity.py compares maps and scores with the fp32 graph on the same images
(`winclip-edge bench --precision ...` reports it). The ONNX Runtime backend loads them through
winclip_edge/engines/onnx_variants.py. Needs the ``onnx`` package (the export extra) to create variants.
"""
from __future__ import annotations

import datetime as _dt
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle, json_with_checksum
from ..contract import INPUT_NAME
from ..engines.onnx_variants import VariantError, check_precision, sidecar_path, source_graph, variant_path
from ..fileio import atomic_write_bytes, atomic_write_json, sha256_file

# Kept in fp32 in the fp16 graph: LayerNorm's variance and ReduceL2's sum of squares overflow in half.
FP16_BLOCKED_OPS = ("LayerNormalization", "ReduceL2")
INT8_OP_TYPES = ("MatMul", "Gemm")  # the transformer's weight GEMMs: ~all of the FLOPs
CALIBRATION_BATCH = 1  # images per calibration call: the calibrator keeps every MatMul input of a call in memory


def _log(message: str) -> None:
    print(f"[quantize] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class VariantInfo:
    precision: str
    path: Path
    sha256: str
    method: str  # the converter call, in words
    size_mib: float
    seconds: float  # time to make it


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


def make_variant(bundle: Bundle, precision: str, calibration: np.ndarray | None = None,
                 graph: str = "visual") -> VariantInfo:
    """Create ``variants/<graph>.<precision>.onnx`` (atomically) and its sidecar from the bundle's fp32 graph.

    ``calibration``: uint8 ``[N, H, W, 3]`` model-size images for static int8; None = dynamic int8.
    ``graph``: ``visual`` (visual.onnx) or ``text`` (the text encoder's text.onnx; dynamic int8 only).
    """
    check_precision(precision)
    source, source_sha256 = source_graph(bundle, graph)
    if precision == "fp32":
        raise VariantError(f"fp32 is the bundle's own {source.name}; choose fp16 or int8")
    if calibration is not None and graph != "visual":
        raise VariantError("calibration images are for the visual graph; the text graph's int8 variant is dynamic")
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
    target = variant_path(bundle, precision, graph)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        if precision == "fp16":
            method = _fp16(source, out)
        elif calibration is None:
            method = _int8_dynamic(source, out)
        else:
            method = _int8_static(source, out, calibration)
        _check_contract(bundle, out, graph)
        atomic_write_bytes(target, out.read_bytes())
    import onnxruntime

    sha = sha256_file(target)
    atomic_write_json(sidecar_path(bundle, precision, graph), json_with_checksum({
        "precision": precision, "file": str(target.relative_to(bundle.root)), "file_sha256": sha,
        "source": source.name, "source_sha256": source_sha256, "method": method,
        "calibration_images": 0 if calibration is None else int(len(calibration)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }))
    return VariantInfo(precision=precision, path=target, sha256=sha, method=method,
                       size_mib=target.stat().st_size / 2**20, seconds=time.perf_counter() - t0)


def _check_contract(bundle: Bundle, path: Path, graph: str = "visual") -> None:
    """The variant must load in ONNX Runtime (CPU) with the bundle's input and output names and shapes."""
    if graph == "text":
        from ..text_encoder import TextEncoder

        TextEncoder(bundle, model_path=path).close()
        return
    import onnxruntime as ort

    from ..contract import check_io

    # A plain CPU session, not the ONNX Runtime backend: the backend's tune preparation makes variants with this
    # module, so this module must not need the backend.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_io(bundle.spec, {i.name: tuple(i.shape) for i in session.get_inputs()},
             {o.name: tuple(o.shape) for o in session.get_outputs()}, where=str(path))
