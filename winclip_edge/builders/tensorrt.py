"""``winclip-edge build-engine``: the bundle's ``visual.onnx`` -> a TensorRT plan for this GPU, cached by key.

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
  cache is written next to the plans and reused when no images are given.
- A timing cache per device and TensorRT version makes rebuilds (other precision, other batch) faster.

fp16 and int8 use TensorRT's weakly typed builder (precision flags, layer precision constraints, the INT8
calibrator): TensorRT 8.5 to 10.x, i.e. every JetPack. TensorRT 11 dropped it (strongly typed networks
only); there only fp32 is built, and fp16/int8 are refused with that explanation.
"""
from __future__ import annotations

import re
import sys
import time
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
    default_engine_dir,
    save_engine,
    slug,
)
from ..engines.tensorrt import Cuda, TensorInfo, check_engine_io, load_cudart, load_tensorrt, stderr_logger
from ..fileio import atomic_write_bytes
from ..preprocess import ImageError, read_image, resize_to_model

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


def keep_fp32(network: Any, trt: Any) -> int:
    """Constrain :func:`fp32_layers` to FP32 maths and FP32 outputs (needs OBEY_PRECISION_CONSTRAINTS); returns how many."""
    layers = fp32_layers(network, trt)
    for layer in layers:
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
    return len(layers)


# ---------------------------------------------------------------- INT8 calibration
def calibration_batches(paths: Sequence[str | Path], image_size: tuple[int, int], batch_size: int,
                        log: Callable[[str], None] = _log) -> Iterator[np.ndarray]:
    """uint8 ``[batch_size, H, W, 3]`` batches through the runtime's own decode + resize. Unreadable images are
    skipped with a message; images that do not fill a last batch are left out (said so)."""
    batch: list[np.ndarray] = []
    used = skipped = 0
    for path in paths:
        try:
            batch.append(resize_to_model(read_image(path), image_size))
        except ImageError as err:
            skipped += 1
            log(f"calibration: skipped {err}")
            continue
        if len(batch) == batch_size:
            used += batch_size
            yield np.stack(batch)
            batch = []
    if batch:
        log(f"calibration: the last {len(batch)} image(s) do not fill a batch of {batch_size} and are left out")
    log(f"calibration: {used} image(s) used in batches of {batch_size}, {skipped} unreadable")


class CalibrationFeed:
    """An INT8 calibrator's work, apart from being a TensorRT object: one batch at a time into device memory,
    and the calibration cache. ``batches=None``: no images, TensorRT reads the cache instead."""

    def __init__(self, cuda: Cuda, batches: Iterator[np.ndarray] | None, batch_shape: tuple[int, int, int, int],
                 cache: Path, log: Callable[[str], None] = _log):
        self.cuda, self.batches, self.batch_shape, self.cache, self.log = cuda, batches, batch_shape, cache, log
        self.given = 0  # batches handed to TensorRT
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
    """The TensorRT entropy calibrator (v2) that hands every call to ``feed``."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return feed.get_batch_size()

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            return feed.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return feed.read_calibration_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            feed.write_calibration_cache(cache)

    return EntropyCalibrator()


# ---------------------------------------------------------------- the build
def _network_flags(trt: Any) -> int:
    """TensorRT 8.x: explicit batch must be asked for; 10.x: always on (the flag is deprecated there)."""
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return 0 if explicit is None or _version(trt.__version__) >= (10,) else 1 << int(explicit)


def parse_onnx(parser: Any, path: Path, trt_version: str, log: Callable[[str], None] = _log) -> None:
    """Parse ``path``; on failure print every parser error, then raise with what to do."""
    if parser.parse_from_file(str(path)):
        return
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for i, error in enumerate(errors, 1):
        log(f"ONNX parser error {i}/{len(errors)}: {error}")
    hint = ""
    if _version(trt_version) < LAYERNORM_IMPORT_TRT and any("LayerNormalization" in e for e in errors):
        hint = (f" TensorRT {trt_version} cannot import LayerNormalization (ONNX opset {LAYERNORM_OPSET}): re-export "
                f"the bundle with `winclip-edge export ... --opset {LAYERNORM_OPSET - 1}` (see docs/jetson.md).")
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


def build_engine(bundle: Bundle, options: BuildOptions, log: Callable[[str], None] = _log) -> CachedEngine:
    """Build, check and cache the plan of ``bundle`` for the GPU this runs on."""
    trt = load_tensorrt()
    cuda = Cuda(load_cudart())
    device = cuda.device_info(trt.__version__)
    spec = bundle.spec
    engine_dir = Path(options.engine_dir) if options.engine_dir is not None else default_engine_dir(bundle.root)
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
    logger = stderr_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    parse_onnx(parser, bundle.onnx_path, device.trt_version, log)
    check_engine_io(spec, network_io(network, trt), where=f"{bundle.onnx_path} as parsed by TensorRT")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * GIB))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *p.shapes(spec.image_size))
    config.add_optimization_profile(profile)
    kept = 0
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = keep_fp32(network, trt)
        log(f"{kept} layer(s) kept in FP32 (LayerNorm, L2 norm)")
    feed = None
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        feed = _calibrator(trt, cuda, builder, config, spec, options,
                           calibration_cache_path(engine_dir, onnx_sha, device.trt_version), log)

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
    seconds = time.perf_counter() - t0
    if plan is None:
        if feed is not None and feed.batches is not None and feed.given == 0:
            raise EngineBuildError(f"INT8 calibration got no batch: none of the {len(options.calibration_images)} "
                                   "calibration images could be read (messages above)")
        raise EngineBuildError(f"TensorRT could not build the engine (messages above); a larger --workspace-gib "
                               f"(now {options.workspace_gib}) or a smaller --max-batch (now {p.max}) may help")
    atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
    build = {"seconds": round(seconds, 1), "workspace_gib": options.workspace_gib, "fp32_layers": kept,
             "tf32": options.precision != "fp32", "onnx_opset": bundle.manifest.opset}
    if feed is not None:
        build["calibration"] = {"images": len(options.calibration_images), "batches": feed.given,
                                "batch_size": feed.get_batch_size(), "cache": feed.cache.name}
    path = save_engine(engine_dir, key, bytes(plan), build)
    log(f"built in {seconds:.0f} s -> {path}")
    return CachedEngine(plan=path, key=key, build=build)
