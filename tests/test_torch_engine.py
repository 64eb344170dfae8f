"""The torch backend: fp32 equals ONNX Runtime, fp16 keeps LayerNorm in fp32, CUDA graphs equal eager."""
import numpy as np
import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.engines import EngineConfig, EngineError, create_engine
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.torch import TorchOptions, graph_batch_size

torch = pytest.importorskip("torch")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FP32_TOLERANCE = 1e-4  # max abs difference of unit vectors, as the export verification
FP16_TOLERANCE = 5e-3


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 240, 240, 3), dtype=np.uint8)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """ONNX Runtime (CPU) outputs of a fixed batch: the bundle's verified graph."""
    bundle = Bundle(tiny_bundle)
    engine = create_engine(bundle, EngineConfig(backend="onnxruntime", options=OnnxRuntimeOptions(provider="cpu")))
    images = _images(3)
    return bundle, images, engine.run(images)


def test_cpu_fp32_equals_onnxruntime(reference):
    bundle, images, expected = reference
    engine = create_engine(bundle, EngineConfig(backend="torch", device="cpu"))
    assert engine.device == "cpu, torch fp32"
    assert _max_diff(engine.run(images), expected) < FP32_TOLERANCE


def test_fp16_keeps_layernorm_fp32_and_stays_close(reference):
    bundle, images, expected = reference
    engine = create_engine(bundle, EngineConfig(backend="torch", device="cpu", precision="fp16"))
    visual = engine.module.visual
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    linears = [m for m in visual.modules() if isinstance(m, torch.nn.Linear)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert linears and all(m.weight.dtype == torch.float16 for m in linears)
    assert visual.proj.dtype == torch.float16
    out = engine.run(images[:1])  # CPU half kernels are slow: one image is enough
    assert all(v.dtype == np.float32 for v in out.values())
    diff = _max_diff(out, {k: v[:1] for k, v in expected.items()})
    assert 0 < diff < FP16_TOLERANCE  # > 0: the half path really ran


@pytest.mark.parametrize("options,message", [
    ({"precision": "int8"}, "int8 is an ONNX Runtime variant"),
    ({"device": "cpu", "options": TorchOptions(cuda_graphs=True)}, "CUDA graphs need a CUDA device"),
    ({"device": "tpu:0"}, "not valid"),
])
def test_bad_options_are_refused(tiny_bundle, options, message):
    with pytest.raises(EngineError, match=message):
        create_engine(Bundle(tiny_bundle), EngineConfig(backend="torch", **options))


def test_graph_batch_size_pads_to_the_smallest_captured_size():
    assert graph_batch_size(3, []) is None
    assert graph_batch_size(3, [8, 4]) == 4
    assert graph_batch_size(4, [8, 4]) == 4
    assert graph_batch_size(9, [8, 4]) is None


@cuda
@pytest.mark.cuda
def test_cuda_fp32_equals_onnxruntime(reference):
    bundle, images, expected = reference
    engine = create_engine(bundle, EngineConfig(backend="torch", device="cuda"))
    assert _max_diff(engine.run(images), expected) < FP32_TOLERANCE


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_equal_eager_and_pad_smaller_batches(reference, precision):
    bundle, images, _ = reference
    eager = create_engine(bundle, EngineConfig(backend="torch", device="cuda", precision=precision))
    graphs = create_engine(bundle, EngineConfig(backend="torch", device="cuda", precision=precision,
                                                  options=TorchOptions(cuda_graphs=True)))
    more = _images(5, seed=1)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE  # padded shapes may pick other kernels
    for batch in (images, images[:2], more, images[:1]):  # capture 3, pad 2 -> 3, capture 5, pad 1 -> 3
        assert _max_diff(graphs.run(batch), eager.run(batch)) < tolerance
    assert graphs.captured_batch_sizes == [3, 5]


@cuda
@pytest.mark.cuda
def test_cuda_fp16_stays_close(reference):
    bundle, images, expected = reference
    assert _max_diff(create_engine(bundle, EngineConfig(backend="torch", device="cuda", precision="fp16")).run(images), expected) < FP16_TOLERANCE
