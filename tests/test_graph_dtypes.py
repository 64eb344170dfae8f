"""Element types of every tensor in the exported graph and its variants, by ONNX shape inference.

TensorRT's ONNX parser (onnx-tensorrt ModelImporter) accepts uint8 only as a network input or output, and an
input only when it feeds a Cast: "TensorRT does not support UINT8 types for intermediate tensors". The image
input is uint8, so the graph must cast it to float before any other op. These checks need no GPU.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from winclip_edge.bundle import Bundle
from winclip_edge.contract import INPUT_NAME

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

UINT8 = 2  # onnx.TensorProto.UINT8
FLOATS = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16 (the fp16 variant casts the input straight to half)
# Outputs of these ops are uint8 by the ONNX definition (quantised activations of the CPU-only int8 graphs).
QUANTISED_ACTIVATION_OPS = ("DynamicQuantizeLinear", "QuantizeLinear")


def element_types(model) -> dict[str, int]:
    """tensor name -> ONNX element type of every tensor of the graph (inputs, initializers, constants, every
    node output), after shape inference over the whole graph. Fails if inference leaves any tensor untyped,
    so an unchecked tensor cannot hide a uint8."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    untyped = [o for node in graph.node for o in node.output if o and types.get(o, 0) == 0]
    assert not untyped, f"shape inference left {len(untyped)} tensor(s) untyped, e.g. {untyped[:5]}"
    return types


def uint8_tensors(model) -> dict[str, str]:
    """uint8 tensors other than the graph input -> the op that makes them ('' for initializers)."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return {name: producers.get(name, "") for name, t in element_types(model).items()
            if t == UINT8 and name != INPUT_NAME}


def assert_input_feeds_only_a_float_cast(model) -> None:
    consumers = [n for n in model.graph.node if INPUT_NAME in n.input]
    assert consumers, "the graph input feeds no node"
    for node in consumers:
        to = {a.name: a.i for a in node.attribute}.get("to")
        assert node.op_type == "Cast" and to in FLOATS, \
            f"'{INPUT_NAME}' feeds {node.op_type} {node.name!r} (to={to}); TensorRT needs a Cast to float first"


@pytest.mark.parametrize("config,options", [("tiny240", {}), ("tinyrect", {}), ("tiny240", {"patch_layer": "last"}),
                                            ("tiny240", {"cls_only_last_block": False})])
def test_no_tensor_of_the_exported_graph_but_its_input_is_uint8(make_bundle, config, options):
    model = onnx.load(str(Bundle(make_bundle(config, **options)).onnx_path))
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {INPUT_NAME: UINT8}
    assert uint8_tensors(model) == {}
    assert_input_feeds_only_a_float_cast(model)


def test_the_check_finds_a_uint8_transpose_before_the_cast(tmp_path):
    """The graph as exported before the fix (permute, then float) is caught by the same check."""

    class PermuteThenCast(torch.nn.Module):
        def forward(self, images):
            return images.permute(0, 3, 1, 2).float() / 255.0

    path = tmp_path / "old.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(PermuteThenCast(), (torch.zeros(1, 8, 8, 3, dtype=torch.uint8),), str(path), dynamo=False,
                          input_names=[INPUT_NAME], output_names=["out"], opset_version=17)
    model = onnx.load(str(path))
    assert set(uint8_tensors(model).values()) == {"Transpose"}
    with pytest.raises(AssertionError, match="TensorRT needs a Cast"):
        assert_input_feeds_only_a_float_cast(model)


def test_the_fp16_variant_has_no_uint8_tensor_but_its_input(bundle_copy):
    from winclip_edge.builders.variants import make_variant

    info = make_variant(Bundle(bundle_copy), "fp16")
    model = onnx.load(str(info.path))
    assert uint8_tensors(model) == {}
    assert_input_feeds_only_a_float_cast(model)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_int8_variants_hold_uint8_only_as_quantised_activations(bundle_copy, static):
    """The int8 ONNX variants are for ONNX Runtime's CPU provider (build-engine calibrates TensorRT INT8 from the
    fp32 graph): their only uint8 tensors are quantised activations, which the quantisation ops make by their ONNX
    definition, and the zero points of those ops; the image input is still cast to float first."""
    from conftest import textured_part
    from winclip_edge.builders.variants import make_variant

    calibration = np.stack([textured_part(seed=0)]) if static else None
    info = make_variant(Bundle(bundle_copy), "int8", calibration=calibration)
    model = onnx.load(str(info.path))
    found = uint8_tensors(model)
    assert found
    zero_points = {n.input[2] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    for name, producer in found.items():
        assert producer in QUANTISED_ACTIVATION_OPS or (producer == "" and name in zero_points), (name, producer)
    assert_input_feeds_only_a_float_cast(model)
