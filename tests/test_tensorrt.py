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
    fp32_layers,
)
from winclip_edge.bundle import VISUAL_ONNX, Bundle
from winclip_edge.contract import INPUT_NAME, ContractError, output_names
from winclip_edge.engines import EngineConfig, EngineError, create_engine
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

    def _result(self, name: str, *values):
        self.calls[name] += 1
        if name in self.fail:
            return (self.cudaError_t.cudaErrorMemoryAllocation, *(0 for _ in values))
        return (self.cudaError_t.cudaSuccess, *values)

    def _allocate(self, name: str, nbytes: int, kind: str):
        if name in self.fail:
            return self._result(name, 0)
        memory = np.zeros(max(int(nbytes), 1), np.uint8)
        self.buffers[memory.ctypes.data] = (memory, kind)
        return self._result(name, memory.ctypes.data)

    def _free(self, name: str, pointer: int, kind: str):
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

    def cudaMalloc(self, nbytes):
        return self._allocate("cudaMalloc", nbytes, "device")

    def cudaMallocHost(self, nbytes):
        return self._allocate("cudaMallocHost", nbytes, "host")

    def cudaFree(self, pointer):
        return self._free("cudaFree", pointer, "device")

    def cudaFreeHost(self, pointer):
        return self._free("cudaFreeHost", pointer, "host")

    def _copy(self, name, dst, src, nbytes, kind):
        to_device = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        assert self.owner(dst, nbytes) == ("device" if to_device else "host")
        assert self.owner(src, nbytes) in ((None, "host") if to_device else ("device",))
        ctypes.memmove(dst, src, nbytes)
        return self._result(name)

    def cudaMemcpy(self, dst, src, nbytes, kind):
        return self._copy("cudaMemcpy", dst, src, nbytes, kind)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        return self._copy("cudaMemcpyAsync", dst, src, nbytes, kind)

    def cudaStreamCreate(self):
        return self._result("cudaStreamCreate", 7)

    def cudaStreamSynchronize(self, stream):
        return self._result("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream):
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
_LAYER_TYPES = {"LayerNormalization": "NORMALIZATION", "Shape": "SHAPE", "MatMul": "MATRIX_MULTIPLY",
                "ReduceMean": "REDUCE", "ReduceL2": "REDUCE", "Softmax": "SOFTMAX"}


class FakeTensor:
    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...] = ()):
        self.name, self.dtype, self.shape = name, dtype, shape


class FakeLayer:
    def __init__(self, name: str, type_, inputs: list, outputs: list):
        self.name, self.type, self.inputs, self.outputs = name, type_, inputs, outputs
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


