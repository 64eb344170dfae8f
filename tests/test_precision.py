"""Precision variants: made by ONNX Runtime's converters, same contract, verified on load, fidelity measured."""
import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from conftest import textured_part

from winclip_edge.builders.variants import make_variant
from winclip_edge.bundle import Bundle, BundleError, json_with_checksum
from winclip_edge.cli import EXIT_ERROR, EXIT_OK, main
from winclip_edge.engines import EngineConfig, create_engine
from winclip_edge.engines.onnxruntime import OnnxRuntimeOptions
from winclip_edge.engines.onnx_variants import VariantError, load_variant, sidecar_path, variant_path
from winclip_edge.performance.fidelity import FAITHFUL_MAP_MAX_ABS, FAITHFUL_SCORE_MAX_ABS, fidelity
from winclip_edge.fileio import atomic_write_json
from winclip_edge.scoring import Scores

onnx = pytest.importorskip("onnx")

# Max abs difference of the unit-vector outputs from fp32 on the tiny model (measured ~5e-4 fp16, ~1e-2 int8).
CLOSE = {"fp16": 3e-3, "int8": 5e-2}


def _images(n: int = 2) -> np.ndarray:
    return np.stack([textured_part(seed=s) for s in range(n)])


def _diffs(bundle: Bundle, precision: str, images: np.ndarray) -> dict[str, float]:
    reference = create_engine(bundle, EngineConfig(backend="onnxruntime",
                                                   options=OnnxRuntimeOptions(provider="cpu"))).run(images)
    variant = create_engine(bundle, EngineConfig(backend="onnxruntime", precision=precision,
                                                 options=OnnxRuntimeOptions(provider="cpu")))
    out = variant.run(images)
    return {k: float(np.abs(out[k] - reference[k]).max()) for k in reference}


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_fp16_variant_keeps_contract_and_layernorm_fp32(bundle_copy):
    bundle = Bundle(bundle_copy)
    info = make_variant(bundle, "fp16")
    assert info.path == variant_path(bundle, "fp16") and info.path.parent.name == "variants"
    model = onnx.load(str(info.path))
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert types["images"] == onnx.TensorProto.UINT8
    assert all(t == onnx.TensorProto.FLOAT for name, t in types.items() if name != "images")
    fp16_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "no weight was converted to fp16"
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    elem.update({t.name: t.data_type for t in inferred.graph.initializer})
    norms = [n for n in inferred.graph.node if n.op_type == "LayerNormalization"]
    assert norms
    for n in norms:  # data, scale and bias of every LayerNorm are fp32
        assert [elem.get(name) for name in n.input[:3]] == [onnx.TensorProto.FLOAT] * 3, (n.name, list(n.input))
    diffs = _diffs(bundle, "fp16", _images())
    assert 0 < max(diffs.values()) < CLOSE["fp16"], diffs


def test_int8_dynamic_variant(bundle_copy):
    bundle = Bundle(bundle_copy)
    make_variant(bundle, "int8")
    path = load_variant(bundle, "int8")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & _op_types(path)
    diffs = _diffs(bundle, "int8", _images())
    assert 0 < max(diffs.values()) < CLOSE["int8"], diffs
    assert json.loads(sidecar_path(bundle, "int8").read_text())["calibration_images"] == 0


def test_int8_static_variant_with_calibration_images(bundle_copy):
    bundle = Bundle(bundle_copy)
    make_variant(bundle, "int8", calibration=_images(2))
    path = load_variant(bundle, "int8")
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(path)
    assert json.loads(sidecar_path(bundle, "int8").read_text())["calibration_images"] == 2
    diffs = _diffs(bundle, "int8", _images(3)[2:])  # an image it was not calibrated on
    assert max(diffs.values()) < CLOSE["int8"], diffs


def test_fp32_is_the_bundle_graph_and_bad_requests_are_refused(bundle_copy):
    bundle = Bundle(bundle_copy)
    assert load_variant(bundle, "fp32") == bundle.onnx_path
    with pytest.raises(VariantError, match="fp32 is the bundle's own"):
        make_variant(bundle, "fp32")
    with pytest.raises(VariantError, match="int8 only"):
        make_variant(bundle, "fp16", calibration=_images(1))
    with pytest.raises(VariantError, match="unknown precision"):
        load_variant(bundle, "fp8")
    with pytest.raises(VariantError, match="winclip-edge engine quantize --bundle .* --precision int8"):
        load_variant(bundle, "int8")


