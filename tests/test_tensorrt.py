"""TensorRT backend, engine building and the engine cache.

TensorRT and a GPU are not available in CI, so most tests run the real code against two fakes:
- ``FakeCudart``: cuda-python's runtime API over host memory. Pointers are real addresses, copies are real
  ``memmove`` calls, checked against the allocations (direction, bounds), so a wrong size or pointer fails.
- ``fake_tensorrt()``: the slice of the TensorRT Python API the backend uses. Its ONNX "parser" turns the
  bundle's real visual.onnx into layers (names, types, dtypes from ONNX shape inference), and its engine
  computes with ONNX Runtime, so the backend's buffers, binding and batching are checked against real numbers.
The test marked ``tensorrt`` builds and runs a real engine where TensorRT and a CUDA GPU exist.
"""
from __future__ import annotations

import ctypes
import enum
import json
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import textured_part

from winclip_edge import cli
from winclip_edge.builders import tensorrt as trt_build
from winclip_edge.builders.tensorrt import (
    BuildOptions,
    CalibrationFeed,
    EngineBuildError,
    build_engine,
    calibration_batches,
    describe_precisions,
    fp32_layers,
    layer_precisions,
)
from winclip_edge.bundle import VISUAL_ONNX, Bundle
from winclip_edge.contract import INPUT_NAME, ContractError, output_names
from winclip_edge.engines import EngineConfig, EngineError, create_engine
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines import tensorrt as trt_backend
from winclip_edge.engines.engine_cache import (
    BatchProfile,
    DeviceInfo,
    EngineCacheError,
    EngineKey,
    default_engine_dir,
    find_engine,
    plan_path,
    save_engine,
    slug,
)
from winclip_edge.engines.tensorrt import Cuda, TensorInfo, TensorRTEngine, check_engine_io, io_table
from winclip_edge.preprocess import read_image, resize_to_model

FAKE_GPU = b"Fake GPU 9000\x00\x00"  # CUDA pads device names with NULs
FAKE_CC = (8, 7)
FAKE_TRT = "10.3.0"
PLAN_MAGIC = b"FAKEPLAN"


# ---------------------------------------------------------------- fake cuda-python runtime
class FakeCudart:
    """cuda-python's runtime over host memory. Asynchronous copies and engine launches are queued on their stream and
    happen only at ``cudaStreamSynchronize`` (as on a GPU, where they finish later), so reading a result before the
    synchronise, or a copy from unpinned host memory, gives wrong numbers here too."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, fail: tuple[str, ...] = ()):
        self.buffers: dict[int, tuple[np.ndarray, str]] = {}  # pointer -> (memory, "device" | "host")
        self.calls: Counter = Counter()
        self.fail = set(fail)
        self.fail_after: dict[str, int] = {}  # call name -> how many calls succeed before it fails
        self.streams: dict[int, list] = {}  # stream -> queued work (callables), run at synchronise

    def _failing(self, name: str) -> bool:
        return name in self.fail or (name in self.fail_after and self.calls[name] > self.fail_after[name])

    def _result(self, name: str, *values):
        self.calls[name] += 1
        if self._failing(name):
            return (self.cudaError_t.cudaErrorMemoryAllocation, *(0 for _ in values))
        return (self.cudaError_t.cudaSuccess, *values)

    def _allocate(self, name: str, nbytes: int, kind: str):
        if name in self.fail:
            return self._result(name, 0)
        memory = np.zeros(max(int(nbytes), 1), np.uint8)
        self.buffers[memory.ctypes.data] = (memory, kind)
        return self._result(name, memory.ctypes.data)

    def _free(self, name: str, pointer: int, kind: str):
        assert not any(self.streams.values()), f"{name} while work is still queued on a stream"
        memory, actual = self.buffers.pop(pointer)  # KeyError: freed twice or never allocated
        assert actual == kind, f"{name} on {actual} memory"
        return self._result(name)

    def owner(self, pointer: int, nbytes: int) -> str | None:
        """'device' / 'host' when [pointer, pointer + nbytes) lies in one allocation; None for other host memory."""
        for start, (memory, kind) in self.buffers.items():
            if start <= pointer < start + memory.nbytes:
                assert pointer + nbytes <= start + memory.nbytes, f"copy of {nbytes} bytes overruns an allocation"
                return kind
        return None

    def enqueue(self, stream, work) -> None:
        assert int(stream) in self.streams, f"stream {stream} was not created (or already destroyed)"
        self.streams[int(stream)].append(work)

    def cudaMalloc(self, nbytes):
        return self._allocate("cudaMalloc", nbytes, "device")

    def cudaMallocHost(self, nbytes):
        return self._allocate("cudaMallocHost", nbytes, "host")

    def cudaFree(self, pointer):
        return self._free("cudaFree", pointer, "device")

    def cudaFreeHost(self, pointer):
        return self._free("cudaFreeHost", pointer, "host")

    def _check_copy(self, dst, src, nbytes, kind, pinned: bool):
        to_device = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        host_kinds = ("host",) if pinned else (None, "host")
        assert self.owner(dst, nbytes) == "device" if to_device else self.owner(dst, nbytes) in host_kinds
        assert self.owner(src, nbytes) in host_kinds if to_device else self.owner(src, nbytes) == "device"

    def cudaMemcpy(self, dst, src, nbytes, kind):
        if not self._failing("cudaMemcpy"):
            self._check_copy(dst, src, nbytes, kind, pinned=False)
            ctypes.memmove(dst, src, nbytes)
        return self._result("cudaMemcpy")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        """Queued: the bytes move at the stream's synchronise. Host memory must be pinned (page-locked)."""
        self._check_copy(dst, src, nbytes, kind, pinned=True)
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))
        return self._result("cudaMemcpyAsync")

    def cudaStreamCreate(self):
        stream = 7 + len(self.streams)
        self.streams[stream] = []
        return self._result("cudaStreamCreate", stream)

    def cudaStreamSynchronize(self, stream):
        work, self.streams[int(stream)] = self.streams[int(stream)], []
        for item in work:
            item()
        return self._result("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream):
        assert not self.streams.pop(int(stream)), "stream destroyed with unsynchronised work"
        return self._result("cudaStreamDestroy")

    def cudaGetDevice(self):
        return self._result("cudaGetDevice", 0)

    def cudaGetDeviceProperties(self, device):
        return self._result("cudaGetDeviceProperties", SimpleNamespace(name=FAKE_GPU, major=FAKE_CC[0], minor=FAKE_CC[1]))

    def cudaGetErrorName(self, err):
        return self.cudaError_t.cudaSuccess, err.name.encode()

    def cudaGetErrorString(self, err):
        return self.cudaError_t.cudaSuccess, b"out of memory"


def _view(pointer: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    ctype = ctypes.POINTER(np.ctypeslib.as_ctypes_type(np.dtype(dtype)))
    return np.ctypeslib.as_array(ctypes.cast(pointer, ctype), shape)


# ---------------------------------------------------------------- fake tensorrt
_ONNX_DTYPES = {1: np.dtype(np.float32), 2: np.dtype(np.uint8), 6: np.dtype(np.int32), 7: np.dtype(np.int64),
                9: np.dtype(np.bool_), 10: np.dtype(np.float16)}
_LAYER_TYPES = {"LayerNormalization": "NORMALIZATION", "Shape": "SHAPE", "MatMul": "MATRIX_MULTIPLY", "Cast": "CAST",
                "ReduceMean": "REDUCE", "Softmax": "SOFTMAX", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE",
                "Sub": "ELEMENTWISE", "Div": "ELEMENTWISE", "Pow": "ELEMENTWISE", "Sqrt": "UNARY", "Erf": "UNARY"}
# Ops whose weight inputs the parser turns into Constant layers (others read weights as parameters).
_TENSOR_WEIGHT_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "LayerNormalization", "Concat", "Where",
                      "Gather", "Equal"}
# What each ONNX element type looks like in the engine inspector's "Format/Datatype".
_INSPECTOR_FORMATS = {"fp32": "Row major linear FP32", "fp16": "Row major linear FP16 format", "int": "Int32",
                      "bool": "Bool"}


class FakeTensor:
    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...] = ()):
        self.name, self.dtype, self.shape = name, dtype, shape


