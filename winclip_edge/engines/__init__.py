"""Engine backends, as a registry (registry.py). Each imports its own library lazily, so the runtime never needs torch."""
from __future__ import annotations

from ..bundle import Bundle
from .auto import Selection, select
from .base import Engine, EngineError
from .config import PRECISIONS, EngineConfig
from .registry import BackendRecord, backend, backends, broken_backends


def create_engine(bundle: Bundle, config: EngineConfig = EngineConfig()) -> Engine:
    """The engine ``config`` means for ``bundle``: :func:`select` decides (``auto``: the backend whose options are
    given, else the winner ``tune`` recorded for this machine, else ONNX Runtime fp32), the backend's record makes
    it after refusing anything it does not take."""
    return select(bundle, config).create(bundle)


__all__ = ["BackendRecord", "PRECISIONS", "Engine", "EngineConfig", "EngineError", "Selection", "backend", "backends",
           "broken_backends", "create_engine", "select"]
