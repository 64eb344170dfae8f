"""GPU paths that can be checked without a GPU: what the ONNX Runtime backend asks of its CUDA / TensorRT execution
providers, and on which device the torch backend captures its CUDA graphs.

ONNX Runtime here is the CPU build: the tests make the GPU providers "available" and record the providers and options
each session is created with, then run that session on the CPU, so the contract check and the batch splitting still
run on real numbers. That ONNX Runtime accepts these option names is checked against its documented TensorRT provider
options (onnxruntime.ai, TensorRT-ExecutionProvider); running them needs a GPU (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.engines import EngineConfig, EngineError, create_engine
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.registry import machine_key

ort = pytest.importorskip("onnxruntime")
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def sessions(monkeypatch):
    """Records (model path, providers) of every InferenceSession; the session itself runs on the CPU."""
    created: list[SimpleNamespace] = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        created.append(SimpleNamespace(path=str(path), providers=providers))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.setattr(ort, "InferenceSession", session)
    return created


def _trt_options(created) -> dict:
    name, options = created[-1].providers[0]
    assert name == "TensorrtExecutionProvider"
    return options


@pytest.mark.parametrize("precision, fp16", [("fp32", False), ("fp16", True)])
def test_tensorrt_provider_gets_precision_profile_and_caches(bundle_copy, sessions, precision, fp16):
    bundle = Bundle(bundle_copy)
    create_engine(bundle, EngineConfig(backend="onnxruntime", precision=precision,
                                       options=OnnxRuntimeOptions(provider="tensorrt", max_batch=4)))
    options = _trt_options(sessions)
    assert options["trt_fp16_enable"] is fp16
    assert sessions[-1].path == str(bundle.onnx_path)  # fp16 is TensorRT's flag on the fp32 graph, not the ONNX variant
    cache = bundle_copy / "engines" / f"onnxruntime-tensorrt-{machine_key()}"  # keyed: ORT asks for a clean one per version
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(cache) and cache.is_dir()
    assert options["trt_timing_cache_enable"] and options["trt_timing_cache_path"] == str(cache)
    assert (options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]) == (
        "images:1x240x240x3", "images:4x240x240x3", "images:4x240x240x3")
    assert options["device_id"] == 0
    assert sessions[-1].providers[1] == ("CUDAExecutionProvider", {"device_id": 0})  # for nodes TensorRT leaves
    assert sessions[-1].providers[2] == "CPUExecutionProvider"


def test_tensorrt_provider_caches_under_engine_dir_on_the_asked_gpu(bundle_copy, sessions, tmp_path):
    create_engine(Bundle(bundle_copy), EngineConfig(backend="onnxruntime", engine_dir=tmp_path / "cache", device="cuda:1",
                                                           options=OnnxRuntimeOptions(provider="tensorrt")))
    options = _trt_options(sessions)
    assert options["trt_engine_cache_path"] == str(tmp_path / "cache" / f"onnxruntime-tensorrt-{machine_key()}")
    assert options["device_id"] == 1 and sessions[-1].providers[1] == ("CUDAExecutionProvider", {"device_id": 1})
    assert options["trt_profile_max_shapes"] == "images:8x240x240x3"  # the default batch
    assert not (bundle_copy / "engines" / f"onnxruntime-tensorrt-{machine_key()}").exists()  # the bundle is not written to


def test_tensorrt_provider_batches_beyond_the_profile_are_split(tiny_bundle, sessions):
    bundle = Bundle(tiny_bundle)
    images = np.random.default_rng(0).integers(0, 256, (5, 240, 240, 3), dtype=np.uint8)
    engine = create_engine(bundle, EngineConfig(backend="onnxruntime", engine_dir=tiny_bundle.parent / "c",
                                                options=OnnxRuntimeOptions(provider="tensorrt", max_batch=2)))
    calls = []
    real_run = engine.session.run
    engine.session.run = lambda names, feed: calls.append(len(feed["images"])) or real_run(names, feed)
    out = engine.run(images)
    assert calls == [2, 2, 1]
    expected = create_engine(bundle, EngineConfig(backend="onnxruntime",
                                                  options=OnnxRuntimeOptions(provider="cpu"))).run(images)
    for name in expected:
        np.testing.assert_allclose(out[name], expected[name], rtol=0, atol=1e-5)


def test_tensorrt_provider_errors_are_one_line(tiny_bundle, sessions, tmp_path, monkeypatch):
    bundle = Bundle(tiny_bundle)
    with pytest.raises(EngineError, match="TensorRT int8 needs its own calibration.*engine build .* --precision int8"):
        create_engine(bundle, EngineConfig(backend="onnxruntime", precision="int8",
                                           options=OnnxRuntimeOptions(provider="tensorrt")))
    with pytest.raises(EngineError, match="not a CUDA device"):
        create_engine(bundle, EngineConfig(backend="onnxruntime", device="cpu", engine_dir=tmp_path / "ok",
                                                options=OnnxRuntimeOptions(provider="tensorrt")))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EngineError, match=r"cannot keep its engine cache in .*file/onnxruntime-tensorrt-[0-9a-f]{12} .*--engine-dir"):
        create_engine(bundle, EngineConfig(backend="onnxruntime", engine_dir=blocker,
                                           options=OnnxRuntimeOptions(provider="tensorrt")))

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)  # a read-only bundle (root would be allowed to write here)
    with pytest.raises(EngineError) as err:
        create_engine(bundle, EngineConfig(backend="onnxruntime", options=OnnxRuntimeOptions(provider="tensorrt")))
    assert "\n" not in str(err.value) and "Permission denied" in str(err.value) and "--engine-dir" in str(err.value)


def test_cuda_provider_runs_the_fp16_variant_on_the_asked_gpu(bundle_copy, sessions):
    from winclip_edge.builders.variants import make_variant

    bundle = Bundle(bundle_copy)
    info = make_variant(bundle, "fp16")
    create_engine(bundle, EngineConfig(backend="onnxruntime", precision="fp16", device="cuda:2",
                                            options=OnnxRuntimeOptions(provider="cuda")))
    assert sessions[-1].path == str(info.path)
    assert sessions[-1].providers == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]


def test_device_says_where_onnxruntime_runs_and_the_provider_must_agree(bundle_copy, sessions):
    """--device has one meaning: where the graph runs. With the provider left to auto it picks it."""
    bundle = Bundle(bundle_copy)
    create_engine(bundle, EngineConfig(backend="onnxruntime", device="cpu"))
    assert sessions[-1].providers == ["CPUExecutionProvider"]
    create_engine(bundle, EngineConfig(backend="onnxruntime", device="cuda:1"))
    assert sessions[-1].providers == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    create_engine(bundle, EngineConfig(backend="onnxruntime"))
    assert sessions[-1].providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # auto: ONNX Runtime's order
    with pytest.raises(EngineError, match="provider cpu runs on the CPU, not on device 'cuda'"):
        create_engine(bundle, EngineConfig(backend="onnxruntime", device="cuda",
                                           options=OnnxRuntimeOptions(provider="cpu")))
    with pytest.raises(EngineError, match="not a CUDA device"):
        create_engine(bundle, EngineConfig(backend="onnxruntime", device="cpu",
                                           options=OnnxRuntimeOptions(provider="cuda")))


def test_cuda_python_is_bounded_to_the_cuda_12_bindings():
    """cuda-python 13 needs a CUDA 13 driver (>= 580): an unbounded requirement breaks CUDA-12 machines."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    trt = re.search(r"^trt = \[(.*)\]", text, re.M).group(1)
    cuda = re.search(r'"(cuda-python[^"]*)"', trt).group(1)
    assert "<13" in cuda.replace(" ", ""), cuda


