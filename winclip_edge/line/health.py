"""Whether the station's engine works now: every engine call passes through :class:`EngineWatch`, which remembers
the last failure until a call succeeds again. The line controller's state reads it (an engine failure is the
OPC UA state Error, with the reason); the station probes a failed engine with a small call now and then, so it
comes back to Operational by itself once the engine does (a Triton server restarted, a device recovered)."""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np


class EngineWatch:
    """An engine (the Engine protocol) that records whether its last call failed. Wrap it inside the engine's one
    lock (engines/serial.py: ``SerialEngine.engine``) so every caller's calls count."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.name, self.device = engine.name, engine.device
        self.failures = 0
        self._lock = threading.Lock()
        self._failure: tuple[float, str] | None = None  # (time.time(), why) of the failure not recovered yet
        self.last_call = time.monotonic()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        try:
            out = self.engine.run(images)
        except Exception as err:
            with self._lock:
                self.failures += 1
                self._failure = (time.time(), f"engine failed: {type(err).__name__}: {err}")
                self.last_call = time.monotonic()
            raise
        with self._lock:
            self._failure = None
            self.last_call = time.monotonic()
        return out

    @property
    def failure(self) -> str | None:
        """Why the last engine call failed; None when it succeeded."""
        with self._lock:
            return None if self._failure is None else self._failure[1]

    def close(self) -> None:
        self.engine.close()


def watch(serial_engine: Any) -> EngineWatch:
    """Put an :class:`EngineWatch` inside ``serial_engine`` (the catalog's one lock) and return it."""
    inner = serial_engine.engine
    if isinstance(inner, EngineWatch):
        return inner
    watched = EngineWatch(inner)
    serial_engine.engine = watched
    return watched
