"""The OpenVINO int8 model of a bundle: NNCF post-training quantisation of visual.onnx on calibration images.

NNCF's transformer recipe (``model_type=TRANSFORMER``, mixed preset: symmetric int8 weights, asymmetric
activations where that helps, fast bias correction) quantises the GEMMs; LayerNorm, softmax, GELU and the L2
normalisations stay float. Calibration images are what the line will see: the product's registered references
when their files are still on disk, else the normal images of the textile data set (conformal-clip-data),
read by the one loader of model inputs (samples.py).
The result is written as OpenVINO IR next to the ONNX variants (engines/openvino.py reads and verifies it);
how faithful it is gets measured by ``winclip-edge engine tune`` / ``bench``, never assumed. Needs ``nncf``
(the ``[openvino]`` extra), which imports torch when torch is installed: this is a build step, not the runtime.
"""
from __future__ import annotations

import datetime as _dt
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import VISUAL_ONNX, Bundle, json_with_checksum
from ..contract import INPUT_NAME
from ..engines.onnx_variants import VariantError
from ..engines.openvino_model import PIP, check_compiled, int8_paths, load_int8
from ..fileio import atomic_write_bytes, atomic_write_json, sha256_file
from ..samples import REFERENCES, TEXTILE, load_model_inputs

DEFAULT_CALIBRATION_IMAGES = 8  # enough for the min-max statistics of PTQ; tune measures the fidelity


def _log(message: str) -> None:
    print(f"[quantize openvino] {message}", file=sys.stderr, flush=True)


def calibration_images(bundle: Bundle, product: str | None = None, limit: int = DEFAULT_CALIBRATION_IMAGES,
                       paths: Sequence[str] = ()) -> tuple[np.ndarray, str]:
    """Model-size uint8 ``[N, H, W, 3]`` calibration images and where they came from: ``paths`` when given, else
    the references, else the textile normals (samples.py). Unreadable files are skipped (and said)."""
    loaded = load_model_inputs(bundle.spec.image_size, paths, bundle=bundle, product=product,
                               fallbacks=(REFERENCES, TEXTILE), limit=limit)
    for path, why in loaded.skipped:
        _log(f"skipping {path}: {why}")
    if not len(loaded.images):
        raise VariantError(f"no readable calibration image among {loaded.tried} from {loaded.source}")
    return loaded.images, loaded.described


@dataclass(frozen=True)
class Int8Info:
    path: Path  # the .xml
    sha256: str  # of the .bin (the weights)
    method: str
    seconds: float


def make_int8(bundle: Bundle, calibration: np.ndarray, described: str) -> Int8Info:
    """Quantise the bundle's graph with NNCF on ``calibration`` and write the verified IR into variants/."""
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        raise VariantError(f"the OpenVINO int8 model needs openvino and nncf ({err}); {PIP}") from None
    t0 = time.perf_counter()
    xml, weights, side = int8_paths(bundle)
    xml.parent.mkdir(parents=True, exist_ok=True)
    _log(f"NNCF post-training quantisation of {bundle.onnx_path} on {described} ...")
    model = ov.Core().read_model(str(bundle.onnx_path))
    batches = [calibration[i:i + 1] for i in range(len(calibration))]
    quantised = nncf.quantize(model, nncf.Dataset(batches, lambda b: {INPUT_NAME: b}), subset_size=len(batches),
                              model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED)
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=xml.parent) as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(quantised, str(tmp_xml), compress_to_fp16=False)  # fp16 constants would cost fidelity
        atomic_write_bytes(weights, tmp_xml.with_suffix(".bin").read_bytes())
        atomic_write_bytes(xml, tmp_xml.read_bytes())
    method = (f"nncf.quantize(model_type=TRANSFORMER, preset=MIXED) on {described}: int8 GEMM weights and "
              "activations, LayerNorm/softmax/GELU/L2 norms float")
    atomic_write_json(side, json_with_checksum({
        "precision": "int8", "backend": "openvino", "file": str(xml.relative_to(bundle.root)),
        "xml_sha256": sha256_file(xml), "bin_sha256": sha256_file(weights),
        "source": VISUAL_ONNX, "source_sha256": bundle.manifest.files[VISUAL_ONNX], "method": method,
        "calibration_images": int(len(calibration)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"openvino": ov.__version__, "nncf": nncf.__version__},
    }))
    # Loads verified and holds the contract (checked here, not through the backend, whose tune preparation
    # calls this module).
    check_compiled(bundle, ov.Core().compile_model(str(load_int8(bundle)), "CPU"), where=str(xml))
    return Int8Info(path=xml, sha256=sha256_file(weights), method=method, seconds=time.perf_counter() - t0)


__all__ = ["DEFAULT_CALIBRATION_IMAGES", "Int8Info", "calibration_images", "make_int8"]