class FakeLayer:
    def __init__(self, name: str, type_, inputs: list, outputs: list, onnx_node: str = ""):
        self.name, self.type, self.inputs, self.outputs = name, type_, inputs, outputs
        self.onnx_node = onnx_node  # test-only: the ONNX node (or weight) the parser made this layer for
        self.precision = None
        self.output_types: dict[int, object] = {}

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self, layers=(), inputs=(), outputs=()):
        self.layers, self.inputs, self.outputs = list(layers), list(inputs), list(outputs)
        self.onnx_path = None

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class ParseFailure(Exception):
    """The fake parser's error, in the text of onnx-tensorrt's IParserError (``In node N (func): CODE: desc``)."""


def network_from_onnx(path: Path, trt, logger=None) -> FakeNetwork:
    """The ONNX parser's rules that matter here (onnx-tensorrt ModelImporter / ImporterContext):

    - layers are named after their ONNX node; a second layer for the same node (a helper) gets the node name with
      a ``_<n>`` suffix from one counter; helper tensors keep TensorRT's default ``(Unnamed Layer* i) [...]_output``;
    - weights consumed as tensors become Constant layers named after the weight, with an unnamed output tensor;
    - a node producing a UINT8 tensor that is not a graph output is refused: "TensorRT does not support UINT8 types
      for intermediate tensors!" (TensorRT >= 8.6); a Cast from UINT8 must go to FLOAT or FLOAT16;
    - TensorRT < 8.6 has no LayerNormalization importer: it logs "No importer registered for op" at INFO and fails
      in the plugin fallback with "Plugin not found".
    Raises :class:`ParseFailure`."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    weights = {i.name: i.data_type for i in graph.initializer}
    weights.update({n.output[0]: next(a.t.data_type for a in n.attribute if a.name == "value")
                    for n in graph.node if n.op_type == "Constant"})
    graph_outputs = {o.name for o in graph.output}
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    tensors: dict[str, FakeTensor] = {}
    names: set[str] = set()
    counter = [0]
    network = FakeNetwork()

    def unique(base: str) -> str:  # ImporterContext::registerLayer -> generateUniqueName
        candidate = base
        while candidate in names:
            candidate = f"{base}_{counter[0]}"
            counter[0] += 1
        names.add(candidate)
        return candidate

    def add(base: str, kind: str, inputs: list, outputs: list, node: str) -> FakeLayer:
        layer = FakeLayer(unique(base), getattr(trt.LayerType, kind), inputs, outputs, node)
        network.layers.append(layer)
        return layer

    def unnamed(kind: str, dtype) -> FakeTensor:
        return FakeTensor(f"(Unnamed Layer* {len(network.layers)}) [{kind.title()}]_output", dtype)

    def io(value) -> FakeTensor:
        tensor = tensors.setdefault(value.name, FakeTensor(value.name, _ONNX_DTYPES[elem[value.name]]))
        tensor.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        return tensor

    def as_tensor(name: str) -> FakeTensor:
        if name not in tensors:  # a weight used as a tensor: a Constant layer named after it
            tensor = unnamed("Constant", _ONNX_DTYPES.get(weights[name], np.dtype(np.float32)))
            add(name, "CONSTANT", [], [tensor], name)
            tensors[name] = tensor
        return tensors[name]

    network.inputs = [io(v) for v in graph.input if v.name not in weights]
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue
        base = node.name or f"node_of_{node.output[0]}"
        if version < (8, 6) and node.op_type == "LayerNormalization":
            if logger is not None:
                logger.log(trt.ILogger.Severity.INFO,
                           f"No importer registered for op: {node.op_type}. Attempting to import as plugin.")
            raise ParseFailure(f"In node {index} (importFallbackPluginImporter): UNSUPPORTED_NODE: Assertion failed: "
                               "creator && \"Plugin not found, are the plugin name, version, and namespace correct?\"")
        inputs = [as_tensor(n) if n in weights and node.op_type in _TENSOR_WEIGHT_OPS else tensors.get(n)
                  for n in node.input if n]
        inputs = [t for t in inputs if t is not None]
        if node.op_type == "Cast" and inputs and inputs[0].dtype == np.uint8:
            to = next(a.i for a in node.attribute if a.name == "to")
            if to not in (1, 10):
                raise ParseFailure(f"In node {index} (importCast): UNSUPPORTED_NODE: Assertion failed: "
                                   "newType == DataType::kFLOAT || newType == DataType::kHALF")
        outputs = [tensors.setdefault(n, FakeTensor(n, _ONNX_DTYPES[elem.get(n, 1)])) for n in node.output]
        if node.op_type == "ReduceL2":  # square, sum, sqrt: three layers for one node
            squared, summed = unnamed("ElementWise", outputs[0].dtype), None
            add(base, "ELEMENTWISE", inputs + inputs, [squared], node.name)
            summed = unnamed("Reduce", outputs[0].dtype)
            add(base, "REDUCE", [squared], [summed], node.name)
            add(base, "UNARY", [summed], outputs, node.name)
        else:
            add(base, _LAYER_TYPES.get(node.op_type, "OTHER"), inputs, outputs, node.name)
        for tensor in outputs:
            if tensor.dtype == np.uint8 and tensor.name not in graph_outputs and version >= (8, 6):
                raise ParseFailure(f"In node {index} (parseGraph): UNSUPPORTED_NODE: Assertion failed: legalUINT8 && "
                                   "\"TensorRT does not support UINT8 types for intermediate tensors!\"")
    network.outputs = [io(v) for v in graph.output]
    network.onnx_path = str(path)
    return network


def uint8_input_misuse(network: FakeNetwork, trt) -> list[str]:
    """TensorRT's DataType.kUINT8 rule at build time: a UINT8 network input may only be converted to FLOAT/HALF."""
    problems = []
    for tensor in network.inputs:
        if tensor.dtype != np.uint8:
            continue
        for layer in network.layers:
            if tensor in layer.inputs and (layer.type != trt.LayerType.CAST
                                           or layer.outputs[0].dtype not in (trt.float32, trt.float16)):
                problems.append(f"UINT8 network input '{tensor.name}' feeds {layer.type.name} layer '{layer.name}'; "
                                "it may only be cast to FLOAT or HALF")
    return problems


def built_layers(network: FakeNetwork, config, trt) -> list[dict]:
    """The engine inspector's view of a fake build: each layer's output precision follows the builder flags and the
    FP32 constraints; with ``trt.myelin`` the transformer blocks are fused into one foreign node, as TensorRT >= 8.6
    does, which shows one precision (Half) whatever was asked for its LayerNorms."""
    fp16 = getattr(trt.BuilderFlag, "FP16", None) in config.flags
    rows, fused = [], []
    for layer in network.layers:
        dtype = layer.outputs[0].dtype if layer.outputs else np.dtype(np.float32)
        if dtype.kind != "f":
            precision = "bool" if dtype == np.bool_ else "int"
        else:
            precision = "fp16" if fp16 and layer.precision != trt.float32 else "fp32"
        if trt.myelin and fp16 and layer.name.startswith(("/body.", "/last_block")) and layer.type != trt.LayerType.CONSTANT:
            fused.append(layer.name)
            continue
        rows.append({"Name": layer.name, "LayerType": layer.type.name.title(),
                     "Outputs": [{"Name": t.name, "Format/Datatype": _INSPECTOR_FORMATS[precision]} for t in layer.outputs]})
    if fused:
        rows.append({"Name": f"{{ForeignNode[{fused[0]}...{fused[-1]}]}}", "LayerType": "Myelin",
                     "Outputs": [{"Name": "fused", "Format/Datatype": "Half"}]})
    return rows


