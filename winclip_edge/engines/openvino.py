"""OpenVINO backend: the bundle's ONNX graph compiled by OpenVINO for the CPU (or an Intel GPU / NPU).

Precisions: ``fp32`` | ``bf16`` | ``fp16`` set OpenVINO's ``INFERENCE_PRECISION_HINT`` on the fp32 graph (the
device computes in that type, LayerNorm and softmax accumulate in fp32 inside OpenVINO's kernels); ``int8``
runs the NNCF post-training-quantised copy made by ``winclip-edge quantize --backend openvino`` (or
``tune``), stored and verified like the ONNX variants::

    bundle/variants/visual.openvino-int8.xml / .bin     OpenVINO IR, int8 weights + activations of the GEMMs
    bundle/variants/visual.openvino-int8.json           method, calibration images, sha256 of both files and
                                                         of the visual.onnx it came from

A precision the device would silently replace (bf16 on a CPU without AVX512-BF16/AMX, fp16 on a CPU, which
OpenVINO runs as bf16 or fp32) is refused with the reason, so a name always means what runs.

The compiled model is cached (OpenVINO's ``CACHE_DIR``) under ``<engine_dir or bundle/engines>/openvino-<machine
key>``: a second start on the same machine and library versions loads the compiled blob instead of reading
and optimising the ONNX graph. A read-only bundle simply runs without the cache.

``performance_hint``: ``latency`` (one request uses every core: batch 1 on a line) or ``throughput``
(OpenVINO's streams; the images of a batch run as parallel requests).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..bundle import VISUAL_ONNX, Bundle, read_checked_json
from ..contract import INPUT_NAME, check_io, output_names
from ..fileio import sha256_file
from ..performance.machine import machine_key
from .base import EngineError
from .config import EngineConfig
from .onnx_variants import VARIANTS, VariantError

OPENVINO_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
PERFORMANCE_HINTS = ("latency", "throughput")
_HINT_TYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: the ops NNCF left float
DEVICE_ALIASES = {"auto": "CPU", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
INT8_STEM = "visual.openvino-int8"
CACHE_PREFIX = "openvino-"
ENGINE_DIR = "engines"
PIP = "pip install 'winclip-edge[openvino]'"


def int8_paths(bundle: Bundle) -> tuple[Path, Path, Path]:
    """(xml, bin, sidecar json) of the bundle's OpenVINO int8 model."""
    folder = bundle.root / VARIANTS
    return folder / f"{INT8_STEM}.xml", folder / f"{INT8_STEM}.bin", folder / f"{INT8_STEM}.json"


def load_int8(bundle: Bundle) -> Path:
    """The verified int8 IR (.xml) of the bundle; refused when missing, damaged or made from another graph."""
    xml, weights, side = int8_paths(bundle)
    make = f"`winclip-edge quantize --bundle {bundle.root} --backend openvino --precision int8`"
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


def cache_dir(bundle: Bundle, config: EngineConfig) -> Path | None:
    """OpenVINO's compiled-model cache folder for this machine, or None where it cannot be written."""
    folder = Path(config.engine_dir or bundle.root / ENGINE_DIR) / f"{CACHE_PREFIX}{machine_key()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _shape(partial) -> tuple:
    return tuple(d.get_length() if d.is_static else -1 for d in partial)


class OpenVinoEngine:
    name = "openvino"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(backend="openvino")):
        try:
            import openvino as ov
        except ImportError as err:
            raise EngineError(f"openvino is not installed ({err}); {PIP}") from None
        precision = config.resolved_precision
        if precision not in OPENVINO_PRECISIONS:
            raise EngineError(f"OpenVINO precision {precision!r} unknown; choose one of {OPENVINO_PRECISIONS}")
        hint = config.performance_hint
        if hint not in PERFORMANCE_HINTS:
            raise EngineError(f"performance hint {hint!r} unknown; choose one of {PERFORMANCE_HINTS}")
        core = ov.Core()
        device = DEVICE_ALIASES.get(config.device.lower(), config.device.upper())
        available = core.available_devices
        if not any(d == device or d.startswith(device + ".") for d in available):
            raise EngineError(f"OpenVINO device {device} is not available here (available: {available}); "
                              "GPU/NPU need Intel graphics / NPU drivers")
        path = load_int8(bundle) if precision == "int8" else bundle.onnx_path
        props = {"PERFORMANCE_HINT": hint.upper(), "INFERENCE_PRECISION_HINT": _HINT_TYPE[precision]}
        if config.threads:
            props["INFERENCE_NUM_THREADS"] = int(config.threads)
        self.cache = cache_dir(bundle, config)
        if self.cache is not None:
            props["CACHE_DIR"] = str(self.cache)
        try:  # compiling from the path lets a cache hit skip reading and optimising the graph
            self.compiled = core.compile_model(str(path), device, props)
        except Exception as err:
            raise EngineError(f"OpenVINO cannot compile {path} for {device}: {err}") from None
        runs = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32 | bf16 | f16
        if runs != _HINT_TYPE[precision]:
            raise EngineError(f"OpenVINO on {device} would run {precision} as {runs} here (no {precision} kernels "
                              "on this device); choose another --precision")
        inputs = {p.get_any_name(): _shape(p.get_partial_shape()) for p in self.compiled.inputs}
        outputs = {p.get_any_name(): _shape(p.get_partial_shape()) for p in self.compiled.outputs}
        check_io(bundle.spec, inputs, outputs, where=str(path))
        self.output_names = output_names(bundle.spec.scales)
        self._ports = [self.compiled.output(n) for n in self.output_names]
        self.precision, self.hint = precision, hint
        full_name = core.get_property(device.split(".")[0], "FULL_DEVICE_NAME")
        self.device = f"{device} {full_name} ({precision}, {hint})"
        self._request = self.compiled.create_infer_request()
        self._queue = None
        if hint == "throughput":
            self._queue = ov.AsyncInferQueue(self.compiled, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def _outputs(self, request) -> list[np.ndarray]:
        return [np.array(request.get_tensor(p).data, dtype=np.float32) for p in self._ports]  # copies

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if self._queue is None or len(images) == 1:
            self._request.infer({INPUT_NAME: images})
            return dict(zip(self.output_names, self._outputs(self._request)))
        parts: list = [None] * len(images)

        def done(request, index: int) -> None:
            parts[index] = self._outputs(request)

        self._queue.set_callback(done)
        for i in range(len(images)):
            self._queue.start_async({INPUT_NAME: images[i:i + 1]}, i)
        self._queue.wait_all()
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.output_names)}

    def close(self) -> None:
        self._request = self._queue = self.compiled = None
