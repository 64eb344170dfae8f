"""OpenVINO backend: the bundle's ONNX graph compiled by OpenVINO for the CPU (or an Intel GPU / NPU).

Precisions: ``fp32`` | ``bf16`` | ``fp16`` set OpenVINO's ``INFERENCE_PRECISION_HINT`` on the fp32 graph (the
device computes in that type, LayerNorm and softmax accumulate in fp32 inside OpenVINO's kernels); ``int8``
runs the NNCF post-training-quantised copy made by ``winclip-edge engine quantize --backend openvino`` (or
``tune``), stored in ``bundle/variants/`` and verified like the ONNX variants (openvino_model.py).

A precision the device would silently replace (bf16 on a CPU without AVX512-BF16/AMX, fp16 on a CPU, which
OpenVINO runs as bf16 or fp32) is refused with the reason, so a name always means what runs.

The compiled model is cached (OpenVINO's ``CACHE_DIR``) under ``<engine_dir or bundle/engines>/openvino-<machine
key>``: a second start on the same machine and library versions loads the compiled blob instead of reading
and optimising the ONNX graph. A read-only bundle simply runs without the cache; the folders of other machine keys
are bounded (caches.py).

``device``: auto (the CPU) | cpu | gpu | gpu.<i> | npu. ``OpenVinoOptions.performance_hint``: ``latency`` (one
request uses every core: batch 1 on a line) or ``throughput`` (OpenVINO's streams; the images of a batch run as
parallel requests).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..contract import INPUT_NAME, output_names
from . import caches
from .base import EngineError
from .cache_dir import engine_dir
from .config import EngineConfig
from .onnx_variants import VariantError
from .openvino_model import PIP, check_compiled, load_int8
from .registry import BackendRecord, installed, option

OPENVINO_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
PERFORMANCE_HINTS = ("latency", "throughput")
_HINT_TYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: the ops NNCF left float
DEVICE_ALIASES = {"auto": "CPU", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}


@dataclass(frozen=True)
class OpenVinoOptions:
    """What only the OpenVINO backend takes (EngineConfig.options)."""

    performance_hint: str = option("latency", flag="--performance-hint", choices=PERFORMANCE_HINTS,
                                   help="latency (one request on every core) or throughput (the images of a batch "
                                        "in parallel; default latency)")


def cache_dir(bundle: Bundle, config: EngineConfig, bound: caches.CacheBound | None = None) -> tuple[Path | None, bool]:
    """OpenVINO's compiled-model cache folder for this machine (None where it cannot be written) and whether it is
    new or empty (the compiled model is about to be written into it)."""
    try:
        folder, fresh = caches.make_folder(engine_dir(bundle, config.engine_dir), caches.OPENVINO, bound)
    except OSError:
        return None, False
    return (folder, fresh) if os.access(folder, os.W_OK) else (None, False)


class OpenVinoEngine:
    name = "openvino"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(backend="openvino")):
        try:
            import openvino as ov
        except ImportError as err:
            raise EngineError(f"openvino is not installed ({err}); {PIP}") from None
        precision = config.precision or "fp32"
        if precision not in OPENVINO_PRECISIONS:
            raise EngineError(f"OpenVINO precision {precision!r} unknown; choose one of {OPENVINO_PRECISIONS}")
        hint = (config.options if config.options is not None else OpenVinoOptions()).performance_hint
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
        bound = caches.CacheBound.from_env()
        self.cache, fresh = cache_dir(bundle, config, bound)
        if self.cache is not None:
            props["CACHE_DIR"] = str(self.cache)
        try:  # compiling from the path lets a cache hit skip reading and optimising the graph
            try:
                self.compiled = core.compile_model(str(path), device, props)
            except Exception:
                if self.cache is None:
                    raise
                # the cache folder went mid-start (another process's bound) and cannot be remade: run without it
                self.cache = None
                self.compiled = core.compile_model(str(path), device, {k: v for k, v in props.items() if k != "CACHE_DIR"})
        except Exception as err:
            raise EngineError(f"OpenVINO cannot compile {path} for {device}: {err}") from None
        if self.cache is not None:
            if fresh:
                caches.prune(self.cache.parent, caches.OPENVINO, bound)  # with the new blob's size (the size cap)
            else:
                caches.touch(self.cache)
        runs = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32 | bf16 | f16
        if runs != _HINT_TYPE[precision]:
            raise EngineError(f"OpenVINO on {device} would run {precision} as {runs} here (no {precision} kernels "
                              "on this device); choose another --precision")
        check_compiled(bundle, self.compiled, where=str(path))
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


# ---------------------------------------------------------------- its record: tune, roofline, quantize, the registry
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16", "int8": "INT8"}


def _candidates(tune) -> tuple[list[EngineConfig], list[tuple[EngineConfig, str]]]:
    """Every precision on every device OpenVINO sees that has its kernels (the CPU ones per thread count)."""
    tries: list[EngineConfig] = []
    skipped: list[tuple[EngineConfig, str]] = []
    if not installed("openvino"):
        return tries, [(EngineConfig(backend="openvino", precision="fp32"),
                        "openvino is not installed (pip install 'winclip-edge[openvino]')")]
    import openvino as ov

    core = ov.Core()
    devices = list(core.available_devices)
    caps = {d: list(core.get_property(d, "OPTIMIZATION_CAPABILITIES")) for d in devices}
    for device in devices:
        kind = device.split(".")[0]
        for precision in OPENVINO_PRECISIONS:
            config = EngineConfig(backend="openvino", precision=precision, device=device)
            if _CAPABILITY[precision] not in caps[device]:
                skipped.append((config, f"{device} has no {precision} kernels ({caps[device]})"))
            elif kind == "CPU" and precision == "fp16":
                skipped.append((config, "OpenVINO runs fp16 on a CPU as bf16 or fp32"))
            elif kind == "CPU":
                tries += [EngineConfig(backend="openvino", precision=precision, device=device, threads=t)
                          for t in tune.threads]
            else:
                tries.append(config)
    for kind in ("GPU", "NPU"):
        if not any(d.startswith(kind) for d in devices):
            skipped.append((EngineConfig(backend="openvino", precision="fp16", device=kind),
                            f"no Intel {kind} visible to OpenVINO here (not run)"))
    return tries, skipped


def _prepare(bundle: Bundle, config: EngineConfig, product: str | None, log: Callable[[str], None],
             build: bool = True) -> None:
    """The NNCF int8 model a candidate needs, made when missing (on the product's references; minutes for ViT-B)."""
    if config.precision != "int8" or not build:
        return
    try:
        load_int8(bundle)
    except VariantError:
        from ..builders.openvino import calibration_images, make_int8

        frames, described = calibration_images(bundle, product)
        make_int8(bundle, frames, described)


def gemm_probe(precision: str, n: int) -> Callable[[], object] | None:
    """An n x n GEMM call in OpenVINO's oneDNN kernels (f32, bf16, int8 via FakeQuantize) for the roofline to time;
    None: not a precision it probes."""
    if precision not in ("fp32", "bf16", "int8"):
        return None
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([n, n], ov.Type.f32, name="x")
    w = ops.constant(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    a = x
    if precision == "int8":  # FakeQuantize on both operands = OpenVINO's int8 GEMM (VNNI / AMX-INT8)
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        a, w = ops.fake_quantize(x, lo, hi, lo, hi, 256), ops.fake_quantize(w, lo, hi, lo, hi, 255)
    hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(a, w, False, False)], [x]), "CPU",
                                       {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    if compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() != hint:
        raise RuntimeError(f"no {precision} kernels on this CPU")
    request, data = compiled.create_infer_request(), np.ones((n, n), np.float32)
    return lambda: request.infer([data])


BACKEND = BackendRecord(
    name="openvino", create=OpenVinoEngine, precisions=OPENVINO_PRECISIONS, options=OpenVinoOptions,
    takes=("threads", "device", "engine_dir"), devices=("cpu", "gpu", "gpu.<i>", "npu"),
    candidates=_candidates, prepare=_prepare, gemm_probe=gemm_probe,
    builds="the NNCF int8 model (quantize --backend openvino)", build_command="quantize",
    packages=("openvino",), install=PIP,
    summary="OpenVINO: fp32 / bf16 / fp16 precision hints and the NNCF int8 model on Intel CPUs, GPUs, NPUs")
