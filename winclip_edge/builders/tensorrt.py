"""``winclip-edge engine build``: the bundle's ``visual.onnx`` -> a TensorRT plan for this GPU, cached by key.

Building and running are separate programs (NVIDIA's samples do the same): a build takes minutes, is done
once per device, TensorRT version, precision and graph, and its plan is cached (engine_cache.py).

- Dynamic batch: one optimisation profile over the batch axis, ``min 1 .. opt .. max``.
- fp32 means FP32: TF32 (TensorRT's default on Ampere and newer) is switched off, so the plan is the
  reference the lower precisions are compared to.
- fp16 / int8: LayerNorm and the L2 norm of the outputs stay FP32 (:func:`fp32_layers`). A LayerNorm
  in FP16 sums squares of residual-stream values that can exceed FP16's 65504 (TensorRT warns about
  exactly this), and the squared norm of a patch token can too.
- int8: implicit quantisation with the entropy calibrator, fed with normal images of the product
  through the runtime's own pre-processing; FP16 is allowed where INT8 has no kernel. The calibration
  cache is written next to the plans and reused when no images are given. An exception inside the
  calibrator (TensorRT's binding would log it and end calibration early) is kept and raised after the build.
  TensorRT 10.1 deprecated this calibrator API in favour of explicit (Q/DQ) quantisation; it still builds
  through 10.x, so its deprecation warnings are replaced by one log line.
- What was built is read back, not assumed: the plan is built with detailed profiling verbosity and its
  layers' output precisions are read with TensorRT's engine inspector (:func:`layer_precisions`). FP32
  constraints on layers that TensorRT fuses into one transformer kernel (Myelin, 8.6+) cannot be seen
  there; the build record says how many were seen FP32 and how many disappeared into fused regions.
- A timing cache per device and TensorRT version makes rebuilds (other precision, other batch) faster.

fp16 and int8 use TensorRT's weakly typed builder (precision flags, layer precision constraints, the INT8
calibrator): TensorRT 8.5 to 10.x, i.e. every JetPack. TensorRT 11 dropped it (strongly typed networks
only); there only fp32 is built, and fp16/int8 are refused with that explanation.
"""
from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..bundle import VISUAL_ONNX, Bundle
from ..contract import INPUT_NAME, GraphSpec
from ..engines.base import EngineError
from ..engines.engine_cache import (
    SHORT_SHA,
    BatchProfile,
    CachedEngine,
    DeviceInfo,
    EngineKey,
    save_engine,
    slug,
)
from ..engines.cache_dir import engine_dir as engine_folder
from ..engines.tensorrt import Cuda, TensorInfo, check_engine_io, load_cudart, load_tensorrt, stderr_logger
from ..fileio import atomic_write_bytes
from ..samples import load_model_inputs

DEFAULT_MAX_BATCH = 8  # the runtime's default --batch
DEFAULT_WORKSPACE_GIB = 2.0  # fits the 8 GB Jetson Orin Nano next to the runtime; desktops may give more
GIB = 1 << 30
# First TensorRT whose ONNX parser imports LayerNormalization (ONNX opset 17); JetPack 5.x has 8.5.
LAYERNORM_IMPORT_TRT = (8, 6)
LAYERNORM_OPSET = 17
# ONNX node names (torch.onnx scopes of open_clip's VisionTransformer) whose maths stays FP32: the LayerNorms
# ln_pre / ln_1 / ln_2 / ln_post (one LayerNormalization node at opset >= 17, a ReduceMean/Sub/Pow/Sqrt/Div
# chain at opset 16; '_<n>' suffixes for repeated calls) and the ReduceL2 of the output normalisation.
FP32_NAME = re.compile(r"(?:^|/)ln_(?:pre|post|\d+)(?:_\d+)?/|LayerNormalization|ReduceL2")
NODE_OUTPUT = re.compile(r"_output_\d+$")  # torch.onnx names a node's outputs '<node name>_output_<i>'
# TensorRT 10.1 deprecated the implicit-quantisation calibrator API (superseded by explicit Q/DQ quantisation).
CALIBRATOR_DEPRECATED_TRT = (10, 1)
# The ONNX parser logs (INFO) the op it has no importer for; its error then only names the plugin fallback.
NO_IMPORTER = re.compile(r"No importer registered for op: (\w+)")
UINT8_INTERMEDIATE = "UINT8 types for intermediate tensors"
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")  # the engine inspector's Metadata of a layer (TensorRT 10)
# TensorRT's default name of a tensor nobody named: the ONNX parser names each node's outputs after the
# ONNX graph, so an unnamed tensor joins two layers of the same ONNX node.
AUTO_TENSOR = "(Unnamed Layer"