def network_from_onnx(path: Path, trt) -> FakeNetwork:
    """One layer per ONNX node (Constant nodes become weights, as in TensorRT), tensors named as in the graph."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    tensors: dict[str, FakeTensor] = {}

    def io(value) -> FakeTensor:
        tensor = tensors.setdefault(value.name, FakeTensor(value.name, _ONNX_DTYPES[elem[value.name]]))
        tensor.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
        return tensor

    network = FakeNetwork(inputs=[io(v) for v in graph.input if v.name not in weights])
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        inputs = [tensors[n] for n in node.input if n and n not in weights]
        outputs = [tensors.setdefault(n, FakeTensor(n, _ONNX_DTYPES[elem.get(n, 1)])) for n in node.output]
        network.layers.append(FakeLayer(node.name, getattr(trt.LayerType, _LAYER_TYPES.get(node.op_type, "OTHER")),
                                        inputs, outputs))
    network.outputs = [io(v) for v in graph.output]
    network.onnx_path = str(path)
    return network


class FakeEngine:
    """Deserialised fake plan: the tensor table of the contract, computed by ONNX Runtime."""

    def __init__(self, trt, onnx_path: str, profile: list):
        import onnxruntime as ort

        self.trt = trt
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.profile = [tuple(s) for s in profile]
        outputs = self.session.get_outputs()
        # Engine-level shapes keep -1 where the ONNX graph has a symbolic dim; execution shapes are concrete.
        self.declared = {o.name: tuple(d if isinstance(d, int) else -1 for d in o.shape[1:]) for o in outputs}
        one = self.session.run(None, {INPUT_NAME: np.zeros((1, *self.profile[0][1:]), np.uint8)})
        self.per_image = {o.name: value.shape[1:] for o, value in zip(outputs, one)}
        self.names = [INPUT_NAME, *self.per_image]

    num_io_tensors = property(lambda self: len(self.names))

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
        return FakeContext(self)


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
        cudart = self.engine.trt.cudart
        images = _view(self.addresses[INPUT_NAME], self.shape, np.uint8)
        assert cudart.owner(self.addresses[INPUT_NAME], images.nbytes) == "device"
        names = list(self.engine.per_image)
        for name, value in zip(names, self.engine.session.run(names, {INPUT_NAME: images.copy()})):
            assert cudart.owner(self.addresses[name], value.nbytes) == "device"
            _view(self.addresses[name], value.shape, np.float32)[...] = value
        return True


def fake_tensorrt(cudart: FakeCudart, version: str = FAKE_TRT):
    """A module-like namespace with the TensorRT API the backend and the builder use."""
    trt = SimpleNamespace(__version__=version, cudart=cudart, parser_errors=[], build_fails=False, builds=[])
    trt.float32, trt.float16, trt.uint8 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8)
    trt.nptype = lambda dtype: dtype
    trt.LayerType = enum.Enum("LayerType", "CONSTANT NORMALIZATION SHAPE MATRIX_MULTIPLY REDUCE SOFTMAX ELEMENTWISE "
                                           "UNARY OTHER")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 TF32 OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

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
            self.pools, self.profiles, self.calibration_profile, self.int8_calibrator = {}, [], None, None
            self.timing_cache = None

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
            logger.log(ILogger.Severity.WARNING, "fake builder warning")
            logger.log(ILogger.Severity.INFO, "fake builder info")

        def create_network(self, flags):
            return FakeNetwork()

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            trt.builds.append((network, config))
            if trt.build_fails:
                return None
            int8 = getattr(trt.BuilderFlag, "INT8", None)  # gone in strongly typed TensorRT
            if int8 in config.flags and config.int8_calibrator.read_calibration_cache() is None:
                batches = 0
                while (pointers := config.int8_calibrator.get_batch([INPUT_NAME])) is not None:
                    shape = config.calibration_profile.shapes[INPUT_NAME][1]
                    assert cudart.owner(pointers[0], int(np.prod(shape))) == "device"
                    batches += 1
                if not batches:
                    return None
                config.int8_calibrator.write_calibration_cache(b"fake calibration of %d batches" % batches)
            plan = {"onnx": network.onnx_path, "profile": config.profiles[0].shapes[INPUT_NAME]}
            return PLAN_MAGIC + json.dumps(plan).encode()

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            if trt.parser_errors:
                return False
            parsed = network_from_onnx(Path(path), trt)
            self.network.__dict__.update(parsed.__dict__)
            return True

        num_errors = property(lambda self: len(trt.parser_errors))

        def get_error(self, i):
            return trt.parser_errors[i]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            if not data.startswith(PLAN_MAGIC):
                return None
            plan = json.loads(data[len(PLAN_MAGIC):])
            return FakeEngine(trt, plan["onnx"], plan["profile"])

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
    assert f"winclip-edge build-engine --bundle {tmp_path} --precision fp16" in message
    assert "--engine-dir" not in message  # the default folder needs no option


def test_refusals_without_engines_name_the_folder_and_the_command(tmp_path):
    with pytest.raises(EngineCacheError, match=r"holds no engine.*build-engine --bundle .* --precision int8 --engine-dir"):
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
    engine = FakeEngine(trt, str(bundle.onnx_path), [(n, *spec.image_size, 3) for n in (1, 2, 2)])
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
    chosen = {layer.name for layer in fp32_layers(network, trt)}
    ops = _onnx_node_ops(onnx_path)
    layer_norm = {n for n, op in ops.items() if "/ln_" in n and op != "Constant"}  # open_clip's ln_pre/ln_1/ln_2/ln_post
    assert {ops[n] for n in layer_norm} >= layer_norm_ops
    float_layers = {layer.name for layer in network.layers if all(t.dtype.kind == "f" for t in layer.outputs)}
    assert chosen == (layer_norm | {n for n, op in ops.items() if op == "ReduceL2"}) & float_layers
    assert not {ops[n] for n in chosen} & {"MatMul", "Softmax", "Gemm", "Conv", "Shape"}


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


def test_parser_errors_are_printed_one_by_one(bundle_copy, fakes, monkeypatch):
    trt, _ = fakes
    trt.parser_errors = ["In node 3 (importFallbackPluginImporter): No importer registered for op: LayerNormalization",
                         "second error"]
    monkeypatch.setattr(trt, "__version__", "8.5.2.2")
    messages: list[str] = []
    with pytest.raises(EngineBuildError, match=r"cannot parse .*: 2 error\(s\) listed above. .*--opset 16") as err:
        build_engine(Bundle(bundle_copy), BuildOptions(), log=messages.append)
    assert "8.5.2.2" in str(err.value)
    assert [m for m in messages if m.startswith("ONNX parser error")] == [
        f"ONNX parser error 1/2: {trt.parser_errors[0]}", "ONNX parser error 2/2: second error"]
    assert any("may not import its LayerNormalization" in m for m in messages)  # warned before parsing


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


# ---------------------------------------------------------------- running (fake TensorRT, ONNX Runtime numbers)
def test_engine_runs_batches_in_slices_of_the_profile_and_matches_onnxruntime(bundle_copy, fakes):
    trt, cudart = fakes
    bundle = Bundle(bundle_copy)
    build_engine(bundle, BuildOptions(profile=BatchProfile(1, 2, 2)), log=_quiet)
    engine = create_engine(bundle, EngineConfig(backend="tensorrt", precision="fp16"))
    assert isinstance(engine, TensorRTEngine) and engine.name == "tensorrt"
    assert engine.device == "Fake GPU 9000 (fp16)" and engine.max_batch == 2
    reference = create_engine(bundle, EngineConfig(backend="onnxruntime", provider="cpu"))
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


# ---------------------------------------------------------------- CLI
def test_cli_build_engine_without_tensorrt_says_how_to_get_it(tiny_bundle, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, here and where it exists
    assert cli.main(["build-engine", "--bundle", str(tiny_bundle)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "build-engine: error: TensorRT is not installed" in err and "docs/jetson.md" in err


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
FP16_TOLERANCE = 5e-2  # a loose bound: catches overflow and wrong bindings, not precision regressions


NO_TENSORRT = _no_tensorrt_reason()


@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT is not None, reason=str(NO_TENSORRT))
def test_real_tensorrt_engine_matches_onnxruntime(bundle_copy):
    bundle = Bundle(bundle_copy)
    images = np.random.default_rng(0).integers(0, 256, (3, *bundle.spec.image_size, 3), dtype=np.uint8)
    expected = create_engine(bundle, EngineConfig(backend="onnxruntime", provider="cpu")).run(images)
    for precision, tolerance in (("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)):
        build_engine(bundle, BuildOptions(precision=precision, profile=BatchProfile(1, 2, 2)), log=_quiet)
        engine = TensorRTEngine(bundle, EngineConfig(backend="tensorrt", precision=precision))
        out = engine.run(images)
        engine.close()
        for name, value in expected.items():
            assert np.isfinite(out[name]).all(), f"{precision} {name}: non-finite values"
            diff = float(np.abs(out[name] - value).max())
            assert diff <= tolerance, f"{precision} {name}: max abs difference {diff:.2e} > {tolerance:.0e}"