def test_damaged_or_stale_variants_are_refused(bundle_copy):
    bundle = Bundle(bundle_copy)
    info = make_variant(bundle, "int8")
    data = bytearray(info.path.read_bytes())
    data[-1] ^= 0xFF
    info.path.write_bytes(bytes(data))
    with pytest.raises(VariantError, match="fails its sha256 check"):
        load_variant(bundle, "int8")

    make_variant(bundle, "int8")
    side = sidecar_path(bundle, "int8")
    meta = json.loads(side.read_text())
    side.write_text(side.read_text().replace(meta["method"][:20], "edited by hand"))
    with pytest.raises(BundleError, match="sha256"):
        load_variant(bundle, "int8")

    atomic_write_json(side, json_with_checksum({**meta, "source_sha256": "0" * 64}))  # from an older visual.onnx
    with pytest.raises(VariantError, match="made from another visual.onnx"):
        load_variant(bundle, "int8")


def test_fidelity_numbers():
    outputs = {"image_embedding": np.zeros((2, 4), np.float32)}
    ref = Scores(image_score=np.array([0.2, 0.5], np.float32), token_map=np.full((2, 3, 3), 0.5, np.float32),
                 zero_shot_score=np.array([0.2, 0.5], np.float32))
    token_map = ref.token_map.copy()
    token_map[1, 2, 2] += 0.09
    cand = Scores(image_score=np.array([0.2, 0.504], np.float32), token_map=token_map, zero_shot_score=ref.zero_shot_score)
    shifted = {"image_embedding": outputs["image_embedding"] + 0.25}
    f = fidelity((outputs, ref), (shifted, cand))
    assert f.images == 2
    assert f.score_max_abs == pytest.approx(0.004, abs=1e-6) and f.score_mean_abs == pytest.approx(0.002, abs=1e-6)
    assert f.map_max_abs == pytest.approx(0.09, abs=1e-6) and f.map_mean_abs == pytest.approx(0.09 / 18, abs=1e-6)
    assert f.embedding_max_abs == {"image_embedding": 0.25}
    assert FAITHFUL_SCORE_MAX_ABS >= 0.004 and FAITHFUL_MAP_MAX_ABS < 0.09 and not f.faithful
    assert fidelity((outputs, ref), (outputs, ref)).faithful


def test_cli_quantize_then_infer_with_the_variant(bundle_copy, tmp_path, capsys):
    image = tmp_path / "part.png"
    cv2.imwrite(str(image), textured_part(seed=3))
    infer = ["infer", "--bundle", str(bundle_copy), "--product", "widget", "--quiet", "--no-overlays", str(image)]
    assert main([*infer, "--precision", "fp16", "--out", str(tmp_path / "none")]) == EXIT_ERROR
    assert "winclip-edge engine quantize" in capsys.readouterr().err
    assert main(["quantize", "--bundle", str(bundle_copy), "--precision", "fp16",
                 "--calibration-images", str(image)]) == EXIT_ERROR  # calibration is for int8
    assert main(["quantize", "--bundle", str(bundle_copy), "--precision", "int8",
                 "--calibration-images", str(image)]) == EXIT_OK
    assert "variants/visual.int8.onnx" in capsys.readouterr().out
    scores = {}
    for precision in ("fp32", "int8"):
        assert main([*infer, "--precision", precision, "--out", str(tmp_path / precision)]) == EXIT_OK
        scores[precision] = json.loads((tmp_path / precision / "results.jsonl").read_text())["score"]
    assert scores["int8"] != scores["fp32"] and abs(scores["int8"] - scores["fp32"]) < 0.05


def test_variants_need_no_torch(bundle_copy):
    """Making and running variants is runtime work: torch and open_clip stay unimported."""
    script = textwrap.dedent(f"""
        import sys
        from winclip_edge.bundle import Bundle
        from winclip_edge.engines import EngineConfig, create_engine
        from winclip_edge.builders.variants import make_variant
        import numpy as np
        bundle = Bundle({str(bundle_copy)!r})
        make_variant(bundle, "int8")
        out = create_engine(bundle, EngineConfig(backend="onnxruntime", precision="int8")).run(
            np.zeros((1, 240, 240, 3), np.uint8))
        assert not any(m.split(".")[0] in ("torch", "open_clip") for m in sys.modules), "torch was imported"
        print("OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr
