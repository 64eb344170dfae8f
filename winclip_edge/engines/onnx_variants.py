"""Where the ONNX Runtime backend finds a lower-precision copy of the visual graph (or of the text encoder's
graph, winclip_edge/text_encoder.py), and how it trusts it.

    bundle/variants/visual.<p>.onnx    made by ``winclip-edge engine quantize`` (winclip_edge/builders/variants.py)
    bundle/variants/visual.<p>.json    how it was made, its sha256 and the sha256 of the visual.onnx it came from
    bundle/variants/text.<p>.onnx|json the same for text.onnx

A variant is verified by sha256 on load and refused when the bundle's visual.onnx has changed since.
"""
from __future__ import annotations

from pathlib import Path

from ..bundle import VISUAL_ONNX, Bundle, BundleError, read_checked_json
from ..fileio import sha256_file
from .config import PRECISIONS

VARIANTS = "variants"
GRAPHS = ("visual", "text")  # visual.onnx; text.onnx of the text encoder (manifest section text_encoder)


class VariantError(BundleError):
    """A precision variant is missing, damaged, stale or cannot be made."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise VariantError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")


def source_graph(bundle: Bundle, graph: str = "visual") -> tuple[Path, str]:
    """The fp32 graph that ``graph``'s variants are made from, and its sha256 in the manifest."""
    if graph == "visual":
        return bundle.onnx_path, bundle.manifest.files[VISUAL_ONNX]
    if graph != "text":
        raise VariantError(f"unknown graph {graph!r}; choose one of {GRAPHS}")
    section = bundle.manifest.text_encoder
    if not section:
        raise VariantError(f"bundle {bundle.root} has no text encoder; add it with "
                           f"`winclip-edge add-text-encoder --bundle {bundle.root}`")
    try:
        return bundle.root / section["onnx"], section["files"][section["onnx"]]
    except (KeyError, TypeError) as err:
        raise VariantError(f"the manifest's text_encoder section is malformed ({err!r}); re-create it with "
                           f"`winclip-edge add-text-encoder --bundle {bundle.root} --force`") from None


def variant_path(bundle: Bundle, precision: str, graph: str = "visual") -> Path:
    check_precision(precision)
    source = source_graph(bundle, graph)[0]
    return source if precision == "fp32" else bundle.root / VARIANTS / f"{graph}.{precision}.onnx"


def sidecar_path(bundle: Bundle, precision: str, graph: str = "visual") -> Path:
    return variant_path(bundle, precision, graph).with_suffix(".json")


def load_variant(bundle: Bundle, precision: str, graph: str = "visual") -> Path:
    """The verified graph file of ``precision`` (fp32 = the bundle's own graph, checked where it is loaded)."""
    path = variant_path(bundle, precision, graph)
    if precision == "fp32":
        return path
    option = "" if graph == "visual" else f" --graph {graph}"
    make = f"`winclip-edge engine quantize --bundle {bundle.root}{option} --precision {precision}`"
    side = sidecar_path(bundle, precision, graph)
    if not side.is_file() or not path.is_file():
        raise VariantError(f"bundle {bundle.root} has no {precision} variant ({path} missing); create it with {make}")
    meta = read_checked_json(side)
    source_path, source = source_graph(bundle, graph)
    if meta.get("source_sha256") != source:
        raise VariantError(f"{path} was made from another {source_path.name} (sha256 {str(meta.get('source_sha256'))[:12]}..., "
                           f"the bundle's is {source[:12]}...); re-create it with {make}")
    actual = sha256_file(path)
    if actual != meta.get("file_sha256"):
        raise VariantError(f"{path} fails its sha256 check (expected {str(meta.get('file_sha256'))[:12]}..., got "
                           f"{actual[:12]}...): damaged or partly copied; re-create it with {make}")
    return path


def variant_metadata(bundle: Bundle, precision: str) -> dict:
    """The sidecar of a variant (how it was made, checksums), verified; ``{}`` for fp32."""
    if precision == "fp32":
        return {}
    load_variant(bundle, precision)
    return read_checked_json(sidecar_path(bundle, precision))


# ---------------------------------------------------------------- making variants