class FakeEngine:
    """Deserialised fake plan: the tensor table of the contract, computed by ONNX Runtime."""

    def __init__(self, trt, plan: dict):
        import onnxruntime as ort

        self.trt, self.plan = trt, plan
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profile = [tuple(s) for s in plan["profile"]]
        outputs = self.session.get_outputs()
        # Engine-level shapes keep -1 where the ONNX graph has a symbolic dim; execution shapes are concrete.
        self.declared = {o.name: tuple(d if isinstance(d, int) else -1 for d in o.shape[1:]) for o in outputs}
        one = self.session.run(None, {INPUT_NAME: np.zeros((1, *self.profile[0][1:]), np.uint8)})
        self.per_image = {o.name: value.shape[1:] for o, value in zip(outputs, one)}
        self.names = [INPUT_NAME, *self.per_image]

    num_io_tensors = property(lambda self: len(self.names))
    device_memory_size = 123 << 20

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == INPUT_NAME else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.uint8 if name == INPUT_NAME else self.trt.float32

    def get_tensor_shape(self, name):
        return (-1, *self.profile[0][1:]) if name == INPUT_NAME else (-1, *self.declared[name])

    def get_tensor_profile_shape(self, name, index):
        assert name == INPUT_NAME and index == 0
        return self.profile

    def create_execution_context(self):
        return None if self.trt.context_fails else FakeContext(self)

    def create_engine_inspector(self):
        return FakeInspector(self)


class FakeInspector:
    """IEngineInspector: layer formats only with DETAILED verbosity and an execution context whose shapes are set.
    Like a pybind object it refuses unknown attributes; the context attribute is ``context`` in TensorRT 8.5."""

    def __init__(self, engine: FakeEngine):
        old = tuple(int(v) for v in engine.trt.__version__.split(".")[:2]) < (8, 6)
        object.__setattr__(self, "slot", "context" if old else "execution_context")
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, self.slot, None)

    def __setattr__(self, name, value):
        if name != self.slot:
            raise AttributeError(f"'tensorrt.EngineInspector' object has no attribute '{name}'")
        object.__setattr__(self, name, value)

    @property
    def execution_context_set(self):
        return getattr(self, self.slot)

    def get_engine_information(self, fmt):
        assert fmt == self.engine.trt.LayerInformationFormat.JSON
        layers = self.engine.plan["layers"]
        if self.engine.plan["verbosity"] != self.engine.trt.ProfilingVerbosity.DETAILED.name:
            return json.dumps({"Layers": [layer["Name"] for layer in layers]})
        if self.execution_context_set is None or self.execution_context_set.shape is None:
            layers = [{**layer, "Outputs": [{**t, "Format/Datatype": "N/A due to dynamic shapes"} for t in layer["Outputs"]]}
                      for layer in layers]
        return json.dumps({"Layers": layers, "Bindings": self.engine.names})


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profile
        ok = name == INPUT_NAME and len(shape) == 4 and tuple(shape[1:]) == low[1:] and low[0] <= shape[0] <= high[0]
        self.shape = tuple(shape) if ok else self.shape
        return ok

    def get_tensor_shape(self, name):
        return self.shape if name == INPUT_NAME else (self.shape[0], *self.engine.per_image[name])

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream):
        """Queued on ``stream``: reads the device input and writes the device outputs when the stream runs."""
        cudart = self.engine.trt.cudart
        shape, addresses = self.shape, dict(self.addresses)
        images = _view(addresses[INPUT_NAME], shape, np.uint8)
        assert cudart.owner(addresses[INPUT_NAME], images.nbytes) == "device"
        names = list(self.engine.per_image)

        def compute():
            for name, value in zip(names, self.engine.session.run(names, {INPUT_NAME: images.copy()})):
                assert cudart.owner(addresses[name], value.nbytes) == "device"
                _view(addresses[name], value.shape, np.float32)[...] = value

        cudart.enqueue(stream, compute)
        return True


def fake_tensorrt(cudart: FakeCudart, version: str = FAKE_TRT):
    """A module-like namespace with the TensorRT API the backend and the builder use."""
    trt = SimpleNamespace(__version__=version, cudart=cudart, build_fails=False, builds=[], myelin=False,
                          context_fails=False, logged=[])
    trt.float32, trt.float16, trt.uint8 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8)
    trt.nptype = lambda dtype: dtype
    trt.LayerType = enum.Enum("LayerType", "CONSTANT NORMALIZATION SHAPE MATRIX_MULTIPLY REDUCE SOFTMAX ELEMENTWISE "
                                           "UNARY CAST OTHER")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 TF32 OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.ProfilingVerbosity = enum.Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED")
    trt.LayerInformationFormat = enum.Enum("LayerInformationFormat", "ONELINE JSON")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)

    def version_at_least(*v):
        return tuple(int(x) for x in trt.__version__.split(".")[:2]) >= v

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            if version_at_least(10, 1):
                warnings.warn("IInt8EntropyCalibrator2 is deprecated in TensorRT 10.1", DeprecationWarning)

    def binding_call(logger, method, *args):
        """What TensorRT's pybind trampoline does with a calibrator method: an exception is logged, not raised,
        and the call answers None (for get_batch: no more batches)."""
        try:
            return getattr(method.__self__, method.__name__)(*args)
        except Exception as err:  # noqa: BLE001
            logger.log(ILogger.Severity.ERROR, f"Exception caught in {method.__name__}(): {err}")
            return None

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = [tuple(low), tuple(opt), tuple(high)]

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return b"timing:" + FAKE_GPU.rstrip(b"\x00")

    class Config:
        def __init__(self):
            self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default
            self.pools, self.profiles, self.calibration_profile, self._calibrator = {}, [], None, None
            self.timing_cache = None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY  # TensorRT's default

        @property
        def int8_calibrator(self):
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, calibrator):
            if version_at_least(10, 1):
                warnings.warn("int8_calibrator is deprecated in TensorRT 10.1", DeprecationWarning)
            self._calibrator = calibrator

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            fits = cache.data in (b"", TimingCache(b"").serialize())
            self.timing_cache = cache if fits else self.timing_cache
            return fits

        def get_timing_cache(self):
            return self.timing_cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            logger.log(ILogger.Severity.WARNING, "fake builder warning")
            logger.log(ILogger.Severity.INFO, "fake builder info")

        def create_network(self, flags):
            return FakeNetwork()

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            trt.builds.append((network, config))
            problems = uint8_input_misuse(network, trt)
            for problem in problems:
                self.logger.log(ILogger.Severity.ERROR, problem)
            if trt.build_fails or problems:
                return None
            int8 = getattr(trt.BuilderFlag, "INT8", None)  # gone in strongly typed TensorRT
            calibrator = config.int8_calibrator
            if int8 in config.flags and binding_call(self.logger, calibrator.read_calibration_cache) is None:
                batches = 0
                while (pointers := binding_call(self.logger, calibrator.get_batch, [INPUT_NAME])) is not None:
                    shape = config.calibration_profile.shapes[INPUT_NAME][1]
                    assert cudart.owner(pointers[0], int(np.prod(shape))) == "device"
                    batches += 1
                if not batches:
                    return None
                binding_call(self.logger, calibrator.write_calibration_cache, b"fake calibration of %d batches" % batches)
            plan = {"onnx": network.onnx_path, "profile": config.profiles[0].shapes[INPUT_NAME],
                    "verbosity": config.profiling_verbosity.name, "layers": built_layers(network, config, trt)}
            return PLAN_MAGIC + json.dumps(plan).encode()

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            try:
                parsed = network_from_onnx(Path(path), trt, self.logger)
            except ParseFailure as err:
                self.errors.append(str(err))
                return False
            self.network.__dict__.update(parsed.__dict__)
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            if not bytes(data).startswith(PLAN_MAGIC):
                return None
            return FakeEngine(trt, json.loads(bytes(data)[len(PLAN_MAGIC):]))

    trt.ILogger, trt.IInt8EntropyCalibrator2, trt.Builder = ILogger, IInt8EntropyCalibrator2, Builder
    trt.OnnxParser, trt.Runtime = OnnxParser, Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch):
    """(fake tensorrt, fake cudart) in place of the real libraries, for the backend and the builder."""
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    for module in (trt_backend, trt_build):
        monkeypatch.setattr(module, "load_tensorrt", lambda: trt)
        monkeypatch.setattr(module, "load_cudart", lambda: cudart)
    return trt, cudart