class EngineBuildError(EngineError):
    """TensorRT cannot parse the graph or build the plan, or the build inputs are missing."""


def _log(message: str) -> None:
    print(f"[build-engine] {message}", file=sys.stderr, flush=True)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", text)[:3])


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"  # fp32 | fp16 | int8
    profile: BatchProfile = BatchProfile(min=1, opt=DEFAULT_MAX_BATCH, max=DEFAULT_MAX_BATCH)
    workspace_gib: float = DEFAULT_WORKSPACE_GIB  # TensorRT's scratch memory limit while building and running
    calibration_images: tuple[str, ...] = ()  # int8: normal images of the product; () = reuse the calibration cache
    engine_dir: Path | None = None  # default <bundle>/engines


def timing_cache_path(engine_dir: Path, device: DeviceInfo) -> Path:
    return engine_dir / f"timing-{slug(device.gpu)}-{device.sm}-trt{slug(device.trt_version)}.cache"


def calibration_cache_path(engine_dir: Path, onnx_sha256: str, trt_version: str) -> Path:
    """INT8 scales depend on the graph and the TensorRT version (it checks its own header), not on the GPU."""
    return engine_dir / f"calibration-{onnx_sha256[:SHORT_SHA]}-trt{slug(trt_version)}.cache"


# ---------------------------------------------------------------- layers kept in FP32
def _outputs(layer: Any) -> list[Any]:
    return [layer.get_output(i) for i in range(layer.num_outputs)]


def _inputs(layer: Any) -> list[Any]:
    return [t for t in (layer.get_input(i) for i in range(layer.num_inputs)) if t is not None]


