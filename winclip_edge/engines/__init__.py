"""Engine backends. Each imports its own library lazily, so the runtime never needs torch."""
from __future__ import annotations

from ..bundle import Bundle
from .base import Engine, EngineError
from .config import PRECISIONS, EngineConfig

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch", "triton")


def create_engine(bundle: Bundle, config: EngineConfig = EngineConfig()) -> Engine:
    """The engine ``config.backend`` for ``bundle``; the backend reads the fields of ``config`` it understands.
    ``auto``: the winner ``tune`` recorded for this machine, else ONNX Runtime fp32 (engines/auto.py)."""
    if config.backend == "auto":
        from .auto import resolve

        config = resolve(bundle, config).config
    if config.backend == "openvino":
        from .openvino import OpenVinoEngine

        return OpenVinoEngine(bundle, config)
    if config.backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, config)
    if config.backend == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(bundle, config)
    if config.backend == "torch":
        from .torch import TorchEngine

        return TorchEngine(bundle, config)
    if config.backend == "triton":
        from .triton import TritonEngine

        return TritonEngine(bundle, config)
    raise EngineError(f"unknown backend {config.backend!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "PRECISIONS", "Engine", "EngineConfig", "EngineError", "create_engine"]