FAKE_DEVICE = DeviceInfo(gpu="Fake GPU 9000", compute_capability=FAKE_CC, trt_version=FAKE_TRT)


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- engine cache (pure)
def test_slug_makes_file_name_safe_names():
    assert slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert slug("Orin") == "orin"
    assert slug("  NVIDIA H100 80GB HBM3 (MIG 1g.10gb) ") == "nvidia-h100-80gb-hbm3-mig-1g.10gb"
    assert slug("8.5.2.2") == "8.5.2.2"
    assert slug("///") == "unknown"


def test_engine_file_name_carries_the_whole_key(tmp_path):
    key = EngineKey(FAKE_DEVICE, "fp16", "ab" * 32, BatchProfile(1, 4, 8))
    assert plan_path(tmp_path, key) == tmp_path / f"fake-gpu-9000-sm87-trt10.3.0-fp16-{'ab' * 4}-b8.plan"
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key


def test_batch_profile_shapes_and_validation():
    assert BatchProfile(1, 4, 8).shapes((240, 224)) == ((1, 240, 224, 3), (4, 240, 224, 3), (8, 240, 224, 3))
    for bad in ((0, 1, 1), (1, 9, 8), (2, 1, 8)):
        with pytest.raises(EngineCacheError, match="1 <= min <= opt <= max"):
            BatchProfile(*bad)
    with pytest.raises(EngineCacheError, match="precision 'bf16' unknown"):
        EngineKey(FAKE_DEVICE, "bf16", "0" * 64, BatchProfile())


SHA = "1f" * 32


def _cache_one(engine_dir: Path, **changes) -> Path:
    device = DeviceInfo(**{**FAKE_DEVICE.__dict__, **{k: v for k, v in changes.items() if k in FAKE_DEVICE.__dict__}})
    key = EngineKey(device, changes.get("precision", "fp16"), changes.get("onnx_sha256", SHA),
                    BatchProfile(1, changes.get("max_batch", 8), changes.get("max_batch", 8)))
    return save_engine(engine_dir, key, b"plan for " + key.stem.encode(), {"seconds": 1.0})


def test_saved_engine_is_found_with_its_key(tmp_path):
    path = _cache_one(tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["key"]["device"]["gpu"] == "Fake GPU 9000" and sidecar["build"] == {"seconds": 1.0}
    found = find_engine(tmp_path, FAKE_DEVICE, "fp16", SHA, bundle_root=tmp_path.parent)
    assert found.plan == path and found.key.profile.max == 8


@pytest.mark.parametrize("change, phrase", [
    ({"gpu": "NVIDIA A100-SXM4-40GB"}, "built on GPU 'NVIDIA A100-SXM4-40GB', this is 'Fake GPU 9000'"),
    ({"compute_capability": (7, 2)}, "built for sm72, this GPU is sm87"),
    ({"trt_version": "8.5.2.2"}, "built with TensorRT 8.5.2.2, this is 10.3.0"),
    ({"precision": "int8"}, "precision int8, asked for fp16"),
    ({"onnx_sha256": "9e" * 32}, "built from another visual.onnx"),
])
def test_an_engine_for_another_device_or_graph_is_refused(tmp_path, change, phrase):
    _cache_one(tmp_path / "engines", **change)
    with pytest.raises(EngineCacheError) as err:
        find_engine(tmp_path / "engines", FAKE_DEVICE, "fp16", SHA, bundle_root=tmp_path)
    message = str(err.value)
    assert phrase in message
    assert f"winclip-edge engine build --bundle {tmp_path} --precision fp16" in message
    assert "--engine-dir" not in message  # the default folder needs no option


def test_refusals_without_engines_name_the_folder_and_the_command(tmp_path):
    with pytest.raises(EngineCacheError, match=r"holds no engine.*engine build --bundle .* --precision int8 --engine-dir"):
        find_engine(tmp_path / "elsewhere", FAKE_DEVICE, "int8", SHA, bundle_root=tmp_path)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "copied.plan").write_bytes(b"x")
    with pytest.raises(EngineCacheError, match="copied.plan: no sidecar JSON"):
        find_engine(tmp_path / "engines", FAKE_DEVICE, "fp16", SHA, bundle_root=tmp_path)


