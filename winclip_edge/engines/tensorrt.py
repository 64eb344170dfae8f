"""Native TensorRT backend: a cached plan (see engine_cache.py), run with the name-based tensor API.

TensorRT >= 8.5 (JetPack 5.1+, JetPack 6.x, desktop 10.x): ``num_io_tensors`` / ``get_tensor_*``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``. CUDA memory and the stream come from
cuda-python's runtime API, every call through one checker that names the failed call (as NVIDIA's
``samples/python/common_runtime.py``). Buffers are allocated once for the largest batch of the engine's
profile, bound by name from the engine's own tensor table; one stream, one synchronise per batch.

Both libraries are imported lazily (:func:`load_tensorrt`, :func:`load_cudart`), so importing this
module costs nothing on a machine without them.
"""
from __future__ import annotations

import ctypes
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..bundle import VISUAL_ONNX, Bundle
from ..contract import INPUT_DTYPE, INPUT_NAME, ContractError, GraphSpec, check_io
from .base import EngineError
from .cache_dir import engine_dir
from .config import PRECISIONS, EngineConfig
from .engine_cache import DeviceInfo, find_engine
from .registry import BackendRecord, installed

OUTPUT_DTYPE = np.float32  # every output of the contract
PROFILE_INDEX = 0  # build-engine makes exactly one optimisation profile
DEFAULT_PRECISION = "fp16"  # what build-engine makes by default, so --backend tensorrt without --precision finds it


@dataclass(frozen=True)
class TensorRTOptions:
    """What only the TensorRT backend takes (EngineConfig.options)."""

    max_batch: Optional[int] = None  # load the plan with this profile maximum (default: the largest cached one)


# ---------------------------------------------------------------- the two lazily imported libraries
def load_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as err:
        raise EngineError(f"TensorRT is not installed ({err}). Jetson: it comes with JetPack (python3-libnvinfer), "
                          "see docs/jetson.md; desktop: pip install 'winclip-edge[trt]'") from None
    return tensorrt


def load_cudart() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6) or ``cuda.cudart`` (older)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as err:
            raise EngineError(f"cuda-python is not installed ({err}); pip install cuda-python "
                              "(its major version must match the CUDA of the machine, see docs/jetson.md)") from None
    return runtime


class Cuda:
    """The CUDA runtime calls the backend needs, each checked: a failure raises :class:`EngineError` naming the call."""

    def __init__(self, cudart: Any):
        self.rt = cudart

    def call(self, name: str, *args: Any) -> Any:
        err, *values = getattr(self.rt, name)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, error_name = self.rt.cudaGetErrorName(err)
            _, error_text = self.rt.cudaGetErrorString(err)
            raise EngineError(f"CUDA call {name} failed: {_text(error_name)} ({_text(error_text)})")
        return values[0] if len(values) == 1 else tuple(values)

    def device_info(self, trt_version: str) -> DeviceInfo:
        device = self.call("cudaGetDevice")
        props = self.call("cudaGetDeviceProperties", device)
        return DeviceInfo(gpu=_text(props.name), compute_capability=(int(props.major), int(props.minor)),
                          trt_version=trt_version)

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
        """Page-locked host memory seen as a numpy array (asynchronous copies need it) -> (array, pointer)."""
        dtype = np.dtype(dtype)
        pointer = int(self.call("cudaMallocHost", int(np.prod(shape)) * dtype.itemsize))
        ctype = ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctype), shape), pointer

    def copy_to_device(self, device: int, host: int, nbytes: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync", device, host, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def copy_to_host(self, host: int, device: int, nbytes: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync", host, device, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)


def _text(value: Any) -> str:
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).rstrip("\x00").strip()