def fp32_layers(network: Any, trt: Any) -> list[Any]:
    """The layers of LayerNorms and L2 norms, found by layer type (INormalizationLayer, TensorRT >= 8.6), by
    ONNX node name, and by a node's named output; then grown over unnamed tensors to the other layers the
    parser made for the same ONNX node (e.g. square -> reduce -> sqrt of a ReduceL2). Constants join but are
    not grown from (one weight can feed several nodes). Layers with a non-float output (shapes) are left out."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for layer in layers:
        for t in _outputs(layer):
            producer[t.name] = layer
        for t in _inputs(layer):
            consumers.setdefault(t.name, []).append(layer)
    normalization = getattr(trt.LayerType, "NORMALIZATION", None)
    floats = {trt.float32, trt.float16}

    def is_seed(layer: Any) -> bool:
        return ((normalization is not None and layer.type == normalization) or bool(FP32_NAME.search(layer.name))
                or any(NODE_OUTPUT.search(t.name) and FP32_NAME.search(t.name) for t in _outputs(layer)))

    chosen: dict[int, Any] = {}
    stack = [layer for layer in layers if is_seed(layer)]
    while stack:
        layer = stack.pop()
        if id(layer) in chosen:
            continue
        chosen[id(layer)] = layer
        stack += [producer[t.name] for t in _inputs(layer) if t.name.startswith(AUTO_TENSOR) and t.name in producer]
        if layer.type != trt.LayerType.CONSTANT:
            stack += [c for t in _outputs(layer) if t.name.startswith(AUTO_TENSOR) for c in consumers.get(t.name, [])]
    return [layer for layer in layers if id(layer) in chosen and all(t.dtype in floats for t in _outputs(layer))]


def keep_fp32(network: Any, trt: Any) -> list[Any]:
    """Constrain :func:`fp32_layers` to FP32 maths and FP32 outputs (needs OBEY_PRECISION_CONSTRAINTS); returns them.
    A request, not a guarantee: :func:`layer_precisions` reads back what TensorRT built."""
    layers = fp32_layers(network, trt)
    for layer in layers:
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
    return layers


# ---------------------------------------------------------------- INT8 calibration
def calibration_batches(paths: Sequence[str | Path], image_size: tuple[int, int], batch_size: int,
                        log: Callable[[str], None] = _log) -> Iterator[np.ndarray]:
    """uint8 ``[batch_size, H, W, 3]`` batches of the one loader of model inputs (samples.py: the runtime's own
    decode + resize), read a batch at a time as TensorRT asks. Unreadable images are skipped with a message;
    images that do not fill a last batch are left out (said so)."""
    paths = [str(p) for p in paths]
    used = skipped = start = 0
    while start < len(paths):
        loaded = load_model_inputs(image_size, paths[start:], limit=batch_size)
        start += loaded.tried
        skipped += len(loaded.skipped)
        for _, why in loaded.skipped:
            log(f"calibration: skipped {why}")
        if len(loaded.images) < batch_size:
            if len(loaded.images):
                log(f"calibration: the last {len(loaded.images)} image(s) do not fill a batch of {batch_size} and "
                    "are left out")
            break
        used += batch_size
        yield loaded.images
    log(f"calibration: {used} image(s) used in batches of {batch_size}, {skipped} unreadable")


class CalibrationFeed:
    """An INT8 calibrator's work, apart from being a TensorRT object: one batch at a time into device memory,
    and the calibration cache. ``batches=None``: no images, TensorRT reads the cache instead."""

    def __init__(self, cuda: Cuda, batches: Iterator[np.ndarray] | None, batch_shape: tuple[int, int, int, int],
                 cache: Path, log: Callable[[str], None] = _log):
        self.cuda, self.batches, self.batch_shape, self.cache, self.log = cuda, batches, batch_shape, cache, log
        self.given = 0  # batches handed to TensorRT
        self.error: BaseException | None = None  # the first exception raised inside a calibrator call
        nbytes = int(np.prod(batch_shape))  # uint8
        self.device_pointer = int(cuda.call("cudaMalloc", nbytes)) if batches is not None else 0

    def get_batch_size(self) -> int:
        return self.batch_shape[0]

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """Device pointers for ``names`` (the graph has one input), or None when the images are used up."""
        batch = next(self.batches, None) if self.batches is not None else None
        if batch is None:
            return None
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        self.cuda.call("cudaMemcpy", self.device_pointer, batch.ctypes.data, batch.nbytes,
                       self.cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        self.given += 1
        self.log(f"calibration batch {self.given} ({batch.shape[0]} images)")
        return [self.device_pointer for _ in names]

    def read_calibration_cache(self) -> bytes | None:
        if self.batches is None and self.cache.is_file():
            self.log(f"using the INT8 calibration cache {self.cache}")
            return self.cache.read_bytes()
        return None

    def write_calibration_cache(self, cache: Any) -> None:
        atomic_write_bytes(self.cache, bytes(cache))
        self.log(f"INT8 calibration cache written to {self.cache}")

    def free(self) -> None:
        if self.device_pointer:
            self.cuda.call("cudaFree", self.device_pointer)
            self.device_pointer = 0


def make_calibrator(trt: Any, feed: CalibrationFeed) -> Any:
    """The TensorRT entropy calibrator (v2) that hands every call to ``feed``. TensorRT's binding catches an
    exception raised in a calibrator method, logs it and carries on as if the images had run out; so every call
    keeps its exception in ``feed.error`` (the build raises it afterwards) and ends calibration at once."""

    def guarded(call: Callable[..., Any], *args: Any) -> Any:
        if feed.error is not None:
            return None
        try:
            return call(*args)
        except BaseException as err:  # noqa: BLE001  (re-raised by build_engine after the build)
            feed.error = err
            return None

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return feed.get_batch_size()

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            return guarded(feed.get_batch, names)

        def read_calibration_cache(self) -> bytes | None:
            return guarded(feed.read_calibration_cache)

        def write_calibration_cache(self, cache: Any) -> None:
            guarded(feed.write_calibration_cache, cache)

    return EntropyCalibrator()


# ---------------------------------------------------------------- the build
def _network_flags(trt: Any) -> int:
    """TensorRT 8.x: explicit batch must be asked for; 10.x: always on (the flag is deprecated there)."""
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return 0 if explicit is None or _version(trt.__version__) >= (10,) else 1 << int(explicit)


def parse_onnx(parser: Any, path: Path, trt_version: str, log: Callable[[str], None] = _log,
               messages: Sequence[str] = ()) -> None:
    """Parse ``path``; on failure print every parser error, then raise with what to do. ``messages``: what the
    TensorRT logger received while parsing (INFO included): an op without importer is named only there; the
    parser error itself says "Plugin not found" from the plugin fallback (onnx-tensorrt ModelImporter)."""
    if parser.parse_from_file(str(path)):
        return
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for i, error in enumerate(errors, 1):
        log(f"ONNX parser error {i}/{len(errors)}: {error}")
    unimported = {m.group(1) for m in map(NO_IMPORTER.search, messages) if m}
    plugin_fallback = any("Plugin not found" in e or "FallbackPluginImporter" in e for e in errors)
    hint = ""
    if "LayerNormalization" in unimported or (_version(trt_version) < LAYERNORM_IMPORT_TRT and plugin_fallback
                                              and not unimported):
        hint = (f" TensorRT {trt_version} cannot import LayerNormalization (ONNX opset {LAYERNORM_OPSET}): re-export "
                f"the bundle with `winclip-edge export ... --opset {LAYERNORM_OPSET - 1}` (see docs/jetson.md).")
    elif unimported:
        hint = f" TensorRT {trt_version} has no importer for ONNX op(s) {sorted(unimported)}."
    if any(UINT8_INTERMEDIATE in e for e in errors):
        hint += (" The graph computes on uint8 tensors before casting its input to float (an export older than this "
                 "winclip-edge): re-export the bundle with `winclip-edge export`.")
    raise EngineBuildError(f"TensorRT {trt_version} cannot parse {path}: {len(errors)} error(s) listed above.{hint}")


def network_io(network: Any, trt: Any) -> dict[str, TensorInfo]:
    tensors = [(network.get_input(i), True) for i in range(network.num_inputs)]
    tensors += [(network.get_output(i), False) for i in range(network.num_outputs)]
    return {t.name: TensorInfo(is_input=is_input, shape=tuple(t.shape), dtype=np.dtype(trt.nptype(t.dtype)))
            for t, is_input in tensors}


def _calibrator(trt: Any, cuda: Cuda, builder: Any, config: Any, spec: GraphSpec, options: BuildOptions,
                cache: Path, log: Callable[[str], None]) -> CalibrationFeed:
    images = options.calibration_images
    if not images and not cache.is_file():
        raise EngineBuildError(f"int8 needs calibration images: pass --calibration-images DIR (normal images of the "
                               f"product, a few hundred) or keep a calibration cache at {cache}")
    n = min(options.profile.opt, len(images)) if images else options.profile.opt
    shape = (n, *spec.image_size, 3)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shape, shape, shape)
    config.set_calibration_profile(profile)
    feed = CalibrationFeed(cuda, calibration_batches(images, spec.image_size, n, log) if images else None, shape,
                           cache, log)
    config.int8_calibrator = make_calibrator(trt, feed)
    return feed


def _precision_of(datatype: str) -> str:
    """'Row major linear FP32' / 'Float' / 'Half' / 'Int8 ...' (the inspector's Format/Datatype) -> fp32 | fp16 |
    int8 | other | unknown ('N/A due to dynamic shapes' without an execution context)."""
    text = datatype.lower()
    for precision, words in (("fp16", ("fp16", "half")), ("int8", ("int8",)), ("fp32", ("fp32", "float"))):
        if any(re.search(rf"\b{w}\b", text) for w in words):
            return precision
    return "unknown" if not text or "n/a" in text else "other"


def layer_precisions(engine_information: str, kept_fp32: Sequence[str]) -> dict:
    """What the built engine computes in, from TensorRT's engine inspector (JSON, ``ProfilingVerbosity.DETAILED``):
    layers by output precision, fused (Myelin) regions, and where the layers constrained to FP32 ended up:
    ``fp32_seen`` (an engine layer of that name outputs FP32), ``fp32_lost`` (seen, but not FP32: the constraint
    was not honoured), ``fp32_not_visible`` (fused away: no engine layer carries the name)."""
    layers = json.loads(engine_information).get("Layers", [])
    precisions: Counter = Counter()
    by_name: dict[str, str] = {}
    fused = 0
    for layer in layers:
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY: names as strings, no precisions
            precisions["unknown"] += 1
            continue
        name = str(layer.get("Name", ""))
        outputs = [_precision_of(str(t.get("Format/Datatype", ""))) for t in layer.get("Outputs", []) if isinstance(t, dict)]
        precision = next((p for p in ("fp16", "int8", "fp32") if p in outputs), outputs[0] if outputs else "unknown")
        precisions[precision] += 1
        if layer.get("LayerType") in ("Myelin", "kgen") or name.startswith(("{ForeignNode", "__myl")):
            fused += 1
        # TensorRT names a fused layer after its parts; 10.x adds the ONNX nodes in "Metadata" (also in Myelin kernels)
        for part in [*name.split(" + "), *ONNX_LAYER.findall(str(layer.get("Metadata", "")))]:
            by_name[part.strip()] = precision
    seen = [n for n in kept_fp32 if n in by_name]
    return {"layers": len(layers), "precisions": dict(sorted(precisions.items())), "fused_regions": fused,
            "fp32_requested": len(kept_fp32), "fp32_seen": sum(by_name[n] == "fp32" for n in seen),
            "fp32_lost": sorted(n for n in seen if by_name[n] not in ("fp32", "unknown")),
            "fp32_not_visible": len(kept_fp32) - len(seen)}


def inspect_plan(trt: Any, plan: bytes, spec: GraphSpec, opt_batch: int, kept_fp32: Sequence[str]) -> dict:
    """:func:`layer_precisions` of a serialised plan, with an execution context at the opt batch (without one the
    inspector reports no formats for dynamic shapes). Never fails the build: a problem becomes ``{"error": ...}``."""
    try:
        engine = trt.Runtime(stderr_logger(trt)).deserialize_cuda_engine(plan)
        context = engine.create_execution_context() if engine is not None else None
        if context is None:
            return {"error": "the plan could not be loaded for inspection (messages above)"}
        context.set_input_shape(INPUT_NAME, (opt_batch, *spec.image_size, 3))
        inspector = engine.create_engine_inspector()
        # the attribute is `context` in the TensorRT 8.5 bindings, `execution_context` in later ones
        setattr(inspector, "execution_context" if hasattr(inspector, "execution_context") else "context", context)
        return layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON), kept_fp32)
    except Exception as err:  # noqa: BLE001  (the plan is fine; only its report is missing)
        return {"error": f"{type(err).__name__}: {err}"}


def describe_precisions(report: dict) -> str:
    """One line of :func:`layer_precisions` for the build log and the CLI."""
    if "error" in report:
        return f"layer precisions not inspected ({report['error']})"
    text = "engine layers by output precision: " + ", ".join(f"{k} {v}" for k, v in report["precisions"].items())
    if report["fused_regions"]:
        text += f"; {report['fused_regions']} fused transformer (Myelin) region(s)"
    if report["fp32_requested"]:
        text += (f"; FP32 asked for {report['fp32_requested']} layer(s): {report['fp32_seen']} seen FP32, "
                 f"{report['fp32_not_visible']} fused where TensorRT does not report their precision")
        if report["fp32_lost"]:
            text += f", {len(report['fp32_lost'])} NOT FP32 ({', '.join(report['fp32_lost'][:5])})"
    return text


def build_engine(bundle: Bundle, options: BuildOptions, log: Callable[[str], None] = _log) -> CachedEngine:
    """Build, check and cache the plan of ``bundle`` for the GPU this runs on."""
    trt = load_tensorrt()
    cuda = Cuda(load_cudart())
    device = cuda.device_info(trt.__version__)
    spec = bundle.spec
    engine_dir = engine_folder(bundle, options.engine_dir)
    onnx_sha = bundle.manifest.files[VISUAL_ONNX]
    key = EngineKey(device=device, precision=options.precision, onnx_sha256=onnx_sha, profile=options.profile)
    p = options.profile
    if options.precision != "fp32" and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineBuildError(f"TensorRT {device.trt_version} builds strongly typed networks only (no FP16/INT8 builder "
                               f"flags, TensorRT >= 11): build --precision fp32 with it, or use TensorRT 8.5-10.x for "
                               f"{options.precision} (JetPack's; on a desktop pip install 'tensorrt<11')")
    log(f"{options.precision} engine for {device.describe()}, batch {p.min}..{p.max} (opt {p.opt}), "
        f"from {bundle.onnx_path}")
    if _version(device.trt_version) < LAYERNORM_IMPORT_TRT and bundle.manifest.opset >= LAYERNORM_OPSET:
        log(f"warning: the bundle is ONNX opset {bundle.manifest.opset}; TensorRT {device.trt_version} may not import "
            f"its LayerNormalization nodes (re-export with --opset {LAYERNORM_OPSET - 1} if parsing fails)")
    messages: list[str] = []
    logger = stderr_logger(trt, listener=messages.append)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    parse_onnx(parser, bundle.onnx_path, device.trt_version, log, messages)
    messages.clear()  # only the parser's messages are needed
    check_engine_io(spec, network_io(network, trt), where=f"{bundle.onnx_path} as parsed by TensorRT")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * GIB))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions readable afterwards
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *p.shapes(spec.image_size))
    config.add_optimization_profile(profile)
    kept: list[str] = []
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = [layer.name for layer in keep_fp32(network, trt)]
        log(f"FP32 asked for {len(kept)} layer(s) (LayerNorm, L2 norm); what was built is inspected afterwards")
    feed = None
    deprecated = options.precision == "int8" and _version(device.trt_version) >= CALIBRATOR_DEPRECATED_TRT
    if deprecated:
        log(f"note: TensorRT {device.trt_version} deprecates implicit INT8 calibration (IInt8Calibrator) in favour of "
            "explicit Q/DQ quantisation; it still builds through 10.x (TensorRT 11 removed it), so its "
            "DeprecationWarnings are silenced here")
    with warnings.catch_warnings():
        if deprecated:  # said once above; the binding would warn on every calibrator call
            warnings.simplefilter("ignore", DeprecationWarning)
        if options.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            feed = _calibrator(trt, cuda, builder, config, spec, options,
                               calibration_cache_path(engine_dir, onnx_sha, device.trt_version), log)
        seconds, plan = _build(builder, network, config, engine_dir, device, feed, log)
    if feed is not None and feed.error is not None:
        raise EngineBuildError(f"INT8 calibration failed after {feed.given} batch(es): {type(feed.error).__name__}: "
                               f"{feed.error}; no engine was written") from feed.error
    if plan is None:
        if feed is not None and feed.batches is not None and feed.given == 0:
            raise EngineBuildError(f"INT8 calibration got no batch: none of the {len(options.calibration_images)} "
                                   "calibration images could be read (messages above)")
        raise EngineBuildError(f"TensorRT could not build the engine (messages above); a larger --workspace-gib "
                               f"(now {options.workspace_gib}) or a smaller --max-batch (now {p.max}) may help")
    atomic_write_bytes(timing_cache_path(engine_dir, device), bytes(config.get_timing_cache().serialize()))
    report = inspect_plan(trt, bytes(plan), spec, p.opt, kept)
    log(describe_precisions(report))
    build = {"seconds": round(seconds, 1), "workspace_gib": options.workspace_gib, "fp32_layers": len(kept),
             "tf32": options.precision != "fp32", "onnx_opset": bundle.manifest.opset, "layer_precisions": report}
    if feed is not None:
        build["calibration"] = {"images": len(options.calibration_images), "batches": feed.given,
                                "batch_size": feed.get_batch_size(), "cache": feed.cache.name}
    path = save_engine(engine_dir, key, bytes(plan), build)
    log(f"built in {seconds:.0f} s -> {path}")
    return CachedEngine(plan=path, key=key, build=build)


def _build(builder: Any, network: Any, config: Any, engine_dir: Path, device: DeviceInfo,
           feed: CalibrationFeed | None, log: Callable[[str], None]) -> tuple[float, Any]:
    """The timing cache, then the build itself: (seconds, serialised plan or None)."""

    timing_path = timing_cache_path(engine_dir, device)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if not config.set_timing_cache(timing, False):
        log(f"timing cache {timing_path} was made elsewhere; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    log("building (minutes; TensorRT times its kernels on this GPU) ...")
    t0 = time.perf_counter()
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if feed is not None:
            feed.free()
    return time.perf_counter() - t0, plan
