"""ONNX Runtime backend: CPU everywhere; CUDA / TensorRT execution providers with onnxruntime-gpu."""
from __future__ import annotations

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
ORT_TRT_CACHE = "engines/onnxruntime-tensorrt"  # inside the bundle
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, config: EngineConfig = EngineConfig(), model_path: str | Path | None = None):
        """``config.provider``: auto | cpu | cuda | tensorrt (or a full EP name); ``config.threads``: intra-op
        threads, 0 = ORT's default; ``config.precision`` fp16/int8 runs the bundle's ``quantize`` variant
        (sha256-checked). ``model_path``: another ONNX file with the same contract (a variant being made)."""
        provider, threads = config.provider, config.threads
        if model_path is None and config.resolved_precision != "fp32":
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
            if wanted == "TensorrtExecutionProvider":
                cache = bundle.root / ORT_TRT_CACHE
                cache.mkdir(parents=True, exist_ok=True)
                providers[0] = (wanted, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)})
                if "CUDAExecutionProvider" in available:  # for the nodes TensorRT does not take
                    providers.insert(1, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        path = str(model_path or bundle.onnx_path)
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as err:
            raise EngineError(f"ONNX Runtime cannot load {path}: {err}") from None
        self.device = self.session.get_providers()[0]  # the provider actually in use, not the one asked for
        inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        check_io(bundle.spec, inputs, outputs, where=path)
        self.output_names = output_names(bundle.spec.scales)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.output_names, values)}

    def close(self) -> None:
        self.session = None
