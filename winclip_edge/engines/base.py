"""The engine interface: one call per batch, graph contract in, graph contract out."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import WinclipError


class EngineError(WinclipError, RuntimeError):
    """An engine cannot be created or run (missing library, wrong device, mismatched graph)."""


class Engine(Protocol):
    """Runs the visual graph of a bundle.

    ``run(images)``: uint8 ``[N, H, W, 3]`` RGB at the model size -> ``{output name: float32 array}``
    with the names and shapes of contract.py.
    """

    name: str  # backend name: onnxruntime | tensorrt | torch
    device: str  # what actually runs it, e.g. "CPUExecutionProvider" or "NVIDIA H100 (fp16)"

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