# ---------------------------------------------------------------- torch CUDA graphs on the configured device
class _FakeCuda:
    """The torch.cuda calls of TorchEngine._capture / _run_graph, recording the current device at each."""

    def __init__(self):
        self.current, self.events = 0, []
        cuda = self

        class Graph:
            def replay(self):
                cuda.events.append(("replay", cuda.current))

        class Stream:
            def __init__(self, device=None):
                cuda.events.append(("stream", cuda.current))

            def wait_stream(self, other):
                pass

        self.CUDAGraph, self.Stream = Graph, Stream

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, device.index
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def graph(self, graph):
        self.events.append(("capture", self.current))
        yield

    @contextlib.contextmanager
    def stream(self, stream):
        yield

    def current_stream(self, device=None):
        return self.Stream()


def test_cuda_graphs_are_captured_and_replayed_on_the_configured_device():
    """``--device cuda:1`` must capture on GPU 1 even when GPU 0 is the current device (torch.cuda.graph and the
    graph's memory pool use the current device)."""
    torch = pytest.importorskip("torch")
    from winclip_edge.engines.torch import TorchEngine

    fake_cuda = _FakeCuda()
    engine = TorchEngine.__new__(TorchEngine)
    engine.torch = SimpleNamespace(cuda=fake_cuda, zeros=torch.zeros, uint8=torch.uint8, no_grad=torch.no_grad,
                                   from_numpy=torch.from_numpy, backends=torch.backends)
    engine.torch_device = SimpleNamespace(type="cuda", index=1)
    engine.precision, engine._graphs = "fp32", {}

    class Pinned:  # stands in for the pinned host / device tensors
        def __init__(self, *shape):
            self.data = torch.zeros(*shape, dtype=torch.uint8)

        def pin_memory(self):
            return self

        def to(self, device):
            return self

        def copy_(self, other, non_blocking=False):
            return self

        def __getitem__(self, index):
            return self.data[index]

    engine.torch.zeros = lambda shape, dtype: Pinned(*shape)
    engine._forward = lambda images: {"image_embedding": torch.zeros(2, 4)}
    engine.run = TorchEngine.run.__get__(engine)
    engine.cuda_graphs = True
    out = engine._run_graph(np.zeros((2, 8, 8, 3), np.uint8))
    assert out["image_embedding"].shape == (2, 4)
    assert ("capture", 1) in fake_cuda.events and ("replay", 1) in fake_cuda.events
    assert all(device == 1 for _, device in fake_cuda.events), fake_cuda.events
