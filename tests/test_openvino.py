"""OpenVINO backend: same contract and (fp32) the same outputs as ONNX Runtime; bf16 / int8 measured, not assumed."""
import json

import numpy as np
import pytest

from conftest import textured_part
from winclip_edge.bundle import Bundle
from winclip_edge.contract import ContractError
from winclip_edge.engines import EngineConfig, EngineError, create_engine
from winclip_edge.engines.onnx_variants import VariantError
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.openvino import OpenVinoOptions

ov = pytest.importorskip("openvino")

FP32_CLOSE = 1e-5  # unit vectors: OpenVINO's oneDNN kernels vs ONNX Runtime's MLAS, same fp32 graph
LOW_CLOSE = 5e-2  # bf16 / int8 on the tiny random model (measured ~4e-3 bf16, ~8e-3 int8)


def _images(n: int = 3) -> np.ndarray:
    return np.stack([textured_part(seed=s) for s in range(n)])


def _cpu_has(capability: str) -> bool:
    return capability in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _max_diffs(a: dict, b: dict) -> dict:
    assert set(a) == set(b)
    return {k: float(np.abs(a[k] - b[k]).max()) for k in a}


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return create_engine(Bundle(tiny_bundle), EngineConfig(backend="onnxruntime",
                                                           options=OnnxRuntimeOptions(provider="cpu"))).run(_images())


def test_fp32_equals_onnxruntime(bundle_copy, reference):
    bundle = Bundle(bundle_copy)
    engine = create_engine(bundle, EngineConfig(backend="openvino"))
    assert engine.name == "openvino" and "fp32" in engine.device
    out = engine.run(_images())
    assert all(v.dtype == np.float32 for v in out.values())
    diffs = _max_diffs(out, reference)
    assert max(diffs.values()) < FP32_CLOSE, diffs
    # the compiled model was cached for this machine inside the bundle (engines/openvino-<machine key>)
    assert engine.cache is not None and engine.cache.parent == bundle.root / "engines" and any(engine.cache.iterdir())


def test_throughput_hint_runs_the_batch_as_parallel_requests_same_outputs(bundle_copy, reference):
    engine = create_engine(Bundle(bundle_copy), EngineConfig(backend="openvino",
                                                             options=OpenVinoOptions(performance_hint="throughput")))
    diffs = _max_diffs(engine.run(_images()), reference)
    assert max(diffs.values()) < FP32_CLOSE, diffs


def test_bf16_runs_bf16_or_is_refused(bundle_copy, reference):
    config = EngineConfig(backend="openvino", precision="bf16")
    if not _cpu_has("BF16"):
        with pytest.raises(EngineError, match="would run bf16 as f32"):
            create_engine(Bundle(bundle_copy), config)
        return
    diffs = _max_diffs(create_engine(Bundle(bundle_copy), config).run(_images()), reference)
    assert FP32_CLOSE < max(diffs.values()) < LOW_CLOSE, diffs  # really reduced precision, still close


def test_fp16_on_a_cpu_without_fp16_is_refused_not_silently_bf16(bundle_copy):
    if _cpu_has("FP16"):
        pytest.skip("this CPU has fp16 kernels")
    with pytest.raises(EngineError, match="would run fp16 as"):
        create_engine(Bundle(bundle_copy), EngineConfig(backend="openvino", precision="fp16"))


def test_missing_device_and_unknown_hint_are_clear_errors(tiny_bundle):
    with pytest.raises(EngineError, match="OpenVINO device NPU is not available here"):
        create_engine(Bundle(tiny_bundle), EngineConfig(backend="openvino", device="npu"))
    with pytest.raises(EngineError, match="performance hint 'fast' unknown"):
        create_engine(Bundle(tiny_bundle), EngineConfig(backend="openvino",
                                                        options=OpenVinoOptions(performance_hint="fast")))


def test_graph_contract_is_checked_by_name(make_bundle, bundle_copy):
    other = make_bundle(scales=(2,))  # a graph without window_embeddings_k3
    (bundle_copy / "visual.onnx").write_bytes((other / "visual.onnx").read_bytes())
    with pytest.raises(ContractError, match=r"window_embeddings_k3'\] missing"):
        create_engine(Bundle(bundle_copy, verify=False), EngineConfig(backend="openvino"))


def test_int8_model_made_by_nncf_verified_and_close(bundle_copy, reference):
    pytest.importorskip("nncf")
    from winclip_edge.builders.openvino import make_int8
    from winclip_edge.engines.openvino_model import int8_paths

    bundle = Bundle(bundle_copy)
    with pytest.raises(VariantError, match="quantize --bundle .* --backend openvino --precision int8"):
        create_engine(bundle, EngineConfig(backend="openvino", precision="int8"))
    info = make_int8(bundle, np.stack([textured_part(seed=10 + s) for s in range(4)]), "4 test parts")
    xml, weights, side = int8_paths(bundle)
    assert info.path == xml and weights.is_file() and json.loads(side.read_text())["calibration_images"] == 4
    assert [p.name for p in (xml, weights, side)] == ["visual.openvino-int8.xml", "visual.openvino-int8.bin", "visual.openvino-int8.json"]
    diffs = _max_diffs(create_engine(bundle, EngineConfig(backend="openvino", precision="int8")).run(_images()), reference)
    assert FP32_CLOSE < max(diffs.values()) < LOW_CLOSE, diffs
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VariantError, match="fails its sha256 check"):
        create_engine(bundle, EngineConfig(backend="openvino", precision="int8"))
