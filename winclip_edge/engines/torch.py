"""PyTorch backend: the export module itself (the reference), on CPU or CUDA.

Imports torch and the export stage lazily: only this backend needs them. The model is re-created
from the bundle manifest (same weights id, checked), so its outputs are the ONNX graph's reference.
"""
from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from .base import EngineError


class TorchEngine:
    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        try:
            import torch

            from export.models import load_from_manifest
            from export.windowed_clip import WindowedVisual
        except ImportError as err:
            raise EngineError(f"the torch backend needs the export extra ({err}); pip install 'winclip-edge[export]'") from None
        m = bundle.manifest
        loaded = load_from_manifest(m)
        self.torch = torch
        self.module = WindowedVisual(loaded.model.visual, mean=m.mean, std=m.std, scales=m.scales, stride=m.stride,
                                     patch_layer=m.patch_layer).eval().to(device)
        self.device = str(device)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(self.device))
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def close(self) -> None:
        self.module = None