def test_a_damaged_plan_is_refused(tmp_path):
    path = _cache_one(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(EngineCacheError, match="fails its sha256 check"):
        find_engine(tmp_path, FAKE_DEVICE, "fp16", SHA, bundle_root=tmp_path)


def test_the_largest_profile_is_chosen_unless_a_max_batch_is_asked_for(tmp_path):
    _cache_one(tmp_path, max_batch=4)
    _cache_one(tmp_path, max_batch=16)
    assert find_engine(tmp_path, FAKE_DEVICE, "fp16", SHA, tmp_path).key.profile.max == 16
    assert find_engine(tmp_path, FAKE_DEVICE, "fp16", SHA, tmp_path, max_batch=4).key.profile.max == 4
    with pytest.raises(EngineCacheError, match="max batch 16, asked for 8"):
        find_engine(tmp_path, FAKE_DEVICE, "fp16", SHA, tmp_path, max_batch=8)


# ---------------------------------------------------------------- CUDA checker
def test_cuda_checker_names_the_failed_call():
    cuda = Cuda(FakeCudart(fail=("cudaMalloc",)))
    with pytest.raises(EngineError, match=r"CUDA call cudaMalloc failed: cudaErrorMemoryAllocation \(out of memory\)"):
        cuda.call("cudaMalloc", 64)
    info = Cuda(FakeCudart()).device_info("8.6.2")
    assert info == DeviceInfo("Fake GPU 9000", (8, 7), "8.6.2")  # NUL padding stripped


# ---------------------------------------------------------------- IO table vs contract
def test_engine_io_table_is_checked_against_the_contract(tiny_bundle, fakes):
    trt, _ = fakes
    bundle = Bundle(tiny_bundle)
    spec = bundle.spec
    engine = FakeEngine(trt, {"onnx": str(bundle.onnx_path), "profile": [(n, *spec.image_size, 3) for n in (1, 2, 2)]})
    table = io_table(engine, trt)
    assert set(table) == {INPUT_NAME, *output_names(spec.scales)} and table[INPUT_NAME].is_input
    check_engine_io(spec, table, where="fake.plan")

    missing = {k: v for k, v in table.items() if k != "patch_tokens"}
    with pytest.raises(ContractError, match=r"fake.plan: output\(s\) \['patch_tokens'\] missing"):
        check_engine_io(spec, missing, where="fake.plan")
    window = output_names(spec.scales)[1]
    wrong_shape = {**table, window: TensorInfo(False, (-1, 7, spec.embed_dim), np.dtype(np.float32))}
    with pytest.raises(ContractError, match=f"output '{window}' has shape"):
        check_engine_io(spec, wrong_shape, where="fake.plan")
    half = {**table, "image_embedding": TensorInfo(False, (-1, spec.embed_dim), np.dtype(np.float16))}
    with pytest.raises(ContractError, match="'image_embedding' has dtype float16, the contract says float32"):
        check_engine_io(spec, half, where="fake.plan")
    float_input = {**table, INPUT_NAME: TensorInfo(True, table[INPUT_NAME].shape, np.dtype(np.float32))}
    with pytest.raises(ContractError, match="'images' has dtype float32, the contract says uint8"):
        check_engine_io(spec, float_input, where="fake.plan")


# ---------------------------------------------------------------- layers kept in FP32
def _onnx_node_ops(path: Path) -> dict[str, str]:
    import onnx

    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("export_options, layer_norm_ops", [
    ({}, {"LayerNormalization"}),  # opset 17 (default): one node per LayerNorm, INormalizationLayer in TensorRT >= 8.6
    ({"opset": 16}, {"ReduceMean", "Sub", "Pow", "Sqrt", "Div"}),  # what torch emits below opset 17 (JetPack 5.x)
])
def test_fp32_layers_are_the_layernorms_and_l2_norms_of_the_exported_graph(make_bundle, fakes, export_options,
                                                                            layer_norm_ops):
    trt, _ = fakes
    onnx_path = make_bundle(**export_options) / VISUAL_ONNX
    network = network_from_onnx(onnx_path, trt)
    chosen = fp32_layers(network, trt)
    ops = _onnx_node_ops(onnx_path)
    layer_norm = {n for n, op in ops.items() if "/ln_" in n and op != "Constant"}  # open_clip's ln_pre/ln_1/ln_2/ln_post
    assert {ops[n] for n in layer_norm} >= layer_norm_ops
    float_nodes = {layer.onnx_node for layer in network.layers
                   if layer.type != trt.LayerType.CONSTANT and all(t.dtype.kind == "f" for t in layer.outputs)}
    nodes = {layer.onnx_node for layer in chosen if layer.type != trt.LayerType.CONSTANT}
    assert nodes == (layer_norm | {n for n, op in ops.items() if op == "ReduceL2"}) & float_nodes
    assert not {ops[n] for n in nodes} & {"MatMul", "Softmax", "Gemm", "Conv", "Shape"}
    # every layer the parser made for those nodes, the helpers with '_<n>' names included
    assert {layer.name for layer in chosen} >= {layer.name for layer in network.layers if layer.onnx_node in nodes}
    # constants join only as inputs of a chosen layer (a LayerNorm's scale and bias), or by their own name
    consumed = {t.name for layer in chosen for t in layer.inputs}
    for layer in chosen:
        if layer.type == trt.LayerType.CONSTANT:
            assert layer.outputs[0].name in consumed or "ln_" in layer.name, layer.name


def test_fp32_layers_follow_unnamed_tensors_to_the_parsers_helper_layers(fakes):
    """TensorRT 8.x names only the first layer made for an ONNX node; its other layers hang on unnamed tensors."""
    trt, _ = fakes
    f32, i64, T = trt.float32, np.dtype(np.int64), trt.LayerType
    x = FakeTensor("/MatMul_output_0", f32)
    u1, u2, u3, u4 = (FakeTensor(f"(Unnamed Layer* {i}) [X]_output", f32) for i in range(1, 5))
    norm = FakeTensor("/ReduceL2_output_0", f32)
    shape = FakeTensor("(Unnamed Layer* 9) [Shape]_output", i64)
    layers = [
        FakeLayer("/MatMul", T.MATRIX_MULTIPLY, [], [x]),
        FakeLayer("/ReduceL2", T.ELEMENTWISE, [x, x], [u1]),  # square: named after the node
        FakeLayer("(Unnamed Layer* 2) [Reduce]", T.REDUCE, [u1], [u2]),  # helpers: unnamed
        FakeLayer("(Unnamed Layer* 3) [Unary]", T.UNARY, [u2], [norm]),
        FakeLayer("(Unnamed Layer* 9) [Shape]", T.SHAPE, [u2], [shape]),  # int output: never constrained
        FakeLayer("(Unnamed Layer* 5) [Constant]", T.CONSTANT, [], [u3]),  # a weight shared by two nodes
        FakeLayer("/ln_post/Mul", T.ELEMENTWISE, [norm, u3], [u4]),
        FakeLayer("/proj/MatMul", T.MATRIX_MULTIPLY, [x, u3], [FakeTensor("/proj/MatMul_output_0", f32)]),
        FakeLayer("/Div_1", T.ELEMENTWISE, [x, norm], [FakeTensor("image_embedding", f32)]),
    ]
    chosen = [layer.name for layer in fp32_layers(FakeNetwork(layers), trt)]
    assert chosen == ["/ReduceL2", "(Unnamed Layer* 2) [Reduce]", "(Unnamed Layer* 3) [Unary]",
                      "(Unnamed Layer* 5) [Constant]", "/ln_post/Mul"]


# ---------------------------------------------------------------- INT8 calibration data
def _write_images(folder: Path, sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(folder / f"normal_{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(textured_part(size, seed=i), cv2.COLOR_RGB2BGR))
    return paths


def test_calibration_batches_use_the_runtime_preprocessing(tmp_path):
    paths = _write_images(tmp_path, [(300, 400), (240, 240), (120, 90), (480, 640), (200, 260)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    messages: list[str] = []
    batches = list(calibration_batches([paths[0], broken, *paths[1:]], (96, 128), 2, messages.append))
    assert [b.shape for b in batches] == [(2, 96, 128, 3)] * 2 and all(b.dtype == np.uint8 for b in batches)
    expected = [resize_to_model(read_image(p), (96, 128)) for p in paths[:4]]
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(expected))
    assert any("skipped" in m and "broken.png" in m for m in messages)
    assert any("the last 1 image(s)" in m for m in messages)
    assert messages[-1] == "calibration: 4 image(s) used in batches of 2, 1 unreadable"


def test_calibration_feed_copies_each_batch_to_the_device_and_keeps_the_cache(tmp_path):
    cudart = FakeCudart()
    batches = [np.full((2, 4, 4, 3), v, np.uint8) for v in (3, 7)]
    cache = tmp_path / "engines" / "calibration.cache"
    feed = CalibrationFeed(Cuda(cudart), iter(batches), (2, 4, 4, 3), cache, _quiet)
    assert feed.get_batch_size() == 2 and feed.read_calibration_cache() is None  # images given: calibrate afresh
    for batch in batches:
        (pointer,) = feed.get_batch([INPUT_NAME])
        np.testing.assert_array_equal(_view(pointer, batch.shape, np.uint8), batch)
    assert feed.get_batch([INPUT_NAME]) is None and feed.given == 2
    feed.write_calibration_cache(memoryview(b"scales"))
    feed.free()
    assert cache.read_bytes() == b"scales" and not cudart.buffers
    reuse = CalibrationFeed(Cuda(cudart), None, (2, 4, 4, 3), cache, _quiet)
    assert reuse.read_calibration_cache() == b"scales" and reuse.get_batch([INPUT_NAME]) is None


# ---------------------------------------------------------------- building (fake TensorRT)
def test_fp16_build_constrains_precision_and_caches_plan_and_timing(bundle_copy, fakes, capsys):
    trt, cudart = fakes
    bundle = Bundle(bundle_copy)
    cached = build_engine(bundle, BuildOptions(precision="fp16", profile=BatchProfile(1, 2, 4)), log=_quiet)
    network, config = trt.builds[-1]
    assert {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS, trt.BuilderFlag.TF32} == config.flags
    h, w = bundle.spec.image_size
    assert config.profiles[0].shapes[INPUT_NAME] == [(1, h, w, 3), (2, h, w, 3), (4, h, w, 3)]
    assert config.pools[trt.MemoryPoolType.WORKSPACE] == 2 * (1 << 30)
    kept = [layer for layer in network.layers if layer.precision is not None]
    assert kept and all(layer.precision == trt.float32 and set(layer.output_types.values()) == {trt.float32}
                        for layer in kept)
    assert cached.build["fp32_layers"] == len(kept)
    engines = default_engine_dir(bundle_copy)
    assert cached.plan.parent == engines and cached.plan.name.startswith("fake-gpu-9000-sm87-trt10.3.0-fp16-")
    assert (engines / "timing-fake-gpu-9000-sm87-trt10.3.0.cache").read_bytes() == b"timing:Fake GPU 9000"
    assert not cudart.buffers
    assert "[TensorRT] WARNING: fake builder warning" in capsys.readouterr().err  # INFO is filtered out


def test_fp32_build_switches_tf32_off_and_constrains_nothing(bundle_copy, fakes):
    trt, _ = fakes
    cached = build_engine(Bundle(bundle_copy), BuildOptions(precision="fp32"), log=_quiet)
    network, config = trt.builds[-1]
    assert config.flags == set() and cached.build["fp32_layers"] == 0
    assert all(layer.precision is None for layer in network.layers)


def test_int8_build_calibrates_from_images_then_reuses_the_cache(bundle_copy, fakes, tmp_path):
    trt, cudart = fakes
    bundle = Bundle(bundle_copy)
    images = tuple(str(p) for p in _write_images(tmp_path / "normal", [(240, 240)] * 5))
    options = BuildOptions(precision="int8", profile=BatchProfile(1, 2, 4), calibration_images=images)
    cached = build_engine(bundle, options, log=_quiet)
    config = trt.builds[-1][1]
    assert {trt.BuilderFlag.INT8, trt.BuilderFlag.FP16} <= config.flags
    assert config.calibration_profile.shapes[INPUT_NAME] == [(2, 240, 240, 3)] * 3
    assert cached.build["calibration"] == {"images": 5, "batches": 2, "batch_size": 2,
                                           "cache": f"calibration-{bundle.manifest.files[VISUAL_ONNX][:8]}-trt10.3.0.cache"}
    cache = default_engine_dir(bundle_copy) / cached.build["calibration"]["cache"]
    assert cache.read_bytes() == b"fake calibration of 2 batches" and not cudart.buffers

    again = build_engine(bundle, BuildOptions(precision="int8", profile=BatchProfile(1, 2, 4)), log=_quiet)
    assert again.build["calibration"]["batches"] == 0 and again.plan == cached.plan  # the cache, no images


def test_int8_without_images_or_cache_says_what_to_pass(bundle_copy, fakes):
    with pytest.raises(EngineBuildError, match="pass --calibration-images DIR"):
        build_engine(Bundle(bundle_copy), BuildOptions(precision="int8"), log=_quiet)


def test_int8_with_only_unreadable_images_says_so(bundle_copy, fakes, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x00")
    with pytest.raises(EngineBuildError, match="none of the 1 calibration images could be read"):
        build_engine(Bundle(bundle_copy), BuildOptions(precision="int8", calibration_images=(str(junk),)), log=_quiet)


def test_tensorrt_8_5_names_layernorm_only_in_its_log_and_the_hint_comes_from_there(bundle_copy, fakes, monkeypatch,
                                                                                     make_bundle, tmp_path):
    """TensorRT 8.5's parser error for an op without importer names the plugin fallback, not the op ("In node N
    (importFallbackPluginImporter): ... Plugin not found"); the op is named in an INFO log line only."""
    import shutil

    trt, _ = fakes
    monkeypatch.setattr(trt, "__version__", "8.5.2.2")
    messages: list[str] = []
    with pytest.raises(EngineBuildError, match=r"cannot parse .*: 1 error\(s\) listed above. .*--opset 16") as err:
        build_engine(Bundle(bundle_copy), BuildOptions(), log=messages.append)
    assert "8.5.2.2" in str(err.value)
    errors = [m for m in messages if m.startswith("ONNX parser error")]
    assert len(errors) == 1 and "Plugin not found" in errors[0] and "LayerNormalization" not in errors[0]
    assert any("may not import its LayerNormalization" in m for m in messages)  # warned before parsing
    # the same TensorRT parses the opset-16 export (LayerNorm as plain ops)
    op16 = shutil.copytree(make_bundle(opset=16), tmp_path / "op16")
    cached = build_engine(Bundle(op16), BuildOptions(), log=_quiet)
    assert cached.plan.is_file() and "error" not in cached.build["layer_precisions"]  # 8.5's inspector attribute


def _old_style_bundle(tmp_path, config_dir, opset: int = 17) -> Path:
    """The graph as exported before the cast-first fix: uint8 images -> Transpose -> Cast."""
    import torch

    from winclip_edge.export.onnx_export import ExportOptions, export_bundle
    from winclip_edge.export.windowed_clip import WindowedVisual

    def permute_then_cast(self, images):  # WindowedVisual._tokens with the order before the fix
        v = self.visual
        x = images.permute(0, 3, 1, 2).float()  # [N, 3, H, W]: a uint8 Transpose, then the Cast
        x = (x - self.pixel_mean) / self.pixel_std
        x = v.conv1(x)
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))

    out = tmp_path / f"old-opset{opset}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WindowedVisual, "_tokens", permute_then_cast)
        export_bundle(out, ExportOptions(model=str(config_dir / "tiny240.json"), pretrained="none", products=(),
                                         opset=opset), show_progress=False)
    return out


def test_the_parser_refuses_the_old_uint8_graph_and_takes_the_new_one(bundle_copy, fakes, tmp_path, config_dir,
                                                                       monkeypatch):
    trt, _ = fakes
    old = _old_style_bundle(tmp_path, config_dir)
    messages: list[str] = []
    with pytest.raises(EngineBuildError, match="before casting its input to float.*re-export the bundle"):
        build_engine(Bundle(old), BuildOptions(), log=messages.append)
    assert any("UINT8 types for intermediate tensors" in m for m in messages)
    monkeypatch.setattr(trt, "__version__", "8.5.2.2")  # no parser check there: the builder's UINT8 input rule
    with pytest.raises(EngineBuildError, match="could not build the engine"):
        build_engine(Bundle(_old_style_bundle(tmp_path, config_dir, opset=16)), BuildOptions(), log=_quiet)
    monkeypatch.setattr(trt, "__version__", FAKE_TRT)
    assert build_engine(Bundle(bundle_copy), BuildOptions(), log=_quiet).plan.is_file()  # the current export


def test_the_builder_refuses_a_uint8_input_that_feeds_anything_but_a_cast(fakes):
    trt, _ = fakes
    images = FakeTensor(INPUT_NAME, trt.uint8)
    as_float = FakeTensor("x", trt.float32)
    ok = FakeNetwork([FakeLayer("/Cast", trt.LayerType.CAST, [images], [as_float])], inputs=[images])
    assert uint8_input_misuse(ok, trt) == []
    bad = FakeNetwork([FakeLayer("/Transpose", trt.LayerType.OTHER, [images], [FakeTensor("t", trt.uint8)])],
                      inputs=[images])
    assert uint8_input_misuse(bad, trt) == ["UINT8 network input 'images' feeds OTHER layer '/Transpose'; it may only "
                                            "be cast to FLOAT or HALF"]


def test_parser_layer_names_follow_onnx_tensorrt(tiny_bundle, fakes):
    """Node name for the first layer, '<node>_<n>' for a node's helpers, the weight's name for a Constant layer."""
    trt, _ = fakes
    network = network_from_onnx(tiny_bundle / VISUAL_ONNX, trt)
    names = [layer.name for layer in network.layers]
    assert len(names) == len(set(names))
    l2 = [layer for layer in network.layers if layer.onnx_node.endswith("ReduceL2")][:3]
    assert l2[0].name == l2[0].onnx_node and all(layer.name.startswith(l2[0].onnx_node + "_") for layer in l2[1:])
    assert l2[1].inputs[0].name.startswith("(Unnamed Layer*")
    constants = [layer for layer in network.layers if layer.type == trt.LayerType.CONSTANT]
    assert any(layer.name == "visual.ln_pre.weight" for layer in constants)
    assert network.inputs[0].name == INPUT_NAME
    first = next(layer for layer in network.layers if network.inputs[0] in layer.inputs)
    assert first.type == trt.LayerType.CAST and first.outputs[0].dtype == trt.float32


def test_strongly_typed_tensorrt_builds_fp32_and_refuses_fp16(bundle_copy, fakes, monkeypatch):
    """TensorRT 11 has no FP16/INT8 builder flags (strongly typed networks only)."""
    trt, _ = fakes
    monkeypatch.setattr(trt, "BuilderFlag", enum.Enum("BuilderFlag", "TF32 STRONGLY_TYPED"))
    monkeypatch.setattr(trt, "NetworkDefinitionCreationFlag", SimpleNamespace())  # no EXPLICIT_BATCH any more
    monkeypatch.setattr(trt, "__version__", "11.4.0.106")
    assert build_engine(Bundle(bundle_copy), BuildOptions(precision="fp32"), log=_quiet).key.precision == "fp32"
    with pytest.raises(EngineBuildError, match=r"strongly typed networks only .* TensorRT 8.5-10.x for fp16"):
        build_engine(Bundle(bundle_copy), BuildOptions(precision="fp16"), log=_quiet)


def test_a_failed_build_names_the_knobs(bundle_copy, fakes):
    trt, _ = fakes
    trt.build_fails = True
    with pytest.raises(EngineBuildError, match=r"--workspace-gib \(now 2.0\) or a smaller --max-batch \(now 8\)"):
        build_engine(Bundle(bundle_copy), BuildOptions(), log=_quiet)
    assert not list(default_engine_dir(bundle_copy).glob("*.plan"))


# ---------------------------------------------------------------- what was built, read back
INSPECTOR_JSON = json.dumps({"Layers": [
    {"Name": "/Cast", "LayerType": "Cast", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
    {"Name": "/ln_pre/LayerNormalization + /ln_pre/Cast", "LayerType": "Normalization",
     "Outputs": [{"Format/Datatype": "Float"}]},  # TensorRT 10.9+ writes 'Float' / 'Half'
    {"Name": "{ForeignNode[/resblocks.0/ln_1/LayerNormalization.../resblocks.0/Add_1]}", "LayerType": "Myelin",
     "Outputs": [{"Format/Datatype": "Half"}]},
    {"Name": "/ReduceL2", "LayerType": "Reduce", "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
    {"Name": "/Shape", "LayerType": "Shape", "Outputs": [{"Format/Datatype": "Int32"}]},
    {"Name": "__myl_MulSum_myl3_2", "LayerType": "kgen", "Outputs": [{"Format/Datatype": "Float"}],
     "Metadata": "[ONNX Layer: /resblocks.1/ln_2/LayerNormalization]\u001e[ONNX Layer: /resblocks.1/Add]"},
]})


def test_layer_precisions_reports_what_was_built_not_what_was_asked():
    report = layer_precisions(INSPECTOR_JSON, ["/ln_pre/LayerNormalization", "/ln_pre/Cast", "/ReduceL2",
                                               "/resblocks.0/ln_1/LayerNormalization",
                                               "/resblocks.1/ln_2/LayerNormalization"])
    assert report["precisions"] == {"fp16": 2, "fp32": 3, "other": 1} and report["fused_regions"] == 2
    assert report["fp32_requested"] == 5 and report["fp32_seen"] == 3  # LayerNorm + Cast, and one by its metadata
    assert report["fp32_lost"] == ["/ReduceL2"]  # asked FP32, built FP16
    assert report["fp32_not_visible"] == 1  # inside the Myelin region: no layer of that name
    line = describe_precisions(report)
    assert "3 seen FP32, 1 fused where TensorRT does not report" in line and "1 NOT FP32 (/ReduceL2)" in line
    no_shapes = layer_precisions(json.dumps({"Layers": [{"Name": "a", "Outputs": [
        {"Format/Datatype": "N/A due to dynamic shapes"}]}]}), [])
    assert no_shapes["precisions"] == {"unknown": 1}
    assert layer_precisions(json.dumps({"Layers": ["a", "b"]}), ["a"])["precisions"] == {"unknown": 2}  # names only


def test_fp16_build_reads_the_layer_precisions_back_from_the_engine(bundle_copy, fakes, capsys):
    trt, _ = fakes
    cached = build_engine(Bundle(bundle_copy), BuildOptions(precision="fp16"), log=_quiet)
    assert trt.builds[-1][1].profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    report = cached.build["layer_precisions"]
    assert report["precisions"]["fp16"] > 0 and report["precisions"]["fp32"] > 0
    assert report["fp32_requested"] == cached.build["fp32_layers"] == report["fp32_seen"] > 0
    assert report["fp32_not_visible"] == 0 and report["fp32_lost"] == [] and report["fused_regions"] == 0
    fp32 = build_engine(Bundle(bundle_copy), BuildOptions(precision="fp32"), log=_quiet).build["layer_precisions"]
    assert "fp16" not in fp32["precisions"] and fp32["fp32_requested"] == 0


def test_fused_transformer_layers_are_reported_as_not_visible(bundle_copy, fakes, capsys):
    """TensorRT >= 8.6 fuses transformer blocks (Myelin): the FP32 request on their LayerNorms cannot be seen."""
    trt, _ = fakes
    trt.myelin = True
    assert cli.main(["build-engine", "--bundle", str(bundle_copy), "--precision", "fp16"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    report = json.loads(next(default_engine_dir(bundle_copy).glob("*.json")).read_text())["build"]["layer_precisions"]
    assert report["fused_regions"] == 1 and report["fp32_not_visible"] > 0
    assert report["fp32_seen"] + report["fp32_not_visible"] == report["fp32_requested"]
    assert f"{report['fp32_not_visible']} fused where TensorRT does not report their precision" in out


# ---------------------------------------------------------------- INT8 calibrator failures and deprecation
def test_a_failure_inside_the_calibrator_fails_the_build(bundle_copy, fakes, tmp_path):
    """TensorRT's binding logs a calibrator exception and ends calibration as if the images had run out; the build
    must not ship an engine calibrated on fewer batches than asked for."""
    trt, cudart = fakes
    images = tuple(str(p) for p in _write_images(tmp_path / "normal", [(240, 240)] * 6))
    cudart.fail_after["cudaMemcpy"] = 1  # the second batch's copy fails
    with pytest.raises(EngineBuildError, match=r"INT8 calibration failed after 1 batch\(es\): EngineError: CUDA call "
                                               r"cudaMemcpy failed.*no engine was written"):
        build_engine(Bundle(bundle_copy), BuildOptions(precision="int8", profile=BatchProfile(1, 2, 4),
                                                       calibration_images=images), log=_quiet)
    engines = default_engine_dir(bundle_copy)
    assert not list(engines.glob("*.plan")) and not list(engines.glob("calibration-*.cache"))
    assert not cudart.buffers


@pytest.mark.parametrize("version, deprecated", [("10.3.0", True), ("10.0.1", False), ("8.6.2", False)])
def test_the_int8_calibrator_deprecation_is_said_once_not_warned_per_call(bundle_copy, fakes, tmp_path, monkeypatch,
                                                                          version, deprecated):
    trt, _ = fakes
    monkeypatch.setattr(trt, "__version__", version)
    images = tuple(str(p) for p in _write_images(tmp_path / "normal", [(240, 240)] * 2))
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_engine(Bundle(bundle_copy), BuildOptions(precision="int8", profile=BatchProfile(1, 2, 2),
                                                       calibration_images=images), log=messages.append)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("deprecates implicit INT8 calibration" in m for m in messages) == deprecated
    with warnings.catch_warnings(record=True) as caught:  # the filter did not leak out of the build
        warnings.simplefilter("always")
        trt.IInt8EntropyCalibrator2()
    assert bool(caught) == deprecated


# ---------------------------------------------------------------- running (fake TensorRT, ONNX Runtime numbers)
def test_engine_runs_batches_in_slices_of_the_profile_and_matches_onnxruntime(bundle_copy, fakes):
    trt, cudart = fakes
    bundle = Bundle(bundle_copy)
    build_engine(bundle, BuildOptions(profile=BatchProfile(1, 2, 2)), log=_quiet)
    engine = create_engine(bundle, EngineConfig(backend="tensorrt", precision="fp16"))
    assert isinstance(engine, TensorRTEngine) and engine.name == "tensorrt"
    assert engine.device == "Fake GPU 9000 (fp16)" and engine.max_batch == 2
    reference = create_engine(bundle, EngineConfig(backend="onnxruntime", options=OnnxRuntimeOptions(provider="cpu")))
    images = np.stack([textured_part(bundle.spec.image_size, seed=s) for s in range(5)])
    syncs = cudart.calls["cudaStreamSynchronize"]
    out = engine.run(images)
    assert cudart.calls["cudaStreamSynchronize"] - syncs == 3  # 2 + 2 + 1 images, one synchronise each
    expected = reference.run(images)
    assert list(out) == list(expected)
    for name in expected:
        assert out[name].dtype == np.float32
        # ONNX Runtime's CPU kernels round differently for a batch of 1, 2 or 5: 1e-6 on unit vectors;
        # a mixed-up slice or binding differs by ~1e-1.
        np.testing.assert_allclose(out[name], expected[name], rtol=0, atol=1e-6)
    with pytest.raises(ContractError, match=r"input 'images' has shape \(2, 10, 10, 3\)"):
        engine.run(np.zeros((2, 10, 10, 3), np.uint8))
    engine.close()
    engine.close()
    assert not cudart.buffers  # every device and pinned host buffer freed


def test_engine_refuses_a_precision_that_was_not_built(bundle_copy, fakes):
    build_engine(Bundle(bundle_copy), BuildOptions(precision="fp16"), log=_quiet)
    with pytest.raises(EngineCacheError, match="precision fp16, asked for int8.*--precision int8"):
        TensorRTEngine(Bundle(bundle_copy), EngineConfig(backend="tensorrt", precision="int8"))


def test_a_failed_allocation_frees_what_was_allocated(bundle_copy, fakes):
    trt, cudart = fakes
    build_engine(Bundle(bundle_copy), BuildOptions(), log=_quiet)
    cudart.fail.add("cudaStreamCreate")
    with pytest.raises(EngineError, match="CUDA call cudaStreamCreate failed"):
        TensorRTEngine(Bundle(bundle_copy))
    assert not cudart.buffers


def test_results_are_only_read_after_the_stream_is_synchronised(bundle_copy, fakes):
    """The fake runs asynchronous copies and launches at the synchronise, as a GPU finishes them later: a backend
    that read its pinned outputs without synchronising would return stale memory."""
    trt, cudart = fakes
    bundle = Bundle(bundle_copy)
    build_engine(bundle, BuildOptions(profile=BatchProfile(1, 2, 2)), log=_quiet)
    images = np.stack([textured_part(bundle.spec.image_size, seed=s) for s in range(2)])
    expected = create_engine(bundle, EngineConfig(backend="onnxruntime",
                                                  options=OnnxRuntimeOptions(provider="cpu"))).run(images)
    engine = TensorRTEngine(bundle, EngineConfig(backend="tensorrt"))
    real_call = engine.cuda.call
    engine.cuda.call = lambda name, *a: None if name == "cudaStreamSynchronize" else real_call(name, *a)
    stale = engine.run(images)
    assert all(np.abs(stale[name]).max() == 0 for name in expected)  # nothing had arrived yet
    engine.cuda.call = real_call
    cudart.cudaStreamSynchronize(engine.stream)  # drain what the broken run left queued
    out = engine.run(images)
    for name in expected:
        np.testing.assert_allclose(out[name], expected[name], rtol=0, atol=1e-6)
    engine.close()


def test_no_execution_context_is_a_clear_error(bundle_copy, fakes):
    trt, cudart = fakes
    build_engine(Bundle(bundle_copy), BuildOptions(), log=_quiet)
    trt.context_fails = True  # what create_execution_context() returns when the activations do not fit
    with pytest.raises(EngineError, match=r"could not create an execution context .*123 MiB.*out of GPU memory"):
        TensorRTEngine(Bundle(bundle_copy), EngineConfig(backend="tensorrt"))
    assert not cudart.buffers


def test_a_forgotten_close_still_frees_the_gpu_memory(bundle_copy, fakes):
    import gc

    _, cudart = fakes
    build_engine(Bundle(bundle_copy), BuildOptions(profile=BatchProfile(1, 2, 2)), log=_quiet)
    engine = TensorRTEngine(Bundle(bundle_copy), EngineConfig(backend="tensorrt"))
    engine.run(np.zeros((1, 240, 240, 3), np.uint8))
    assert cudart.buffers and cudart.streams
    del engine
    gc.collect()
    assert not cudart.buffers and not cudart.streams


# ---------------------------------------------------------------- CLI
def test_cli_build_engine_without_tensorrt_says_how_to_get_it(tiny_bundle, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, here and where it exists
    assert cli.main(["build-engine", "--bundle", str(tiny_bundle)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "engine build: error: TensorRT is not installed" in err and "docs/jetson.md" in err


def test_cli_calibration_images_need_int8(tiny_bundle, tmp_path, capsys):
    assert cli.main(["build-engine", "--bundle", str(tiny_bundle), "--calibration-images", str(tmp_path)]) == cli.EXIT_ERROR
    assert "--calibration-images is for --precision int8" in capsys.readouterr().err


def test_cli_build_engine_then_infer_with_the_tensorrt_backend(bundle_copy, fakes, tmp_path, capsys):
    assert cli.main(["build-engine", "--bundle", str(bundle_copy), "--precision", "fp32", "--max-batch", "4"]) == 0
    assert "Fake GPU 9000 (sm87), TensorRT 10.3.0, fp32, batch 1..4 (opt 4)" in capsys.readouterr().out
    folder = tmp_path / "parts"
    _write_images(folder, [(240, 240)] * 3)
    code = cli.main(["infer", "--bundle", str(bundle_copy), "--product", "widget", "--backend", "tensorrt",
                     "--precision", "fp32", "--out", str(tmp_path / "out"), "--quiet", str(folder)])
    assert code == 0
    assert "with tensorrt (Fake GPU 9000 (fp32))" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["error"] is None and 0 <= r["score"] <= 1 for r in records)
    code = cli.main(["infer", "--bundle", str(bundle_copy), "--product", "widget", "--backend", "tensorrt",
                     "--precision", "int8", "--out", str(tmp_path / "out2"), "--quiet", str(folder)])
    assert code == cli.EXIT_ERROR and "precision fp32, asked for int8" in capsys.readouterr().err


# ---------------------------------------------------------------- real TensorRT (skipped without it)
def _no_tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    try:
        cudart = trt_backend.load_cudart()
        err, count = cudart.cudaGetDeviceCount()
    except EngineError as err:
        return str(err)
    return None if err == cudart.cudaError_t.cudaSuccess and count > 0 else "no CUDA device"


FP32_TOLERANCE = 1e-4  # max abs difference TensorRT fp32 (no TF32) vs ONNX Runtime CPU, unit vectors
# fp16 vs fp32 on the final image scores and token maps (both in [0, 1]): the bound a threshold calibrated in fp32
# survives (builders/variants.py FAITHFUL_*); a LayerNorm computed in FP16 moves scores by more than this.
FP16_SCORE_TOLERANCE = 5e-3
FP16_MAP_TOLERANCE = 2e-2


NO_TENSORRT = _no_tensorrt_reason()


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT is not None, reason=str(NO_TENSORRT))
def test_real_tensorrt_engine_matches_onnxruntime(bundle_copy):
    from winclip_edge.inspector import Inspector

    bundle = Bundle(bundle_copy)
    images = np.stack([textured_part(bundle.spec.image_size, seed=s, defect=(60, 80, 40, 40) if s else None)
                       for s in range(3)])
    reference = Inspector(bundle, "widget", engine=EngineConfig(backend="onnxruntime",
                                                                options=OnnxRuntimeOptions(provider="cpu")))
    expected = reference.embed(images)
    expected_scores = reference.score(expected)
    for precision in ("fp32", "fp16"):
        cached = build_engine(bundle, BuildOptions(precision=precision, profile=BatchProfile(1, 2, 2)), log=print)
        report = cached.build["layer_precisions"]
        assert "error" not in report, report
        print(precision, describe_precisions(report))
        if precision == "fp32":
            assert "fp16" not in report["precisions"], report  # no TF32/FP16 kernels in the reference
        else:
            assert report["precisions"].get("fp16", 0) > 0, report  # the flag took effect somewhere
            assert report["fp32_lost"] == [], report  # a visible LayerNorm / L2 norm constraint was not honoured
        engine = TensorRTEngine(bundle, EngineConfig(backend="tensorrt", precision=precision))
        out = engine.run(images)
        engine.close()
        for name, value in expected.items():
            assert np.isfinite(out[name]).all(), f"{precision} {name}: non-finite values"
        scores = reference.score(out)
        score_diff = float(np.abs(scores.image_score - expected_scores.image_score).max())
        map_diff = float(np.abs(scores.token_map - expected_scores.token_map).max())
        if precision == "fp32":
            for name, value in expected.items():
                diff = float(np.abs(out[name] - value).max())
                assert diff <= FP32_TOLERANCE, f"fp32 {name}: max abs difference {diff:.2e} > {FP32_TOLERANCE:.0e}"
        else:
            assert score_diff <= FP16_SCORE_TOLERANCE, f"fp16 image scores differ by {score_diff:.2e}"
            assert map_diff <= FP16_MAP_TOLERANCE, f"fp16 token maps differ by {map_diff:.2e}"
