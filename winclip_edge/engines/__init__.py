"""Engine backends. Each imports its own library lazily, so the runtime never needs torch."""
from __future__ import annotations

from typing import Any

from ..bundle import Bundle
from .base import Engine, EngineError

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def create_engine(backend: str, bundle: Bundle, **options: Any) -> Engine:
    """Create the engine ``backend`` for ``bundle``; ``options`` go to that backend's constructor."""
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, **options)
    if backend == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(bundle, **options)
    if backend == "torch":
        from .torch import TorchEngine

        return TorchEngine(bundle, **options)
    raise EngineError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Engine", "EngineError", "create_engine"]
