"""The OpenVINO files of a bundle and how they are trusted: the NNCF int8 model, and the contract check of a
compiled model. Shared by the backend (engines/openvino.py) and the builder of the int8 model
(builders/openvino.py), which checks what it made without going through the backend.

    bundle/variants/visual.openvino-int8.xml / .bin     OpenVINO IR, int8 weights + activations of the GEMMs
    bundle/variants/visual.openvino-int8.json           method, calibration images, sha256 of both files and
                                                         of the visual.onnx it came from

Imports no OpenVINO: its objects are handed in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundle import VISUAL_ONNX, Bundle, read_checked_json
from ..contract import check_io
from ..fileio import sha256_file
from .onnx_variants import VARIANTS, VariantError

INT8_STEM = "visual.openvino-int8"
PIP = "pip install 'winclip-edge[openvino]'"


def int8_paths(bundle: Bundle) -> tuple[Path, Path, Path]:
    """(xml, bin, sidecar json) of the bundle's OpenVINO int8 model."""
    folder = bundle.root / VARIANTS
    return folder / f"{INT8_STEM}.xml", folder / f"{INT8_STEM}.bin", folder / f"{INT8_STEM}.json"


def load_int8(bundle: Bundle) -> Path:
    """The verified int8 IR (.xml) of the bundle; refused when missing, damaged or made from another graph."""
    xml, weights, side = int8_paths(bundle)
    make = f"`winclip-edge engine quantize --bundle {bundle.root} --backend openvino --precision int8`"
    if not (xml.is_file() and weights.is_file() and side.is_file()):
        raise VariantError(f"bundle {bundle.root} has no OpenVINO int8 model ({xml} missing); create it with {make}")
    meta = read_checked_json(side)
    source = bundle.manifest.files[VISUAL_ONNX]
    if meta.get("source_sha256") != source:
        raise VariantError(f"{xml} was made from another visual.onnx; re-create it with {make}")
    for path, key in ((xml, "xml_sha256"), (weights, "bin_sha256")):
        if sha256_file(path) != meta.get(key):
            raise VariantError(f"{path} fails its sha256 check: damaged or partly copied; re-create it with {make}")
    return xml


def _shape(partial: Any) -> tuple:
    return tuple(d.get_length() if d.is_static else -1 for d in partial)


def check_compiled(bundle: Bundle, compiled: Any, where: str) -> None:
    """A compiled model's inputs and outputs against the bundle's graph contract (names, dtypes' shapes)."""
    inputs = {p.get_any_name(): _shape(p.get_partial_shape()) for p in compiled.inputs}
    outputs = {p.get_any_name(): _shape(p.get_partial_shape()) for p in compiled.outputs}
    check_io(bundle.spec, inputs, outputs, where=where)


__all__ = ["INT8_STEM", "PIP", "check_compiled", "int8_paths", "load_int8"]
