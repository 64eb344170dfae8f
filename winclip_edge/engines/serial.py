"""The one lock around an engine: engines are not safe for concurrent ``run`` calls (an ONNX Runtime session is,
a TensorRT context or a torch module on one stream is not), and every Inspector sharing an engine (a catalog's
products, eval's classes) must queue on the same lock, so it travels with the engine, not with its users."""
from __future__ import annotations

import threading

import numpy as np

from .base import Engine


class SerialEngine:
    """An engine whose ``run`` calls are serialised; ``engine`` is the one it wraps."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.name, self.device = engine.name, engine.device
        self._lock = threading.Lock()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            return self.engine.run(images)

    def close(self) -> None:
        self.engine.close()


def serialised(engine: Engine) -> SerialEngine:
    """``engine`` behind its one lock: wrapped once; an engine that is serialised already is returned as it is."""
    return engine if isinstance(engine, SerialEngine) else SerialEngine(engine)
