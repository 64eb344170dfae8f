"""ONNX Runtime backend: CPU everywhere; CUDA / TensorRT execution providers with onnxruntime-gpu.

ONNX Runtime's TensorRT provider builds a TensorRT engine when a session starts (minutes for ViT-B), so it is
configured like ``build-engine``: fp16 is TensorRT's own flag on the fp32 graph (``trt_fp16_enable``; the ONNX fp16
variant is for the CUDA provider), one optimisation profile over the batch axis (``trt_profile_*_shapes``: a
later, larger batch does not rebuild the engine; larger batches are split), and its engine and timing caches
under the engine folder (``--engine-dir``, default ``<bundle>/engines``). int8 needs TensorRT's own calibration:
that is the native backend's (``build-engine --precision int8``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..contract import INPUT_NAME, check_io, output_names
from .base import EngineError
from .config import EngineConfig
from .onnx_variants import load_variant

# Preference order for provider="auto". ONNX Runtime's TensorRT provider is used only when asked for: it
# builds an engine when a session starts (minutes for ViT-B), so it needs its engine cache (below).
AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
ORT_TRT_CACHE = "onnxruntime-tensorrt"  # inside the engine folder (<bundle>/engines or --engine-dir)
ORT_TRT_MAX_BATCH = 8  # the profile's maximum when EngineConfig.max_batch is not set (the runtime's default --batch)
TRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(), model_path: str | Path | None = None):
        """``config.provider``: auto | cpu | cuda | tensorrt (or a full EP name); ``config.threads``: intra-op
        threads, 0 = ORT's default; ``config.precision`` fp16/int8 runs the bundle's ``quantize`` variant
        (sha256-checked). ``model_path``: another ONNX file with the same contract (a variant being made)."""
        provider, threads = config.provider, config.threads
        self.max_batch: int | None = None  # set with the TensorRT provider: larger batches are split
        trt = PROVIDER_ALIASES.get(provider, provider) == TRT_PROVIDER
        if model_path is None and config.resolved_precision != "fp32" and not trt:
            model_path = load_variant(bundle, config.resolved_precision)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise EngineError(f"onnxruntime is not installed ({err}); pip install onnxruntime") from None
        available = ort.get_available_providers()
        if provider == "auto":
            providers = [p for p in AUTO_PROVIDERS if p in available]
        else:
            wanted = PROVIDER_ALIASES.get(provider, provider)
            if wanted not in available:
                raise EngineError(f"ONNX Runtime provider {wanted} is not available here (available: {available}); "
                                  "install onnxruntime-gpu (desktop) or the Jetson Zoo wheel for CUDA/TensorRT")
            providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
            if wanted == "CUDAExecutionProvider":
                providers[0] = (wanted, {"device_id": gpu_index(config.device)})
            if wanted == TRT_PROVIDER:
                providers[0] = (wanted, tensorrt_provider_options(bundle, config))
                self.max_batch = config.max_batch or ORT_TRT_MAX_BATCH
                if "CUDAExecutionProvider" in available:  # for the nodes TensorRT does not take
                    providers.insert(1, ("CUDAExecutionProvider", {"device_id": gpu_index(config.device)}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        path = str(model_path or bundle.onnx_path)
        self.graph_cache = None
        if model_path is None and providers == ["CPUExecutionProvider"]:  # the fp32 graph on the CPU: cached optimised
            from .ort_cache import OptimizedGraphCache

            self.graph_cache = OptimizedGraphCache(bundle, config)
            path = self.graph_cache.prepare(options)
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as err:
            raise EngineError(f"ONNX Runtime cannot load {path}: {err}") from None
        if self.graph_cache is not None:
            self.graph_cache.commit()
        self.device = self.session.get_providers()[0]  # the provider actually in use, not the one asked for
        inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        check_io(bundle.spec, inputs, outputs, where=path)
        self.output_names = output_names(bundle.spec.scales)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if self.max_batch is not None and len(images) > self.max_batch:  # beyond the TensorRT profile
            parts = [self.run(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
            return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}
        values = self.session.run(self.output_names, {INPUT_NAME: images})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.output_names, values)}

    def close(self) -> None:
        self.session = None


def gpu_index(device: str) -> int:
    """``EngineConfig.device`` for the CUDA / TensorRT providers: auto | cuda -> 0, cuda:<i> -> i."""
    match = re.fullmatch(r"(?:auto|cuda)(?::(\d+))?", device)
    if match is None:
        raise EngineError(f"device {device!r} is not a CUDA device for ONNX Runtime's GPU providers; use cuda or cuda:<i>")
    return int(match.group(1) or 0)


def tensorrt_provider_options(bundle: Bundle, config: EngineConfig) -> dict:
    """ONNX Runtime TensorRT provider options for ``config``: precision flag, batch profile, engine + timing caches."""
    from .engine_cache import default_engine_dir

    precision = config.resolved_precision
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"ONNX Runtime's TensorRT provider runs fp32 or fp16 here, not {precision}: TensorRT int8 needs "
                          f"its own calibration; use `winclip-edge build-engine --bundle {bundle.root} --precision int8 "
                          "--calibration-images DIR` and --backend tensorrt")
    folder = Path(config.engine_dir if config.engine_dir is not None else default_engine_dir(bundle.root)) / ORT_TRT_CACHE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"no write permission on {folder}")
    except OSError as err:
        raise EngineError(f"ONNX Runtime's TensorRT provider cannot keep its engine cache in {folder} ({err.strerror or err}); "
                          "pass --engine-dir DIR (a writable folder) when the bundle is read-only") from None
    h, w = bundle.spec.image_size
    max_batch = config.max_batch or ORT_TRT_MAX_BATCH

    def shape(n: int) -> str:
        return f"{INPUT_NAME}:{n}x{h}x{w}x3"

    return {"device_id": gpu_index(config.device), "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder),
            "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max_batch),
            "trt_profile_max_shapes": shape(max_batch)}