def stderr_logger(trt: Any, listener: Callable[[str], None] | None = None) -> Any:
    """A TensorRT logger that prints warnings and errors on stderr (stdout stays for results); ``listener``
    sees every message, INFO included (the ONNX parser names an op it cannot import only at INFO)."""

    class StderrLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if listener is not None:
                listener(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {severity.name}: {msg}", file=sys.stderr, flush=True)

    return StderrLogger()


# ---------------------------------------------------------------- the engine's tensor table vs the contract
@dataclass(frozen=True)
class TensorInfo:
    is_input: bool
    shape: tuple[int, ...]  # -1 for a dynamic axis
    dtype: np.dtype


def io_table(engine: Any, trt: Any) -> dict[str, TensorInfo]:
    """The engine's own IO tensors, by name (never by position)."""
    table = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        table[name] = TensorInfo(is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                 shape=tuple(engine.get_tensor_shape(name)),
                                 dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
    return table


def check_engine_io(spec: GraphSpec, table: dict[str, TensorInfo], where: str) -> None:
    """Names and shapes through :func:`contract.check_io`, then the dtypes (uint8 in, float32 out)."""
    inputs = {n: t.shape for n, t in table.items() if t.is_input}
    outputs = {n: t.shape for n, t in table.items() if not t.is_input}
    check_io(spec, inputs, outputs, where)
    if len(inputs) != 1:
        raise ContractError(f"{where}: inputs {sorted(inputs)}, the contract has exactly one ('{INPUT_NAME}')")
    for name, tensor in table.items():
        expected = np.dtype(INPUT_DTYPE) if tensor.is_input else np.dtype(OUTPUT_DTYPE)
        if tensor.dtype != expected:
            raise ContractError(f"{where}: tensor '{name}' has dtype {tensor.dtype}, the contract says {expected}; "
                                "rebuild the engine with `winclip-edge engine build`")


@dataclass
class _Binding:
    name: str
    host: np.ndarray  # pinned, [max batch, ...]
    host_pointer: int
    device_pointer: int  # 0 until allocated

    @property
    def bytes_per_image(self) -> int:
        return self.host[0].nbytes


class _DeviceMemory:
    """The buffers and the stream of one engine, apart from the engine object, so that a finalizer can free them
    when ``close()`` was forgotten (it must not hold a reference to the engine)."""

    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        self.bindings: list[_Binding] = []
        self.stream: Any = None

    def free(self, strict: bool = True) -> None:
        """Free everything; safe to call twice. ``strict=False`` (the finalizer, possibly at interpreter exit when
        CUDA may already be gone) ignores failed CUDA calls instead of raising."""
        calls = [("cudaFree", b.device_pointer) for b in self.bindings if b.device_pointer]
        calls += [("cudaFreeHost", b.host_pointer) for b in self.bindings]
        calls += [("cudaStreamDestroy", self.stream)] if self.stream is not None else []
        self.bindings, self.stream = [], None
        for name, handle in calls:
            try:
                self.cuda.call(name, handle)
            except EngineError:
                if strict:
                    raise


class TensorRTEngine:
    """Runs the bundle's visual graph with a TensorRT plan built on this device by ``winclip-edge engine build``.

    ``precision``: which cached plan to load (fp32 | fp16 | int8; default fp16). ``engine_dir``: where plans are cached
    (default ``<bundle>/engines``). ``TensorRTOptions.max_batch``: pick the plan with this profile maximum (default:
    the largest).
    Batches larger than the plan's maximum are run in slices of that maximum.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(backend="tensorrt")):
        options = config.options if config.options is not None else TensorRTOptions()
        precision, max_batch = config.precision or DEFAULT_PRECISION, options.max_batch
        trt = load_tensorrt()
        self.cuda = Cuda(load_cudart())
        self.spec = bundle.spec
        self._memory = _DeviceMemory(self.cuda)
        self._finalizer = weakref.finalize(self, self._memory.free, False)  # if close() is never called
        device = self.cuda.device_info(trt.__version__)
        cached = find_engine(engine_dir(bundle, config.engine_dir), device, precision,
                             bundle.manifest.files[VISUAL_ONNX], bundle.root, max_batch)
        self.plan = cached.plan
        self.device = f"{device.gpu} ({precision})"
        self._logger = stderr_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(cached.plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT {trt.__version__} cannot deserialise {cached.plan} (messages above); "
                              f"delete it and rebuild it with `winclip-edge engine build --bundle {bundle.root}`")
        table = io_table(self.engine, trt)
        check_engine_io(self.spec, table, where=str(cached.plan))
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, PROFILE_INDEX)[2][0])
        self.context = self.engine.create_execution_context()
        if self.context is None:  # TensorRT returns None (and logs why) when it cannot allocate the activations
            size = getattr(self.engine, "device_memory_size", None)
            need = f" (it needs {size / 2**20:.0f} MiB of activation memory)" if isinstance(size, int) else ""
            raise EngineError(f"TensorRT could not create an execution context for {self.plan}{need}: out of GPU "
                              "memory? Close other GPU programs or rebuild with a smaller --max-batch")
        try:
            self._allocate(table)
        except BaseException:
            self.close()
            raise

    def _allocate(self, table: dict[str, TensorInfo]) -> None:
        self._set_batch(self.max_batch)  # output shapes at the largest batch size the buffers must hold
        for name, tensor in table.items():
            shape = tuple(int(v) for v in self.context.get_tensor_shape(name))
            host, host_pointer = self.cuda.pinned(shape, tensor.dtype)
            binding = _Binding(name, host, host_pointer, device_pointer=0)
            self._memory.bindings.append(binding)  # tracked before the next allocation: freed if that fails
            binding.device_pointer = int(self.cuda.call("cudaMalloc", host.nbytes))
            if not self.context.set_tensor_address(name, binding.device_pointer):
                raise EngineError(f"TensorRT refused the address of tensor '{name}' ({self.plan})")
        self._memory.stream = self.stream = self.cuda.call("cudaStreamCreate")
        self._input = next(b for b in self._memory.bindings if b.name == INPUT_NAME)
        self._outputs = [b for b in self._memory.bindings if b.name != INPUT_NAME]

    def _set_batch(self, n: int) -> None:
        h, w = self.spec.image_size
        if not self.context.set_input_shape(INPUT_NAME, (n, h, w, 3)):
            raise EngineError(f"TensorRT refused input shape {(n, h, w, 3)} ({self.plan}; profile batch 1..{self.max_batch})")

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        h, w = self.spec.image_size
        if images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ContractError(f"{self.name}: input '{INPUT_NAME}' has shape {images.shape}, expected [N, {h}, {w}, 3]")
        n = images.shape[0]
        results = {b.name: np.empty((n, *b.host.shape[1:]), dtype=b.host.dtype) for b in self._outputs}
        for start in range(0, n, self.max_batch):
            stop = min(n, start + self.max_batch)
            count = stop - start
            self._set_batch(count)
            self._input.host[:count] = images[start:stop]
            self.cuda.copy_to_device(self._input.device_pointer, self._input.host_pointer,
                                     count * self._input.bytes_per_image, self.stream)
            if not self.context.execute_async_v3(int(self.stream)):
                raise EngineError(f"TensorRT execution failed for a batch of {count} ({self.plan}; messages above)")
            for out in self._outputs:
                self.cuda.copy_to_host(out.host_pointer, out.device_pointer, count * out.bytes_per_image, self.stream)
            self.cuda.call("cudaStreamSynchronize", self.stream)
            for out in self._outputs:
                results[out.name][start:stop] = out.host[:count]
        return results

    def close(self) -> None:
        """Free the buffers and the stream; safe to call twice. Forgotten, the same happens when the engine is
        garbage-collected (a finalizer)."""
        self._finalizer.detach()
        self.stream = None
        self._memory.free()
        self.context = self.engine = None


# ---------------------------------------------------------------- its record: tune, build-engine, the registry
def _candidates(tune) -> tuple[list[EngineConfig], list[tuple[EngineConfig, str]]]:
    """The fp16 and int8 plans (a missing one is skipped with the build-engine command that makes it)."""
    if not installed("tensorrt"):
        return [], [(EngineConfig(backend="tensorrt", precision="fp16"), "TensorRT is not installed (needs an NVIDIA GPU)")]
    return [EngineConfig(backend="tensorrt", precision=p) for p in ("fp16", "int8")], []


BACKEND = BackendRecord(
    name="tensorrt", create=TensorRTEngine, precisions=PRECISIONS, default_precision=DEFAULT_PRECISION,
    options=TensorRTOptions, takes=("engine_dir",), candidates=_candidates,
    builds="TensorRT plans per GPU, TensorRT version and precision (build-engine)", build_command="build-engine",
    packages=("tensorrt",), install="pip install 'winclip-edge[trt]' (Jetson: JetPack's python3-libnvinfer)",
    summary="TensorRT: a plan built on this GPU by build-engine, fp32 / fp16 / int8")
